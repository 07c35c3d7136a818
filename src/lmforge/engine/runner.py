"""The model runner: one engine step is one forward of `Transformer.hidden_states` over the scheduled rows.

Row b of the (B, T) batch is the b-th scheduled sequence's chunk: its tokens num_computed .. num_computed + n_b - 1
(T = the longest chunk; a decoding row has n_b = 1), right-padded with attention mask 0, at explicit positions
num_computed + j. The cache is a `BlockTableCache` over one pool: before the forward its rows are bound to the
sequences' block tables and computed lengths, so the model writes each real new token's keys at its slot and
attends over the row's blocks (masks built from positions: a padded query sees nothing it should not, and padding
is never stored). Copy-on-write copies are made first. Only rows whose chunk reaches their last token need logits
(the head runs on those positions alone); a prefill chunk that stops short just fills the cache.
"""

from __future__ import annotations

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
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """(R, V) fp32 next-token logits of the rows whose chunk ends at their last token, in batch order."""
        rows = batch.rows
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
        last = [b for b, (seq, n) in enumerate(rows) if seq.num_computed + n == len(seq.tokens)]
        cols = [rows[b][1] - 1 for b in last]
        return self.model.logits(h[last, cols]).float()
