"""The model runner: one engine step is one forward of `Transformer.hidden_states` over the scheduled rows.

Row b of the (B, T) batch is the b-th scheduled sequence's chunk: its tokens num_computed .. num_computed + n_b - 1
(T = the longest chunk; a decoding row has n_b = 1), right-padded with attention mask 0, at explicit positions
num_computed + j. The cache is a `BlockTableCache` over one pool: before the forward its rows are bound to the
sequences' block tables and computed lengths, so the model writes each real new token's keys at its slot and
attends over the row's blocks (masks built from positions: a padded query sees nothing it should not, and padding
is never stored). Copy-on-write copies are made first. Only the positions whose logits the caller asks for go
through the head: by default the last position of each row whose chunk reaches its last token (a prefill chunk
that stops short just fills the cache); speculative decoding asks for the last K + 1 positions of a row fed its
K drafts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmforge.engine.scheduler import ScheduledBatch
from lmforge.infer.paged_cache import BlockTableCache


class ModelRunner:
    """Runs scheduled batches of `model` over a pool of `num_blocks` blocks of `block_size` slots."""

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = BlockTableCache(num_blocks, block_size)
        self.tokens_computed = 0  # tokens fed to the model since the start (prefix caching skips some)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, logits_per_row: Sequence[int] | None = None) -> torch.Tensor:
        """(R, V) fp32 logits of the last `logits_per_row[b]` positions of each row b's chunk, rows in batch order
        and positions in order within a row; by default 1 for a row whose chunk ends at its last token, else 0."""
        rows = batch.rows
        if logits_per_row is None:
            logits_per_row = [int(seq.num_computed + n == len(seq.tokens)) for seq, n in rows]
        width = max(n for _, n in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, (seq, n) in enumerate(rows):
            start = seq.num_computed
            ids[b, :n] = torch.tensor(seq.tokens[start : start + n])
            positions[b, :n] = torch.arange(start, start + n)
            mask[b, :n] = 1
        self.cache.copy_blocks(batch.copies)
        self.cache.bind([seq.block_table for seq, _ in rows], [seq.num_computed for seq, _ in rows], self.device)
        ids, positions, mask = ids.to(self.device), positions.to(self.device), mask.to(self.device)
        h = self.model.hidden_states(ids, attention_mask=mask, position_ids=positions, cache=self.cache)
        self.tokens_computed += batch.tokens
        which = [b for b, k in enumerate(logits_per_row) for _ in range(k)]
        cols = [j for (_, n), k in zip(rows, logits_per_row, strict=True) for j in range(n - k, n)]
        return self.model.logits(h[which, cols]).float()
