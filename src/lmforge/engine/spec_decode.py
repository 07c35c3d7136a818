"""Speculative decoding inside the engine: drafts for the decoding rows, and one forward that verifies them all.

One engine step with speculation (`Engine.step`; the acceptance rules and their math are `speculative.py`'s):

    schedule   the scheduler gives each decoding row up to K lookahead slots (`ScheduledBatch.lookahead`)
    draft      a drafter proposes up to that many tokens per row:
                 ngram        `PromptLookup` over the row's tokens (no model; each draft a point mass)
                 draft_model  a second model over its own paged cache, `ModelRunner(draft, num_blocks, block_size)`
                              on the SAME block tables (the block manager's bookkeeping covers both caches). Its
                              first forward computes every token the target computes this step, prefill chunks
                              included, and gives each drafted row's first draft; K_b - 1 one-token forwards give
                              the others, each drawn from the draft's processed distribution q with the row's
                              generator (a greedy row: q's argmax, a point mass)
    verify     the target runs every row in one forward, a drafted row fed its last token and its K_b drafts
               (`runner.run(batch, logits_per_row=[K_b + 1, ...])`): p_1 .. p_{K_b + 1}
    accept     each position's logits are processed as the plain path processes them (`sampling.process_rows`:
               the penalties at position i see the row's tokens and its drafts before i, then temperature, top-k,
               top-p, min-p); greedy rows accept while the draft is the argmax (`accept_greedy`), sampled rows by
               speculative sampling with p = softmax of the processed logits (`accept_sampled`)
    roll back  the engine records the emitted tokens in order through the row's stop rules and budget (a stop
               drops what follows it), sets the computed length to the kept tokens and gives back the blocks of
               the drafts it did not keep (`BlockManager.truncate`); rejected drafts' slots lie past the computed
               length, so no named (prefix-cached) block ever holds one

The draft cache lags the target's by one token after a round that kept every draft and the bonus token (the last
draft was never fed to the draft model): `Sequence.draft_lag`. Its next first forward starts one token earlier,
and until then the block holding that token is not named in the prefix cache (a hit gives both models their keys).

Which rows speculate: every decoding row, whatever its sampling parameters (greedy or sampled, penalties, warpers,
stop strings and ids, logprobs, the samples of n / best_of once forked), while its budget leaves room for two
tokens. A row's first token is drawn the plain way (at the end of its prompt), and so is the token of a row for
which no draft was found (ngram) or no room was left. Greedy rows give exactly the tokens of plain decoding; sampled
rows give tokens distributed as plain sampling's, but not the same draws for a seed (speculative sampling consumes
the generator differently).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.configfile import check
from lmforge.engine.runner import ModelRunner
from lmforge.engine.scheduler import ScheduledBatch
from lmforge.engine.sequence import Sequence
from lmforge.engine.speculative import PromptLookup, Proposal, SpeculativeConfig, accept_greedy, accept_sampled
from lmforge.infer.decode import NonFiniteLogitsError
from lmforge.infer.sampling import SamplingRows, TokenHistory, process_rows, sample_rows
from lmforge.io.load import load_model
from lmforge.tokenizer.base import BaseTokenizer


@dataclass
class Draft:
    """One row's draft tokens; `q` (K_b, V) the draft's probabilities they were drawn from (None: point masses);
    `computed` the row's tokens the draft model's cache holds once drafting is done (None: no draft cache)."""

    tokens: list[int]
    q: torch.Tensor | None = None
    computed: int | None = None


class Drafter(Protocol):
    def propose(self, batch: ScheduledBatch) -> list[Draft | None]:
        """A draft for each row of `batch` (at most its lookahead slots); None: the row decodes plainly."""


class LookupDrafter:
    """Prompt lookup: each row with slots drafts what followed the most recent earlier occurrence of its last
    n-gram (`PromptLookup`)."""

    def __init__(self, lookup: PromptLookup) -> None:
        self.lookup = lookup

    def propose(self, batch: ScheduledBatch) -> list[Draft | None]:
        rows = zip(batch.rows, batch.lookahead, strict=True)
        drafts = [self.lookup.lookup(seq.tokens, k) if k else [] for (seq, _), k in rows]
        return [Draft(tokens) if tokens else None for tokens in drafts]


class ModelDrafter:
    """A draft model over its own paged cache on the engine's block tables (see the module docstring)."""

    def __init__(
        self, model: nn.Module, num_blocks: int, block_size: int, known: int, compile: bool = False,
        swap_blocks: int = 0, max_rows: int = 1,
    ) -> None:  # fmt: skip
        self.runner = ModelRunner(model, num_blocks, block_size, compile, swap_blocks, max_rows)
        self.known = known

    def propose(self, batch: ScheduledBatch) -> list[Draft | None]:
        rows, slots = batch.rows, batch.lookahead
        chunks = [(_view(seq, seq.tokens, seq.num_computed - seq.draft_lag), n + seq.draft_lag) for seq, n in rows]
        for seq, _ in rows:
            seq.draft_lag = 0
        logits = self.runner.run(replace(batch, rows=chunks), [int(k > 0) for k in slots])
        live = [b for b, k in enumerate(slots) if k]  # the rows still drafting, whose logits `logits` holds
        tokens: dict[int, list[int]] = {b: [] for b in live}
        probs: dict[int, list[torch.Tensor]] = {b: [] for b in live}
        while live:
            drawn, q = self._draw(logits, [rows[b][0] for b in live], [tokens[b] for b in live])
            for i, b in enumerate(live):
                tokens[b].append(drawn[i])
                probs[b].append(q[i])
            live = [b for b in live if len(tokens[b]) < slots[b]]
            if live:  # feed each its newest draft
                fed = [rows[b][0] for b in live]
                feed = [(_view(seq, seq.tokens + tokens[b], len(seq.tokens) + len(tokens[b]) - 1), 1)
                        for seq, b in zip(fed, live, strict=True)]  # fmt: skip
                logits = self.runner.run(ScheduledBatch(feed), [1] * len(feed))
        return [self._draft(seq, tokens[b], probs[b]) if b in tokens else None for b, (seq, _) in enumerate(rows)]

    @staticmethod
    def _draft(seq: Sequence, tokens: list[int], probs: list[torch.Tensor]) -> Draft:
        """`seq`'s draft: its q unless greedy (a point mass); the draft cache holds its tokens and every draft but
        the last."""
        return Draft(tokens, None if seq.state.params.greedy else torch.stack(probs), len(seq.tokens) + len(tokens) - 1)

    def _draw(
        self, logits: torch.Tensor, seqs: list[Sequence], drafted: list[list[int]]
    ) -> tuple[list[int], torch.Tensor]:
        """Each row's next draft (a draw from its processed distribution with its generator; greedy: the argmax)
        and the probabilities (B, V) it was drawn from."""
        logits, rows = processed(masked(logits, self.known, "the draft model's"), seqs, drafted)
        tokens = sample_rows(logits, rows, [seq.state.generator for seq in seqs])
        return tokens.tolist(), logits.softmax(dim=-1)


def _view(seq: Sequence, tokens: list[int], computed: int) -> Sequence:
    """`seq`'s blocks seen with other tokens and computed length (what a draft forward feeds the runner)."""
    return Sequence(tokens, seq.prompt_len, block_table=seq.block_table, num_computed=computed)


def masked(logits: torch.Tensor, known: int, source: str) -> torch.Tensor:
    """`logits` (R, V) checked finite, ids past the tokenizer's `known` ones set to -inf (never drawn), in place."""
    if not bool(logits.isfinite().all()):
        raise NonFiniteLogitsError(f"{source} logits are NaN or inf while speculating: its weights or activations "
                                   "overflow (float32 may help)")  # fmt: skip
    if logits.shape[-1] > known:
        logits[..., known:] = float("-inf")
    return logits


def processed(
    logits: torch.Tensor, seqs: list[Sequence], drafted: list[list[int]]
) -> tuple[torch.Tensor, SamplingRows]:
    """Row r of `logits` (R, V) as the plain path samples from it (`process_rows`): the penalties of `seqs[r]`'s
    parameters over its prompt, its output and `drafted[r]` (the drafts before this position), then its warpers;
    and the rows' sampling parameters."""
    rows = SamplingRows.of([seq.state.params for seq in seqs], logits.shape[-1], logits.device)
    history = None  # read by process_rows only when a row has a penalty
    if rows.penalizes:
        outputs = [seq.output + extra for seq, extra in zip(seqs, drafted, strict=True)]
        history = TokenHistory.of([seq.state.prompt for seq in seqs], logits.shape[-1], logits.device, outputs)
    return process_rows(logits, rows, history), rows


def verify(seqs: list[Sequence], drafts: list[Draft], logits: torch.Tensor) -> list[list[int]]:
    """Each row's emitted tokens (its accepted drafts, then one from the target), from the target's logits at its
    K_b + 1 positions (`logits` (sum of K_b + 1, V), rows in order, masked), by the acceptance rules."""
    sizes = [len(d.tokens) + 1 for d in drafts]
    owners = [seq for seq, size in zip(seqs, sizes, strict=True) for _ in range(size)]
    before = [d.tokens[:i] for d in drafts for i in range(len(d.tokens) + 1)]
    positions = processed(logits, owners, before)[0].split(sizes)
    k, vocab = max(sizes) - 1, logits.shape[-1]
    target = logits.new_zeros(len(seqs), k + 1, vocab)  # padded past each row's positions (never read)
    for b, rows in enumerate(positions):
        target[b, : len(rows)] = rows
    tokens = torch.tensor([d.tokens + [0] * (k - len(d.tokens)) for d in drafts], device=logits.device)
    counts = torch.tensor([len(d.tokens) for d in drafts], device=logits.device)
    emitted: list[list[int]] = [[] for _ in seqs]
    greedy = [b for b, seq in enumerate(seqs) if seq.state.params.greedy]
    sampled = [b for b, seq in enumerate(seqs) if not seq.state.params.greedy]
    if greedy:
        result = accept_greedy(Proposal(tokens[greedy], counts[greedy]), target[greedy])
        for b, row in zip(greedy, result.rows(), strict=True):
            emitted[b] = row
    if sampled:
        q = _draft_probs([drafts[b] for b in sampled], k, vocab, logits.device)
        generators = [seqs[b].state.generator for b in sampled]
        proposal = Proposal(tokens[sampled], counts[sampled], q)
        result = accept_sampled(proposal, target[sampled].softmax(dim=-1), generators)
        for b, row in zip(sampled, result.rows(), strict=True):
            emitted[b] = row
    return emitted


def _draft_probs(drafts: list[Draft], k: int, vocab: int, device: torch.device) -> torch.Tensor | None:
    """(B, k, V) the drafts' q, zero-padded (a point-mass draft's row one-hot); None when every draft is a point
    mass."""
    if all(d.q is None for d in drafts):
        return None
    q = torch.zeros(len(drafts), k, vocab, device=device)
    for b, d in enumerate(drafts):
        ids = torch.tensor(d.tokens, device=device)
        q[b, : len(d.tokens)] = F.one_hot(ids, vocab).float() if d.q is None else d.q
    return q


def load_draft(config: SpeculativeConfig, target: nn.Module, tokenizer: BaseTokenizer, max_model_len: int) -> nn.Module:
    """The draft model of `config` on the target's device (a checkpoint path is loaded in the target's dtype),
    checked: an lmforge model with the target's vocabulary and room for `max_model_len` positions."""
    model, name, shown = config.model, "speculative_config.model", config.model
    first = next(target.parameters())
    if isinstance(model, str | Path):
        model, found = load_model(model, first.dtype)
        check(found is None or found.get_vocab() == tokenizer.get_vocab(), name, str(shown),
              "its tokenizer differs from the target's (a draft must share the target's vocabulary)")  # fmt: skip
    else:
        shown = type(model).__name__
    check(hasattr(model, "config") and hasattr(model, "hidden_states"), name, shown,
          "must be an lmforge model (a Transformer) or a checkpoint path")  # fmt: skip
    ids, target_ids = model.config.vocab_size, target.config.vocab_size
    rule = f"its vocabulary has {ids} ids, the target's {target_ids} (a draft must share the target's tokenizer)"
    check(ids == target_ids, name, shown, rule)
    check(model.config.max_seq_len >= max_model_len, name, shown,
          f"its context ({model.config.max_seq_len}) must hold max_model_len ({max_model_len}) tokens")  # fmt: skip
    return model.to(first.device).eval()


def drafter(config: SpeculativeConfig | None, draft: nn.Module | None, num_blocks: int, block_size: int, known: int,
            compile: bool = False, swap_blocks: int = 0, max_rows: int = 1) -> Drafter | None:  # fmt: skip
    """The engine's drafter for `config` (None: no speculation); `draft` the loaded draft model (draft_model), run
    compiled with `compile` (`max_rows`: as the engine's runner), its cache swapping on the engine's `swap_blocks`
    host blocks."""
    if config is None:
        return None
    if config.method == "ngram":
        return LookupDrafter(config.lookup())
    return ModelDrafter(draft, num_blocks, block_size, known, compile, swap_blocks, max_rows)
