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

References: Holtzman et al. 2019 (nucleus), Keskar et al. 2019 (CTRL repetition penalty), Nguyen et al.
2024 (min-p), the OpenAI API reference (frequency and presence penalties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to scale logits (0 means greedy), got {temperature}")
    return logits / temperature


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
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    mass_up_to = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_up_to <= 1 - p
    drop_sorted[..., -1] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)  # at least one token
    return logits.masked_fill(drop, NEG_INF)


def repetition_penalty(logits: torch.Tensor, history_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty on every token in `history_ids` (B, L), once per token however often it occurs."""
    if penalty == 1.0 or history_ids.shape[-1] == 0:
        return logits
    seen = logits.gather(-1, history_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(-1, history_ids, seen)


def token_counts(history_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) counts of each token id in `history_ids` (B, L)."""
    counts = torch.zeros(history_ids.shape[0], vocab_size, device=history_ids.device)
    return counts.scatter_add_(-1, history_ids, torch.ones(history_ids.shape, device=history_ids.device))


def frequency_presence_penalty(
    logits: torch.Tensor, history_ids: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """OpenAI-style: subtract `frequency` per occurrence and `presence` once for each token in `history_ids`."""
    if (frequency == 0.0 and presence == 0.0) or history_ids.shape[-1] == 0:
        return logits
    counts = token_counts(history_ids, logits.shape[-1]).to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B,) the most likely token of each row (the first one on ties, as torch.argmax)."""
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) one token per row drawn from softmax(logits); -inf logits are never drawn."""
    probs = logits.float().softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _bad(name: str, value: object, rule: str) -> ValueError:
    return ValueError(f"SamplingParams.{name}={value!r}: {rule}")


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. Invalid values raise ValueError naming the field."""

    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; counts the prompt and the generated tokens (as transformers)
    frequency_penalty: float = 0.0  # counts generated tokens only (as the OpenAI API)
    presence_penalty: float = 0.0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings; the text ends before the first one
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the tokenizer's eos token
    ignore_eos: bool = False  # keep going after the eos token (benchmarks, parity tests)
    seed: int | None = None

    def __post_init__(self) -> None:
        def number(name: str, ok, rule: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise _bad(name, value, "must be a finite number")
            if not ok(value):
                raise _bad(name, value, rule)

        number("temperature", lambda v: v >= 0, "must be >= 0 (0 means greedy)")
        number("top_p", lambda v: 0 <= v <= 1, "must be in [0, 1]")
        number("min_p", lambda v: 0 <= v <= 1, "must be in [0, 1]")
        number("repetition_penalty", lambda v: v > 0, "must be > 0 (1 means no penalty)")
        number("frequency_penalty", lambda v: True, "")
        number("presence_penalty", lambda v: True, "")
        for name, low in (("top_k", 0), ("max_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _bad(name, value, f"must be an integer >= {low}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise _bad("stop", self.stop, "must be a list of non-empty strings")
        self.stop_token_ids = list(self.stop_token_ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise _bad("stop_token_ids", self.stop_token_ids, "must be a list of token ids >= 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise _bad("seed", self.seed, "must be an integer or None")

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
