"""The decode loop: B sequences, each with its own sampling parameters, one token per sequence per step.

    prefill:  one forward over the prompts (left-padded to one length, with an attention mask) gives the logits
              of every row's first token
    step:     (B, V) logits of the live rows -> penalties and warpers per row (`sampling.process_rows`) -> one
              token per row (`sampling.sample_rows`, each row with its own generator) -> one event per row
    decode:   the sampled tokens -> one forward of one token per row -> the next logits

A `SequenceState` is one sequence: its tokens, stop rules, budget, text buffers and timings. A `DecodeBatch` holds
the live ones with their batched sampling state (`SamplingRows`, `TokenHistory`), and its `step` is the whole
per-token work after the model: a row that finishes (a stop token, a stop string, its budget) yields its last
event and leaves the batch. `decode` drives the model through one function, `forward(ids, mask, first) -> (B, V) logits`
(the plain `KVCache` path, a compiled static decoder in `generate`, the engine's runner next); rows that have
left are still fed their last token, masked as padding (the contiguous cache keeps a fixed batch), and their
logits are dropped.

Each row's text is held back in two places, as `generate` describes: the `IncrementalDecoder` keeps the bytes of
an unfinished UTF-8 character; the `StopStringBuffer` keeps the longest tail of the text that may grow into a stop
string, so a stop string spread over several tokens is cut out before any of it is shown. Stop tokens are never
shown as text. Ids past the tokenizer's vocabulary (a padded embedding) are never sampled.

Timings, per row: prefill_s is the time to its first token (the prompt's forward included), decode_s sums the
later steps (the caller's time between events is not counted); a step whose forward compiled the decoder counts
as warmup_s instead.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.infer.sampling import SamplingParams, SamplingRows, TokenHistory, process_rows, sample_rows
from lmforge.tokenizer.base import IncrementalDecoder
from lmforge.utils.errors import LmforgeError

Forward = Callable[[torch.Tensor, torch.Tensor | None, bool], torch.Tensor]
"""(ids (B, T), attention mask (B, T) or None: all real, the first call: a new sequence) -> (B, V) fp32 logits of
the last position."""


class NonFiniteLogitsError(LmforgeError):
    """The model produced NaN or infinite logits: its weights (the user's file) or activations overflow."""


@dataclass
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float  # prompt forward + first token
    decode_s: float  # every later token, except a compiling first step
    warmup_s: float = 0.0  # the first step of a new compiled decoder (torch.compile runs then): not in decode_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.generated_tokens - 1 - (self.warmup_s > 0)
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


@dataclass
class GenerationEvent:
    """One generated token and the text it released (possibly "" while text is held back)."""

    text: str
    token_id: int
    finish_reason: str | None = None  # set on the last event: "stop" or "length"
    stats: GenerationStats | None = None  # set on the last event


class StopStringBuffer:
    """Cut the text at the first stop string, holding back any tail that may still grow into one.

    Invariant: text already released contains no stop string and no start of one (every released
    position was checked against the text that followed it, or was not a possible start).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add `text`; return (the text now safe to release, whether a stop string was found)."""
        buf = self.held + text
        found = [i for s in self.stops if (i := buf.find(s)) >= 0]
        if found:
            self.held = ""
            return buf[: min(found)], True
        keep = max((self._partial(buf, s) for s in self.stops), default=0)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    @staticmethod
    def _partial(buf: str, stop: str) -> int:
        """The length of the longest tail of `buf` that is a proper prefix of `stop`."""
        for k in range(min(len(stop) - 1, len(buf)), 0, -1):
            if stop.startswith(buf[-k:]):
                return k
        return 0

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def seeded_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed`, or with a fresh random seed when None."""
    generator = torch.Generator(device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


@dataclass(eq=False)
class SequenceState:
    """One sequence being decoded: what it has generated, when it stops, the text it holds back, its timings."""

    slot: int  # its row in the model's batch
    prompt: list[int]
    params: SamplingParams
    budget: int  # tokens it may generate: max_tokens cut to the room its prompt leaves in the context
    stop_ids: frozenset[int]
    decoder: IncrementalDecoder
    generator: torch.Generator
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0
    warmup_s: float = 0.0
    stops: StopStringBuffer = field(init=False)

    def __post_init__(self) -> None:
        self.stops = StopStringBuffer(self.params.stop)

    def accept(self, token: int) -> str:
        """Append `token`; return the text it releases, and set `finish_reason` if the sequence ends here."""
        self.output.append(token)
        stopped = token in self.stop_ids
        finish = "stop" if stopped else "length" if len(self.output) == self.budget else None
        text = "" if stopped else self.decoder.add(token)
        if finish:
            text += self.decoder.flush()
        text, hit = self.stops.push(text)
        if hit:
            finish = "stop"
        elif finish:
            text += self.stops.flush()
        self.finish_reason = finish
        return text

    def event(self, text: str, elapsed: float, warmup: bool) -> GenerationEvent:
        """The event of the token just accepted, after a step of `elapsed` seconds (`warmup`: it compiled)."""
        if len(self.output) == 1:
            self.prefill_s = elapsed
        elif warmup:
            self.warmup_s = elapsed
        else:
            self.decode_s += elapsed
        if self.finish_reason is None:
            return GenerationEvent(text, self.output[-1])
        stats = GenerationStats(len(self.prompt), len(self.output), self.prefill_s, self.decode_s, self.warmup_s)
        return GenerationEvent(text, self.output[-1], self.finish_reason, stats)


class DecodeBatch:
    """The live sequences of a batch and their sampling state; `step` turns their logits into their next events.

    `known`: the tokenizer's vocabulary size; logits past it (a padded embedding) are never sampled.
    """

    def __init__(self, rows: Sequence[SequenceState], known: int) -> None:
        self.rows = list(rows)
        self.known = known
        self._sampling: SamplingRows | None = None  # built at the first step, from the logits' size and device
        self._history: TokenHistory | None = None

    def step(self, logits: torch.Tensor, started: float, warmup: bool = False) -> list[GenerationEvent]:
        """Sample one token for every live row from `logits` (B, V) (row i: `self.rows[i]`), timed from `started`
        (`time.perf_counter()` before the forward); return one event per row. Rows that finish leave the batch."""
        with torch.inference_mode():
            self._check_finite(logits)
            if logits.shape[-1] > self.known:
                logits[..., self.known :] = float("-inf")
            sampling, history = self._state(logits)
            tokens = sample_rows(process_rows(logits, sampling, history), sampling, [r.generator for r in self.rows])
            if history is not None:
                history.add(tokens)
        texts = [row.accept(token) for row, token in zip(self.rows, tokens.tolist(), strict=True)]
        elapsed = time.perf_counter() - started
        events = [row.event(text, elapsed, warmup) for row, text in zip(self.rows, texts, strict=True)]
        self._drop_finished()
        return events

    def _state(self, logits: torch.Tensor) -> tuple[SamplingRows, TokenHistory | None]:
        """The rows' sampling columns, and their token history when a row has a penalty (built once: a batch
        whose rows have none never counts tokens)."""
        v, device = logits.shape[-1], logits.device
        if self._sampling is None:
            self._sampling = SamplingRows.of([r.params for r in self.rows], v, device)
        if self._history is None and self._sampling.penalizes:
            self._history = TokenHistory.of([r.prompt for r in self.rows], v, device, [r.output for r in self.rows])
        return self._sampling, self._history

    def _check_finite(self, logits: torch.Tensor) -> None:
        bad = (~logits.isfinite().all(dim=-1)).nonzero()
        if len(bad):
            row = self.rows[int(bad[0])]
            which = f" of sequence {row.slot}" if len(self.rows) > 1 else ""
            raise NonFiniteLogitsError(f"the model's logits are NaN or inf at generated token {len(row.output)}"
                                       f"{which}: its weights or activations overflow (float32 may help)")  # fmt: skip

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            if self._history is not None:
                self._history = self._history.select(torch.tensor(keep, dtype=torch.long,
                                                                  device=self._history.seen.device))  # fmt: skip
            self._sampling = None


def decode(
    forward: Forward,
    batch: DecodeBatch,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor | None = None,
    compiles: bool = False,
) -> Iterator[tuple[int, GenerationEvent]]:
    """Run `batch` to the end: `forward(prompt_ids, prompt_mask, True)` (B, T), then one token per row per step;
    yield (slot, event) for every live row, each step's events in row order. A row that has left is fed its last
    token again as padding (mask 0: not stored, its position does not advance past the context). `compiles`: the
    first decode forward compiles (its step is timed as warmup)."""
    last = prompt_ids[:, -1].tolist()  # every model row's latest token: what it is fed next
    start = time.perf_counter()
    logits = forward(prompt_ids, prompt_mask, True)
    for step in itertools.count():
        slots = [row.slot for row in batch.rows]
        live = logits if len(slots) == logits.shape[0] else logits[slots]
        for slot, event in zip(slots, batch.step(live, start, warmup=compiles and step == 1), strict=True):
            last[slot] = event.token_id
            yield slot, event
        if not batch.rows:
            return
        start = time.perf_counter()
        device = prompt_ids.device
        mask = None
        if len(batch.rows) < len(last):
            mask = torch.zeros(len(last), 1, dtype=torch.long, device=device)
            mask[[row.slot for row in batch.rows]] = 1
        logits = forward(torch.tensor(last, device=device)[:, None], mask, False)
