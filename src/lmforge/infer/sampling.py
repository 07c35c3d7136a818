"""Sampling: turning next-token logits (B, V) into token ids.

Every transform below maps logits to logits; a filter sets dropped tokens to -inf. With p = softmax(z):

    temperature T          z / T                          (T -> 0 is greedy: argmax z)
    top-k                  keep z_i >= the k-th largest z  (ties with the k-th are kept)
    top-p (nucleus)        sort p descending; keep the smallest prefix whose mass reaches p_top
                           (token i stays iff the mass of the tokens ranked above it is < p_top,
                           so the most likely token always stays; p_top = 1 keeps everything)
    min-p                  keep p_i >= min_p * max_j p_j
    repetition (CTRL)      for tokens seen: z > 0 -> z / r,  z <= 0 -> z * r   (r > 1 discourages)
    frequency / presence   z_i -= f * c_i + a * [c_i > 0]  (OpenAI; c_i = times token i was generated)

`process_logits` applies them in the order of transformers' `generate` (`_get_logits_processor`): the
penalties first, then temperature, top-k, top-p and min-p, so min-p sees the temperature-scaled
distribution (as llama.cpp recommends). `sample` then draws from softmax(z) with a seeded generator;
temperature 0 skips the warpers and takes the argmax of the penalized logits.

Extreme but finite values stay well defined: every transform keeps the logits finite or -inf (a dropped token),
saturating at the dtype's largest finite value instead of overflowing to inf, so softmax never meets inf - inf
and nothing is NaN. The penalties are computed on the logits in that saturated form (a repetition penalty of
1e30 or a frequency penalty of 1e300 pushes the seen tokens to the bottom of the range, finitely); temperatures
below `MIN_TEMPERATURE` (1e-5) scale as 1e-5 does (next to greedy, and finite); an infinite-looking temperature
(1e308) flattens every kept token to the same logit. `SamplingParams` refuses what has no meaning (negative,
NaN or infinite values, top_p/min_p outside [0, 1], seeds outside [0, 2**64)) with a `SamplingParamsError`
naming the field.

Per-row parameters. A batch of sequences, each with its own `SamplingParams`, runs through `process_rows` and
`sample_rows` with the parameters as (B, 1) columns (`SamplingRows`) and the histories as (B, V) tensors
(`TokenHistory`): the same formulas as batched tensor ops, where a row that does not use a transform holds the value
that leaves its logits unchanged (top-k 0, temperature 1, min-p 0, a top-p threshold below every mass, penalties
1 and 0) and greedy rows skip every warper. Row b equals `process_logits` / `next_token` of row b alone, bit for bit:
each number is prepared as the single-row path prepares it (in float32 for float32 logits), the elementwise
formulas round alike, and a draw is the one `torch.multinomial` makes (argmax_i p_i / E_i, E_i ~ Exp(1) from the
row's own generator), so a row's tokens do not depend on the rows beside it. The saturation rules hold there too.

References: Holtzman et al. 2019 (nucleus), Keskar et al. 2019 (CTRL repetition penalty), Nguyen et al.
2024 (min-p), the OpenAI API reference (frequency and presence penalties).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.utils.errors import LmforgeError

NEG_INF = float("-inf")
MIN_TEMPERATURE = 1e-5  # smaller positive temperatures scale as this one does (0 itself means greedy)
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64)
_NO_VALUE = object()


class GenerationInputError(LmforgeError):
    """A generation input is wrong: a `SamplingParams` field or the prompt.

    `name` is the parameter as the Python API spells it (`top_p`, `prompt`); the message reads
    ``SamplingParams.top_p=2.0: must be in [0, 1]``. `cli_message` says the same with the command-line flag of
    that name (``--top-p=2.0: ...``), which the CLI prints instead.
    """

    def __init__(self, name: str, rule: str, value: object = _NO_VALUE, owner: str = "") -> None:
        self.name, self.rule = name, rule
        self._value = "" if value is _NO_VALUE else f"={value!r}"
        super().__init__(f"{owner}{name}{self._value}: {rule}")

    @property
    def cli_message(self) -> str:
        return f"--{self.name.replace('_', '-')}{self._value}: {self.rule}"

    def __reduce__(self):  # picklable (a worker process reports it) although __init__ does not take the message
        return _restore_error, (type(self), str(self), dict(self.__dict__))


def _restore_error(cls: type[GenerationInputError], message: str, state: dict) -> GenerationInputError:
    error = cls.__new__(cls)
    LmforgeError.__init__(error, message)
    error.__dict__.update(state)
    return error


class SamplingParamsError(GenerationInputError):
    """A `SamplingParams` field has a value it cannot take; the message names the field and the rule."""

    def __init__(self, name: str, value: object, rule: str) -> None:
        super().__init__(name, rule, value, owner="SamplingParams.")


def _saturate(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """`new` clamped to the finite range of `old`'s dtype where `old` is finite; elsewhere `old` (a dropped token's
    -inf stays -inf). This keeps the invariant every transform relies on: logits are finite or -inf."""
    info = torch.finfo(old.dtype)
    return torch.where(old.isfinite(), new.clamp(info.min, info.max), old).to(old.dtype)


def _divide(x: torch.Tensor, d: float | torch.Tensor) -> torch.Tensor:
    """x / d, rounded as `x / float` is on x's device, so a per-row divisor (B, 1) gives each row what its number
    alone gives: ATen divides by a Python number on the CPU, but multiplies by its float32 reciprocal on CUDA."""
    if isinstance(d, torch.Tensor) and x.is_cuda:
        return x * d.reciprocal()
    return x / d


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / T, with T at least `MIN_TEMPERATURE` and the result saturated (never inf)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to scale logits (0 means greedy), got {temperature}")
    return _saturate(_divide(logits, max(temperature, MIN_TEMPERATURE)), logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (and any tied with the k-th); k <= 0 or k >= V keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: the smallest set of most likely tokens whose probability reaches `p` (at least one).

    Computed as transformers does, from the ascending sort: a token is dropped when the mass of itself and
    every less likely token is <= 1 - p, i.e. when the tokens ranked above it already hold >= p.
    """
    if p >= 1.0:
        return logits
    return logits.masked_fill(_nucleus_drop(logits, 1 - p), NEG_INF)


def _nucleus_drop(logits: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """(B, V) the tokens top-p drops: those whose mass together with every less likely token is <= `threshold`
    (1 - p; a number, or (B, 1) per row), never a row's most likely token."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    mass_up_to = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_up_to <= threshold
    drop_sorted[..., -1] = False  # the most likely token always stays
    return drop_sorted.scatter(-1, order, drop_sorted)


def min_p_filter(logits: torch.Tensor, min_p: float | torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` times the most likely token's; `min_p` is a number, or
    (B, 1) per row (a row with 0 keeps every token: no probability is below 0)."""
    if not isinstance(min_p, torch.Tensor) and min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)  # at least one token
    return logits.masked_fill(drop, NEG_INF)


def repetition_penalty(logits: torch.Tensor, history_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty on every token in `history_ids` (B, L), once per token however often it occurs.

    The penalty is taken within the dtype's normal range (so 1e-300 does not become 0 and divide by it) and the
    penalized logits saturate: 1e30 sends a seen negative logit to the most negative finite value, not -inf."""
    if penalty == 1.0 or history_ids.shape[-1] == 0:
        return logits
    info = torch.finfo(logits.dtype)
    r = min(max(penalty, info.tiny), info.max)
    return logits.scatter(-1, history_ids, _penalize(logits.gather(-1, history_ids), r))


def _penalize(logits: torch.Tensor, r: float | torch.Tensor) -> torch.Tensor:
    """The CTRL formula on every logit, saturated; `r` (a number, or (B, 1) per row) is within the dtype's
    normal range already."""
    return _saturate(torch.where(logits < 0, logits * r, _divide(logits, r)), logits)


def token_counts(history_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) counts of each token id in `history_ids` (B, L)."""
    counts = torch.zeros(history_ids.shape[0], vocab_size, device=history_ids.device)
    return counts.scatter_add_(-1, history_ids, torch.ones(history_ids.shape, device=history_ids.device))


def frequency_presence_penalty(
    logits: torch.Tensor, history_ids: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """OpenAI-style: subtract `frequency` per occurrence and `presence` once for each token in `history_ids`.

    The penalty is computed in float64 (a penalty of 1e300 times a count of 0 is 0 there, not inf * 0 = NaN as in
    float32) and the result saturates to the logits' finite range."""
    if (frequency == 0.0 and presence == 0.0) or history_ids.shape[-1] == 0:
        return logits
    return _subtract_counts(logits, token_counts(history_ids, logits.shape[-1]), frequency, presence)


def _subtract_counts(
    logits: torch.Tensor, counts: torch.Tensor, frequency: float | torch.Tensor, presence: float | torch.Tensor
) -> torch.Tensor:
    """z - (frequency * c + presence * [c > 0]) in float64, saturated; `counts` (B, V), the rates numbers or
    (B, 1) float64 per row (a row with both 0 subtracts exactly 0)."""
    counts = counts.double()
    penalty = frequency * counts + presence * (counts > 0).double()
    return _saturate(logits.double() - penalty, logits)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B,) the most likely token of each row (the first one on ties, as torch.argmax)."""
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) one token per row drawn from softmax(logits); -inf logits are never drawn."""
    probs = logits.float().softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _finite_number(name: str, value: object, ok: Callable[[float], bool], rule: str) -> float:
    """`value` as a float: a real number (not a bool), finite, and `ok`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SamplingParamsError(name, value, "must be a finite number")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        raise SamplingParamsError(name, value, "must be a finite number") from None
    if not math.isfinite(number):
        raise SamplingParamsError(name, value, "must be a finite number")
    if not ok(number):
        raise SamplingParamsError(name, value, rule)
    return number


def _integer(name: str, value: object, low: int, high: int | None = None) -> int:
    """`value` when it is an int (not a bool) in [low, high)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value >= high):
        rule = f"must be an integer >= {low}" if high is None else f"must be an integer in [{low}, {high})"
        raise SamplingParamsError(name, value, rule)
    return value


def _list_of(name: str, value: object, ok: Callable[[object], bool], rule: str) -> list:
    """`value` (a list or tuple) as a list, when every item is `ok`."""
    if not isinstance(value, list | tuple) or not all(ok(item) for item in value):
        raise SamplingParamsError(name, value, rule)
    return list(value)


def _is_stop_string(item: object) -> bool:
    return isinstance(item, str) and item != ""


def _is_id(item: object) -> bool:
    return isinstance(item, int) and not isinstance(item, bool) and item >= 0


_NUMBER_RULES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
    ("temperature", lambda v: v >= 0, "must be >= 0 (0 means greedy)"),
    ("top_p", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("min_p", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("repetition_penalty", lambda v: v > 0, "must be > 0 (1 means no penalty)"),
    ("frequency_penalty", lambda v: True, ""),
    ("presence_penalty", lambda v: True, ""),
)  # the float fields: (name, the check after "finite", the rule it states)


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. Invalid values raise `SamplingParamsError` (a ValueError)
    naming the field; numbers are stored as floats (temperature, top_p, min_p, the penalties)."""

    temperature: float = 1.0  # 0: greedy; (0, MIN_TEMPERATURE) scales as MIN_TEMPERATURE
    top_k: int = 0  # 0: off; k >= the vocabulary keeps every token
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; counts the prompt and the generated tokens (as transformers)
    frequency_penalty: float = 0.0  # counts generated tokens only (as the OpenAI API)
    presence_penalty: float = 0.0
    max_tokens: int = 256  # cut to the room left in the model's context (max_seq_len)
    stop: list[str] = field(default_factory=list)  # stop strings; the text ends before the first one
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the tokenizer's eos token
    ignore_eos: bool = False  # keep going after the eos token (benchmarks, parity tests)
    seed: int | None = None  # None: a fresh random seed; else an int in [0, 2**64)

    def __post_init__(self) -> None:
        for name, ok, rule in _NUMBER_RULES:
            setattr(self, name, _finite_number(name, getattr(self, name), ok, rule))
        self.top_k = _integer("top_k", self.top_k, 0)
        self.max_tokens = _integer("max_tokens", self.max_tokens, 1)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _list_of("stop", self.stop, _is_stop_string, "must be a list of non-empty strings")
        self.stop_token_ids = _list_of("stop_token_ids", self.stop_token_ids, _is_id, "must be a list of ids >= 0")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingParamsError("ignore_eos", self.ignore_eos, "must be True or False")
        if self.seed is not None:
            self.seed = _integer("seed", self.seed, 0, SEED_LIMIT)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    history_ids: torch.Tensor,
    output_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply the penalties and (unless greedy) the warpers of `params` to `logits` (B, V).

    history_ids (B, L): prompt and generated tokens, for the repetition penalty. output_ids (B, L'): the
    generated tokens alone, for the frequency and presence penalties (default: `history_ids`).
    """
    output_ids = history_ids if output_ids is None else output_ids
    logits = repetition_penalty(logits, history_ids, params.repetition_penalty)
    logits = frequency_presence_penalty(logits, output_ids, params.frequency_penalty, params.presence_penalty)
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) the next tokens from processed logits: argmax when greedy, else a draw."""
    return greedy(logits) if params.greedy else sample(logits, generator)


# -- a batch of sequences, each with its own parameters -------------------------------------------------------------

# the value of each per-row column that leaves a row's logits as they are (top_p -1: below every probability mass)
_OFF = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": -1.0,
    "min_p": 0.0,
    "repetition": 1.0,
    "frequency": 0.0,
    "presence": 0.0,
}
_KIND = {"top_k": torch.long, "frequency": torch.float64, "presence": torch.float64}  # the others: the logits' dtype


def _row_values(p: SamplingParams, vocab_size: int, info: torch.finfo) -> dict[str, float]:
    """One row's numbers, prepared as the single-row transforms prepare them, at `_OFF` where the row skips one."""
    warp = not p.greedy
    return {
        "temperature": max(p.temperature, MIN_TEMPERATURE) if warp else 1.0,
        "top_k": p.top_k if warp and p.top_k < vocab_size else 0,
        "top_p": 1 - p.top_p if warp and p.top_p < 1 else -1.0,
        "min_p": p.min_p if warp else 0.0,
        "repetition": min(max(p.repetition_penalty, info.tiny), info.max),
        "frequency": p.frequency_penalty,
        "presence": p.presence_penalty,
    }


@dataclass(frozen=True)
class SamplingRows:
    """The `SamplingParams` of B sequences as (B, 1) columns, one row each, in the form `process_rows` takes.

    A row that skips a transform holds the value that leaves its logits unchanged (`_OFF`: top-k 0, the top-p
    threshold -1, min-p 0, temperature and repetition penalty 1, frequency and presence 0); a greedy row holds it
    for every warper, so its processed logits are the penalized ones, as in `process_logits`. A column no row uses
    is None and its transform is skipped.
    """

    greedy: tuple[bool, ...]
    greedy_rows: torch.Tensor  # (B,) bool, the same
    temperature: torch.Tensor | None = None  # (B, 1) in the logits' dtype, at least MIN_TEMPERATURE
    top_k: torch.Tensor | None = None  # (B, 1) long
    top_k_max: int = 0
    top_p: torch.Tensor | None = None  # (B, 1) the threshold 1 - p
    min_p: torch.Tensor | None = None
    repetition: torch.Tensor | None = None  # (B, 1) within the dtype's normal range
    frequency: torch.Tensor | None = None  # (B, 1) float64
    presence: torch.Tensor | None = None  # (B, 1) float64

    @classmethod
    def of(
        cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> SamplingRows:  # fmt: skip
        """The rows of `params` (one per sequence) for logits (B, vocab_size) of `dtype` on `device`."""
        rows = [_row_values(p, vocab_size, torch.finfo(dtype)) for p in params]
        columns = {}
        for name, off in _OFF.items():
            values = [row[name] for row in rows]
            if any(v != off for v in values):
                columns[name] = torch.tensor(values, dtype=_KIND.get(name, dtype), device=device)[:, None]
        greedy = tuple(p.greedy for p in params)
        top_k_max = max(row["top_k"] for row in rows)
        return cls(greedy, torch.tensor(greedy, device=device), top_k_max=top_k_max, **columns)

    @property
    def penalizes(self) -> bool:
        """Whether a row has a penalty (only then does `process_rows` read a `TokenHistory`)."""
        return self.repetition is not None or self.frequency is not None or self.presence is not None


class TokenHistory:
    """What the penalties count, per row, as (B, V) tensors: `seen` marks every token of the prompt and the output
    (the repetition penalty), `counts` counts the output tokens (frequency and presence, float32 as
    `token_counts`)."""

    def __init__(self, seen: torch.Tensor, counts: torch.Tensor) -> None:
        self.seen, self.counts = seen, counts

    @classmethod
    def of(
        cls, prompts: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str = "cpu",
        outputs: Sequence[Sequence[int]] | None = None,
    ) -> TokenHistory:  # fmt: skip
        """The history of B rows, each a prompt and (default: none) the tokens generated after it."""
        outputs = outputs if outputs is not None else [[] for _ in prompts]
        seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
        counts = torch.zeros(len(prompts), vocab_size, device=device)
        for row, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
            seen[row, list(prompt) + list(output)] = True
            counts[row] = token_counts(torch.tensor([list(output)], dtype=torch.long, device=device), vocab_size)[0]
        return cls(seen, counts)

    def add(self, tokens: torch.Tensor) -> None:
        """Append one generated token (B,) to every row."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        self.seen[rows, tokens] = True
        self.counts[rows, tokens] += 1

    def select(self, rows: torch.Tensor) -> TokenHistory:
        """The history of `rows` (indices) only, in that order."""
        return TokenHistory(self.seen[rows], self.counts[rows])


def _top_k_rows(logits: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """`top_k_filter` with k (B, 1) per row (0: keep all): the k-th largest of each row, from one top-`k_max`."""
    kth = torch.topk(logits, k_max, dim=-1).values.gather(-1, (k - 1).clamp(min=0))
    return logits.masked_fill((logits < kth) & (k > 0), NEG_INF)


def process_rows(logits: torch.Tensor, rows: SamplingRows, history: TokenHistory | None) -> torch.Tensor:
    """`process_logits` for B sequences at once, each with its own parameters: row b of the result equals
    `process_logits(logits[b:b+1], params[b], its prompt and output, its output)` bit for bit (logits in the dtype
    `rows` was made for). `history` may be None when no row has a penalty (`rows.penalizes`)."""
    if rows.repetition is not None:
        logits = torch.where(history.seen, _penalize(logits, rows.repetition), logits)
    if rows.frequency is not None or rows.presence is not None:
        frequency, presence = (0.0 if c is None else c for c in (rows.frequency, rows.presence))
        logits = _subtract_counts(logits, history.counts, frequency, presence)
    if rows.temperature is not None:
        logits = _saturate(_divide(logits, rows.temperature), logits)
    if rows.top_k is not None:
        logits = _top_k_rows(logits, rows.top_k, rows.top_k_max)
    if rows.top_p is not None:
        logits = logits.masked_fill(_nucleus_drop(logits, rows.top_p), NEG_INF)
    if rows.min_p is not None:
        logits = min_p_filter(logits, rows.min_p)
    return logits


def sample_rows(logits: torch.Tensor, rows: SamplingRows, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """`next_token` for B sequences at once: (B,) the argmax of greedy rows, a draw for the others, each row with
    its own generator (`generators[b]`), so a row's tokens do not depend on which rows share its batch.

    One draw from softmax(z) with one sample is, as ATen's `multinomial` computes it, argmax_i p_i / E_i with
    E_i ~ Exp(1) drawn from the generator (the exponential race: P(i wins) = p_i). Each sampled row draws its V
    noises with its own generator, exactly as `multinomial(p[b:b+1], 1, generator)` would, and one argmax picks
    every row's token.
    """
    tokens = logits.argmax(dim=-1)
    sampled = [b for b, greedy in enumerate(rows.greedy) if not greedy]
    if not sampled:
        return tokens
    probs = logits.float().softmax(dim=-1)
    noise = torch.ones_like(probs)
    for b in sampled:
        noise[b].exponential_(1, generator=generators[b])
    return torch.where(rows.greedy_rows, tokens, (probs / noise).argmax(dim=-1))
