"""Single-stream generation with a contiguous KV cache, streaming text as it is decided.

    prefill:  one forward over the prompt fills the cache and gives the logits of token 1
    decode:   token t -> forward of that one token (reading the cache) -> logits of token t + 1

Each step the logits go through `sampling.process_logits` (penalties, temperature, top-k/p, min-p) and
`sampling.next_token` (argmax or a seeded draw). `generate` yields one `GenerationEvent` per token with the
text that token completed, so a caller can print as it goes. Text is held back in two places:

* the `IncrementalDecoder` keeps the bytes of an unfinished UTF-8 character until the next token ends it;
* the `StopStringBuffer` keeps the longest tail of the text that is a prefix of a stop string, so a stop
  string spread over several tokens is cut out before any of it is shown.

Generation ends at the first of: a stop token (the tokenizer's eos and eot tokens, unless `ignore_eos`, and
`params.stop_token_ids`; never shown as text), a stop string (the text ends just before it), `max_tokens`,
or the model's `max_seq_len` (`max_tokens` is cut to the room the prompt leaves in the context; the last event
then says "length"). Ids past the tokenizer's vocabulary (a model whose embedding is padded to a round
size) are never sampled. The last event carries `finish_reason` ("stop" or "length") and timings:
prefill tokens/s (prompt tokens over the time to the first token) and decode tokens/s (the other tokens
over the time after it; the caller's time between events is not counted).

The prompt is checked before the first step, with a `GenerationInputError` naming `prompt` (the CLI: `--prompt`):
token ids given as a list must be integers (not bools or floats), and every id, given or produced by the
tokenizer, must lie in the model's vocabulary (0 <= id < vocab_size); the error names the id and its position.
An empty prompt is refused, except that text which encodes to nothing still starts from the bos token when the
tokenizer adds one (`add_bos_token`): the prompt is then [bos]. A prompt that fills the context (max_seq_len tokens
or more, leaving no room for one new token) is refused rather than cut. Logits that are NaN or inf (a model whose
weights or activations overflow) stop generation with a `NonFiniteLogitsError` instead of a torch error.

With `compile=True` the forward passes go through `static_decode.StaticDecoder` instead (a preallocated
cache and one `torch.compile`d graph per decode step, as gpt-fast does): the same tokens, faster once
compiled; the first call per model and cache size pays the compilation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lmforge.infer import static_decode
from lmforge.infer.kv_cache import KVCache
from lmforge.infer.sampling import GenerationInputError, SamplingParams, next_token, process_logits
from lmforge.tokenizer.base import BaseTokenizer, IncrementalDecoder
from lmforge.utils.errors import LmforgeError


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


def eos_token_id(tokenizer: BaseTokenizer, attr: str = "eos_token") -> int | None:
    """The id of the tokenizer's eos token (`eos_token_id`, else `eos_token` looked up), or None;
    `attr="eot_token"` looks up the end-of-turn token the same way."""
    if (found := getattr(tokenizer, f"{attr}_id", None)) is not None:
        return found
    if (eos := getattr(tokenizer, attr, None)) is None:
        return None
    found = tokenizer.token_to_id(eos)
    return found if found is not None else tokenizer.token_to_id(eos.encode("utf-8"))


def encode_prompt(tokenizer: BaseTokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of `prompt`: ids pass through (checked to be integers); text is encoded with special tokens
    recognised (as a rendered chat template needs), after the bos token when the tokenizer says `add_bos_token`."""
    if not isinstance(prompt, str):
        return prompt_ids(prompt)
    ids = tokenizer.encode(prompt, allowed_special="all")
    bos = getattr(tokenizer, "bos_token", None)
    if getattr(tokenizer, "add_bos_token", False) and bos is not None:
        bos_id = tokenizer.token_to_id(bos)
        if bos_id is not None and ids[:1] != [bos_id]:
            ids.insert(0, bos_id)
    return ids


def prompt_ids(prompt: object) -> list[int]:
    """A prompt given as token ids, as a list of ints: any sequence of integers (ints, numpy or 0-d torch integers),
    not bools or floats, which `int()` would silently turn into ids."""
    if isinstance(prompt, bytes | bytearray) or not hasattr(prompt, "__iter__"):
        raise GenerationInputError("prompt", f"expected text or a sequence of token ids, got {type(prompt).__name__}")
    return [_token_id(item, position) for position, item in enumerate(prompt)]


def _token_id(item: object, position: int) -> int:
    if not isinstance(item, bool):
        with contextlib.suppress(TypeError):
            return operator.index(item)
    raise GenerationInputError("prompt", f"item {position} is {item!r}: token ids are integers")


def check_prompt(ids: list[int], vocab_size: int, max_seq_len: int, from_text: bool) -> None:
    """Refuse a prompt that is empty, leaves no room in the context, or holds an id outside the vocabulary."""
    if not ids:
        why = " (the text encodes to no tokens, and the tokenizer adds no bos token)" if from_text else ""
        raise GenerationInputError("prompt", f"is empty: give at least one token{why}")
    if len(ids) >= max_seq_len:
        raise GenerationInputError(
            "prompt", f"has {len(ids)} tokens; the model's context (max_seq_len) holds {max_seq_len}, "
            "and at least one must be left for the reply"
        )  # fmt: skip
    bad = next(((pos, i) for pos, i in enumerate(ids) if not 0 <= i < vocab_size), None)
    if bad is not None:
        source = "the tokenizer gave " if from_text else ""
        raise GenerationInputError(
            "prompt", f"{source}token id {bad[1]} at position {bad[0]}, outside the model's vocabulary "
            f"(0 <= id < vocab_size {vocab_size})"
        )  # fmt: skip


@torch.inference_mode()  # per call, not around the loop: a suspended generator must not leak the mode
def _last_logits(model, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """(1, V) fp32 logits of the last position; the head runs on that position only."""
    h = model.hidden_states(ids, cache=cache)
    return model.logits(h[:, -1]).float()


def generate(
    model,
    tokenizer: BaseTokenizer,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    *,
    compile: bool = False,
    **overrides,
) -> Iterator[GenerationEvent]:
    """Stream the continuation of `prompt` (text or token ids), one event per generated token.

    `overrides` replace fields of `params` (e.g. `generate(model, tok, "Hi", max_tokens=8, temperature=0)`).
    `compile` decodes with a static cache and `torch.compile` (models `static_decode` cannot run fall
    back to the plain path). A bad prompt raises here, before the first step.
    """
    params = dataclasses.replace(params or SamplingParams(), **overrides)
    ids = encode_prompt(tokenizer, prompt)
    limit = model.config.max_seq_len
    check_prompt(ids, model.config.vocab_size, limit, from_text=isinstance(prompt, str))
    budget = min(params.max_tokens, limit - len(ids))
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids |= {i for attr in ("eos_token", "eot_token") if (i := eos_token_id(tokenizer, attr)) is not None}
    forward, compiles = _forward_fn(model, len(ids) + budget, compile)
    return _stream(forward, model, tokenizer, ids, params, budget, stop_ids, compiles)  # errors raised above


def _forward_fn(model, n_tokens: int, compile: bool):
    """(forward, compiles): forward(new_ids (1, T), first: bool) -> (1, V) fp32 logits of the last of `new_ids`,
    with a fresh cache when `first`: the plain `KVCache` path, or a (compiled) `StaticDecoder`; `compiles` when
    its first decode step will compile the graph."""
    if compile and static_decode.supports(model):
        decoder = static_decode.decoder_for(model, n_tokens, compile=True)
        return (lambda ids, first: decoder.prefill(ids) if first else decoder.step(ids)), not decoder.warm
    cache = KVCache(n_tokens)
    return (lambda ids, first: _last_logits(model, ids, cache)), False


def _stream(forward, model, tokenizer: BaseTokenizer, ids: list[int], params: SamplingParams, budget: int,
            stop_ids: set[int], compiles: bool):  # fmt: skip
    device = next(model.parameters()).device
    generator = torch.Generator(device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    n_prompt = n = len(ids)
    tokens = torch.zeros(1, n_prompt + budget, dtype=torch.long, device=device)  # prompt, then generated
    tokens[0, :n_prompt] = torch.tensor(ids)
    decoder, stops = IncrementalDecoder(tokenizer), StopStringBuffer(params.stop)
    prefill_s = decode_s = warmup_s = 0.0

    start = time.perf_counter()
    logits = forward(tokens[:, :n_prompt], True)
    known = tokenizer.vocab_size  # ids past the tokenizer's (a padded embedding) can never be decoded
    for step in range(budget):
        with torch.inference_mode():
            if not logits.isfinite().all():
                raise NonFiniteLogitsError(f"the model's logits are NaN or inf at generated token {step}: its "
                                           "weights or activations overflow (float32 may help)")  # fmt: skip
            if logits.shape[-1] > known:
                logits[..., known:] = float("-inf")
            logits = process_logits(logits, params, tokens[:, :n], tokens[:, n_prompt:n])
            token = int(next_token(logits, params, generator))
        tokens[0, n] = token
        n += 1
        finish = "stop" if token in stop_ids else "length" if step == budget - 1 else None
        text = "" if token in stop_ids else decoder.add(token)
        if finish:
            text += decoder.flush()
        text, hit = stops.push(text)
        if hit:
            finish = "stop"
        elif finish:
            text += stops.flush()

        elapsed = time.perf_counter() - start
        if step == 0:
            prefill_s = elapsed
        elif step == 1 and compiles:
            warmup_s = elapsed
        else:
            decode_s += elapsed
        if finish:
            stats = GenerationStats(n_prompt, n - n_prompt, prefill_s, decode_s, warmup_s)
            yield GenerationEvent(text, token, finish, stats)
            return
        yield GenerationEvent(text, token)
        start = time.perf_counter()
        logits = forward(tokens[:, n - 1 : n], False)


def generate_text(
    model, tokenizer: BaseTokenizer, prompt: str | Sequence[int], params: SamplingParams | None = None, **overrides
) -> str:
    """The whole continuation of `prompt` as one string (see `generate`)."""
    return "".join(event.text for event in generate(model, tokenizer, prompt, params, **overrides))
