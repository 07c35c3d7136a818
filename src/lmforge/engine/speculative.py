"""Speculative decoding: a cheap draft proposes K tokens, the target model checks them in one forward.

A draft proposes x_1..x_K, each x_i drawn from its distribution q_i(. | prefix, x_<i). One target forward over the
prefix + x_1..x_K gives the target's distributions p_1..p_{K+1} (p_i: the next token after x_<i). Then, with
u_i ~ U[0, 1) (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al.
2023, "Accelerating Large Language Model Decoding with Speculative Sampling"):

    accept x_i  while  u_i < p_i(x_i) / q_i(x_i)          (probability min(1, p_i(x_i) / q_i(x_i)))
    at the first rejection i:  emit y ~ norm(max(0, p_i - q_i))    (the residual)
    all K accepted:            emit y ~ p_{K+1}                     (the bonus token)

Every round emits between 1 and K + 1 tokens, and each is distributed exactly as the target alone would sample
it: P(y = x) = q(x) min(1, p(x)/q(x)) + (1 - sum_z min(p(z), q(z))) max(0, p(x) - q(x)) / sum_z max(0, p(z) - q(z))
= min(p(x), q(x)) + max(0, p(x) - q(x)) = p(x). A draft with no distribution (prompt lookup, a greedy draft) is
a point mass q = one_hot(x): accept with probability p(x), else draw from p with x removed.

Greedy (temperature 0): accept while x_i == argmax p_i, then emit argmax p_{n+1} at the first mismatch (or after
the last draft): the output is token for token what greedy decoding of the target gives.

Rows: every function works on B rows at once, each row with its own draft length K_b <= K (`Proposal.counts`; a
position past K_b counts as rejected with q = 0, so the residual there is p itself) and its own generator, drawn
from in a fixed order (K uniforms, then V exponentials for the one draw), so a row's tokens never depend on the
rows beside it. One draw from unnormalised weights w is argmax_v w_v / E_v with E_v ~ Exp(1) (the exponential
race that `torch.multinomial` and `sampling.sample_rows` use): P(v) = w_v / sum w.

Proposers map the rows' tokens so far to a `Proposal`: `PromptLookup` (n-gram: the tokens that followed the most
recent earlier occurrence of the row's last n tokens, n from max_n down to min_n; no model, no distribution) and
`DraftModel` (a small model run K times, sampled with the row's generator or greedy).

`SpeculativeConfig` is the engine's option, in vLLM's shape (`Engine(..., speculative_config=...)`, a dict or the
dataclass): `{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}`
or `{"model": <nn.Module or checkpoint path>, "num_speculative_tokens": 4}` (method "draft_model"). The engine's
side of the protocol (drafts per decoding row, one verifying forward, rollback) is `engine.spec_decode`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.configfile import check, check_choice, check_positive, unknown

__all__ = ["Acceptance", "DraftModel", "PromptLookup", "Proposal", "Proposer", "SpeculativeConfig", "accept_greedy",
           "accept_sampled", "residual"]  # fmt: skip

PAD = -1  # fills `Acceptance.tokens` past each row's emitted tokens


@dataclass
class Proposal:
    """K draft tokens per row.

    tokens: (B, K) long; row b's drafts are tokens[b, :counts[b]] (the rest is padding, never accepted).
    counts: (B,) long, the number of drafts of each row (0 <= counts <= K).
    q: (B, K, V) the draft's probabilities at each position; None: each draft is a point mass (its q is 1).
    """

    tokens: torch.Tensor
    counts: torch.Tensor
    q: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Proposal:
        """The proposal on `device` (a proposer works where it likes; verification where the target's logits are)."""
        q = None if self.q is None else self.q.to(device)
        return Proposal(self.tokens.to(device), self.counts.to(device), q)


Proposer = Callable[[Sequence[Sequence[int]], int], Proposal]
"""(each row's tokens so far, K) -> up to K draft tokens per row (and their q when the draft samples)."""


@dataclass
class Acceptance:
    """The outcome of one verification round.

    tokens: (B, K + 1) long; row b emits tokens[b, :accepted[b] + 1]: its accepted drafts, then one token drawn
        from the target (the residual at the first rejection, or the bonus after the last draft); `PAD` after.
    accepted: (B,) long, how many drafts each row accepted.
    """

    tokens: torch.Tensor
    accepted: torch.Tensor

    def rows(self) -> list[list[int]]:
        """Each row's emitted tokens."""
        return [t[: n + 1] for t, n in zip(self.tokens.tolist(), self.accepted.tolist(), strict=True)]


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(0, p - q): the unnormalised distribution to draw from after a rejection (Leviathan et al., eq. 3)."""
    return (p - q).clamp(min=0)


def _drafted(proposal: Proposal) -> torch.Tensor:
    """(B, K) bool: the position holds a real draft of its row."""
    k = proposal.tokens.shape[1]
    return torch.arange(k, device=proposal.tokens.device) < proposal.counts[:, None]


def _emit(proposal: Proposal, accepted: torch.Tensor, last: torch.Tensor) -> Acceptance:
    """Row b's accepted drafts, then `last[b]`, padded with `PAD`."""
    b, k = proposal.tokens.shape
    cols = torch.arange(k + 1, device=last.device)
    padded = torch.cat((proposal.tokens, torch.full((b, 1), PAD, dtype=torch.long, device=last.device)), dim=1)
    tokens = torch.where(cols < accepted[:, None], padded, PAD)
    tokens[torch.arange(b, device=last.device), accepted] = last
    return Acceptance(tokens, accepted)


def _leading(ok: torch.Tensor) -> torch.Tensor:
    """(B,) the number of leading True entries of each row of `ok` (B, K)."""
    return ok.long().cumprod(dim=1).sum(dim=1)


def accept_greedy(proposal: Proposal, target_logits: torch.Tensor) -> Acceptance:
    """Greedy verification: accept while the draft equals the target's argmax, then emit the target's argmax.

    target_logits: (B, K + 1, V), position i scoring the token after the prefix and drafts x_<i (probabilities
    work as well: only the argmax is used).
    """
    proposal = proposal.to(target_logits.device)
    best = target_logits.argmax(dim=-1)  # (B, K + 1)
    k = proposal.tokens.shape[1]
    accepted = _leading((proposal.tokens == best[:, :k]) & _drafted(proposal))
    return _emit(proposal, accepted, best.gather(1, accepted[:, None])[:, 0])


def accept_sampled(proposal: Proposal, p: torch.Tensor, generators: Sequence[torch.Generator]) -> Acceptance:
    """Speculative sampling: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection draw
    from norm(max(0, p_i - q_i)), after the last draft from p_{K_b + 1} (see the module docstring).

    p: (B, K + 1, V) the target's probabilities (after temperature and the other warpers: the distribution the
    target alone would sample from); generators: one per row.
    """
    proposal = proposal.to(p.device)
    b, k = proposal.tokens.shape
    if p.shape[:2] != (b, k + 1):
        raise ValueError(f"p has shape {tuple(p.shape)}; expected (B, K + 1, V) with B = {b}, K = {k}")
    rows = torch.arange(b, device=p.device)
    drafted = _drafted(proposal)
    x = proposal.tokens.clamp(min=0)
    p_x = p[:, :k].gather(2, x[..., None])[..., 0]
    q_x = torch.ones_like(p_x) if proposal.q is None else proposal.q.gather(2, x[..., None])[..., 0]
    u = torch.empty(b, k, device=p.device)
    for row, generator in zip(u, generators, strict=True):
        row.uniform_(0, 1, generator=generator)
    accepted = _leading((u * q_x.float() < p_x.float()) & drafted)  # u < p/q, without dividing by q
    p_n = p[rows, accepted]  # (B, V) the target at the first rejection (or after the last draft)
    q_n = _q_at(proposal, accepted, p)
    weights = residual(p_n, q_n)
    weights = torch.where(weights.sum(dim=-1, keepdim=True) > 0, weights, p_n)  # p == q: no rejection was possible
    return _emit(proposal, accepted, _race(weights, generators))


def _q_at(proposal: Proposal, position: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(B, V) the draft's q at `position` of each row; 0 where the row has no draft there."""
    b, k = proposal.tokens.shape
    q = torch.zeros_like(p[:, 0])
    if k == 0:
        return q
    rows, col = torch.arange(b, device=p.device), position.clamp(max=k - 1)
    if proposal.q is None:
        q[rows, proposal.tokens[rows, col].clamp(min=0)] = 1.0
    else:
        q = proposal.q[rows, col].to(p.dtype)
    return torch.where((position < proposal.counts)[:, None], q, 0.0)


def _race(weights: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """(B,) one draw per row from unnormalised `weights` (B, V): argmax w / E, E ~ Exp(1) from the row's generator."""
    noise = torch.empty_like(weights)
    for row, generator in zip(noise, generators, strict=True):
        row.exponential_(1, generator=generator)
    return (weights / noise).argmax(dim=-1)


@dataclass(frozen=True)
class PromptLookup:
    """The n-gram (prompt lookup) proposer: for n = max_n down to min_n, find the most recent earlier occurrence of
    the row's last n tokens and propose the (up to K) tokens that followed it; no match: no draft."""

    max_n: int = 3
    min_n: int = 1

    def __post_init__(self) -> None:
        _check_ngram_lengths(("PromptLookup.max_n", self.max_n), ("PromptLookup.min_n", self.min_n))

    def __call__(self, rows: Sequence[Sequence[int]], k: int) -> Proposal:
        drafts = [self.lookup(list(row), k) for row in rows]
        tokens = torch.zeros(len(rows), k, dtype=torch.long)
        for b, draft in enumerate(drafts):
            tokens[b, : len(draft)] = torch.tensor(draft, dtype=torch.long)
        return Proposal(tokens, torch.tensor([len(d) for d in drafts], dtype=torch.long))

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """The draft of one row."""
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # most recent first, the tail itself excluded
                if tokens[start : start + n] == tail:
                    return tokens[start + n : start + n + k]
        return []


def _check_ngram_lengths(longest: tuple[str, Any], shortest: tuple[str, Any]) -> None:
    """Both (name, value) are positive integers, the longest >= the shortest."""
    for name, value in (shortest, longest):
        check_positive(name, value)
    check(longest[1] >= shortest[1], longest[0], longest[1], f"must be >= {shortest[0]} ({shortest[1]})")


class DraftModel:
    """A draft model as a proposer: K autoregressive steps of `next_probs(rows) -> (B, V)` probabilities (the draft
    after its own temperature and warpers), each token drawn with the row's generator (it may be the one the row's
    verification draws from: the order of the draws stays fixed); `generators=None` drafts greedily (argmax), a
    point mass, so the proposal carries no q. The engine's draft runs over its own KV cache; this one calls
    `next_probs` on the whole rows, which is what a test's toy model or a cache-less reference needs."""

    def __init__(
        self,
        next_probs: Callable[[list[list[int]]], torch.Tensor],
        generators: Sequence[torch.Generator] | None = None,
    ) -> None:
        self.next_probs = next_probs
        self.generators = generators

    def __call__(self, rows: Sequence[Sequence[int]], k: int) -> Proposal:
        check_positive("the number of draft tokens", k)
        grown = [list(row) for row in rows]
        tokens, qs = [], []
        for _ in range(k):
            q = self.next_probs(grown)
            token = q.argmax(dim=-1) if self.generators is None else _race(q, self.generators)
            for row, t in zip(grown, token.tolist(), strict=True):
                row.append(t)
            tokens.append(token)
            qs.append(q)
        stacked = torch.stack(tokens, dim=1)
        counts = torch.full((len(rows),), k, dtype=torch.long, device=stacked.device)
        return Proposal(stacked, counts, None if self.generators is None else torch.stack(qs, dim=1))


METHODS = ("ngram", "draft_model")


@dataclass(frozen=True, eq=False)
class SpeculativeConfig:
    """How the engine speculates (see the module docstring); a wrong value raises `ConfigError` naming the field.

    method: "ngram" (prompt lookup) or "draft_model" (the default when `model` is given).
    num_speculative_tokens: K, the most drafts a decoding row feeds per step.
    prompt_lookup_max / prompt_lookup_min: the n-gram lengths prompt lookup tries (ngram).
    model: the draft model (draft_model), an `nn.Module` or a checkpoint path; it must share the target's
        tokenizer (the engine checks the vocabulary).
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    model: nn.Module | str | Path | None = None

    def __post_init__(self) -> None:
        check_choice("speculative_config.method", self.method, METHODS)
        check_positive("speculative_config.num_speculative_tokens", self.num_speculative_tokens)
        _check_ngram_lengths(("speculative_config.prompt_lookup_max", self.prompt_lookup_max),
                             ("speculative_config.prompt_lookup_min", self.prompt_lookup_min))  # fmt: skip
        drafts = self.method == "draft_model"
        check(self.model is None or drafts, "speculative_config.model", _shown(self.model),
              'is for method "draft_model" only')  # fmt: skip
        check(self.model is not None or not drafts, "speculative_config.model", None,
              'method "draft_model" needs the draft model (an nn.Module or a checkpoint path)')  # fmt: skip
        check(self.model is None or isinstance(self.model, nn.Module | str | Path), "speculative_config.model",
              _shown(self.model), "must be an nn.Module or a checkpoint path")  # fmt: skip

    @classmethod
    def of(cls, value: SpeculativeConfig | Mapping[str, Any] | None) -> SpeculativeConfig | None:
        """The config of `value`: None (no speculation), the dataclass, or a dict of its fields (vLLM's form)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        check(isinstance(value, Mapping), "speculative_config", value, "must be None, a dict or a SpeculativeConfig")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in value:
            if key not in names:
                raise unknown("speculative_config field", str(key), names)
        fields = dict(value)
        fields.setdefault("method", "draft_model" if fields.get("model") is not None else "ngram")
        return cls(**fields)

    def lookup(self) -> PromptLookup:
        return PromptLookup(self.prompt_lookup_max, self.prompt_lookup_min)


def _shown(model: object) -> object:
    """`model` as an error message shows it (a module by its class, not its whole repr)."""
    return type(model).__name__ if isinstance(model, nn.Module) else model
