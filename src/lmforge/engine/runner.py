"""The model runner: one engine step is a few forwards of `Transformer.hidden_states` over the scheduled rows.

Row b is the b-th scheduled sequence's chunk: its tokens num_computed .. num_computed + n_b - 1, at explicit
positions num_computed + j. Rows are grouped so that no forward computes much padding (`pack`): the decoding rows
(n_b = 1) run as one (B, 1) forward, and the longer chunks (prefill chunks, a speculative verification's K + 1
tokens), longest first, in forwards of their own, each right-padded to its longest chunk while its padding stays
under `MAX_PADDING` of its positions (a step with 31 decode rows and one 512-token chunk computes 31 + 512
positions, not 32 x 512). The cache is a `BlockTableCache` over one pool: before each forward its rows are bound
to the sequences' block tables (cut to the blocks the forward reads, padded with the scratch block) and computed
lengths, so the model writes each real new token's keys at its slot and attends over the row's slots (masks built
from positions: a padded query sees nothing it should not, and padding goes to the scratch block). Copy-on-write
copies are made first.

Only the positions whose logits the caller asks for go through the head: by default the last position of each row
whose chunk reaches its last token (a prefill chunk that stops short just fills the cache); speculative decoding
asks for the last K + 1 positions of a row fed its K drafts. The logits come back in batch order whatever the
grouping.

`compile=True` runs the decode forward compiled (`compiled_step.DecodeStep`: the batch padded to a bucket, one graph
per batch bucket) for models `infer.static_decode` supports (others stay eager, as `generate` falls back); the
first decode forward, which allocates the pool, is eager. Short chunks ride it as one-token rows, one per token (a
flattened batch, as vLLM feeds its kernels): token j of a chunk at position start + j attends over slots up to its
own, and every layer stores all rows' new keys before any row reads them, so it sees the chunk's earlier tokens
of this very forward. The step takes them, shortest first, while its rows stay within the bucket its decoding rows
fill anyway, or the buckets an engine of `max_rows` rows compiles anyway (at most `RIDE`), so riding compiles no
graph the engine would not: a small prefill chunk or a speculative verification (K + 1 tokens) then costs a few
more rows of one compiled forward, where an eager forward of its own costs about as much as the whole compiled
step on a CPU (its Python per op). Each token reads its row's keys on its own, so long chunks stay eager.

A model with stacked LoRA adapters (`finetune.multi_lora`) gets each forward's (B,) adapter index, one per row (a
flattened chunk's tokens each carry their sequence's; padding rows 0): set on the layers' selector for an eager
forward, an input of the compiled step's graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmforge.engine.compiled_step import MIN_WIDTH, DecodeStep, bucket
from lmforge.engine.scheduler import ScheduledBatch
from lmforge.engine.sequence import Sequence as Seq
from lmforge.engine.swap import HostPools
from lmforge.engine.tuning import block_cache
from lmforge.finetune.multi_lora import selector_of
from lmforge.infer import static_decode

MAX_PADDING = 0.25  # at most this share of a multi-token forward's positions are padding
RIDE = 32  # tokens of short chunks the compiled one-token step takes as one-token rows (see the module docstring)

Rows = Sequence[tuple[Seq, int]]


def pack(lengths: Sequence[int], max_padding: float = MAX_PADDING, ride: int = 0) -> tuple[list[int], list[list[int]]]:
    """The forwards of a step as (the one-token forward's rows, the other forwards' rows), row indices in batch
    order: the rows of length 1 together; the longer rows by decreasing length, a row joining the group before it
    while the group, padded to its longest row, stays within `max_padding` of padding. With `ride` > 0 (a compiled
    one-token step), longer rows join the one-token forward as that many one-token rows, shortest first, while its
    tokens stay within max(ride, the bucket its rows of length 1 fill)."""
    singles = [b for b, n in enumerate(lengths) if n == 1]
    longer = sorted((b for b, n in enumerate(lengths) if n > 1), key=lambda b: -lengths[b])
    room = max(ride, bucket(len(singles)) if singles else 0) - len(singles) if ride else 0
    while longer and lengths[longer[-1]] <= room:
        room -= lengths[longer[-1]]
        singles.append(longer.pop())
    groups: list[list[int]] = []
    for b in longer:
        if groups and padding([lengths[r] for r in [*groups[-1], b]]) <= max_padding:
            groups[-1].append(b)
        else:
            groups.append([b])
    return sorted(singles), [sorted(group) for group in groups]


def padding(lengths: Sequence[int]) -> float:
    """The share of padding in a forward of rows of `lengths`, each padded to the longest."""
    return 1 - sum(lengths) / (max(lengths) * len(lengths))


class ModelRunner:
    """Runs scheduled batches of `model` over a pool of `num_blocks` blocks of `block_size` slots; `compile` runs
    the decode forward compiled (see the module docstring), `max_rows` the most one-token rows a step feeds it."""

    def __init__(
        self,
        model: nn.Module,
        num_blocks: int,
        block_size: int,
        compile: bool = False,
        swap_blocks: int = 0,
        max_rows: int = 1,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = block_cache(model, num_blocks, block_size)  # a prefix-tuned model's stores its prefix
        self.adapters = selector_of(model)  # stacked LoRA adapters: each forward's rows name theirs
        self.host = HostPools(swap_blocks) if swap_blocks else None  # swap space (`engine.swap`)
        self.tokens_computed = 0  # tokens fed to the model since the start (prefix caching skips some)
        self.decode_step = DecodeStep(model, self.cache) if compile and static_decode.supports(model) else None
        # short chunks ride within the buckets the step compiles anyway (`max_rows`: the most tokens it is ever fed
        # as one-token rows, max_num_seqs x (1 + speculative tokens)), at most RIDE
        self.ride = min(RIDE, bucket(max_rows)) if self.decode_step is not None else 0

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, logits_per_row: Sequence[int] | None = None) -> torch.Tensor:
        """(R, V) fp32 logits of the last `logits_per_row[b]` positions of each row b's chunk, rows in batch order
        and positions in order within a row; by default 1 for a row whose chunk ends at its last token, else 0."""
        rows = batch.rows
        if logits_per_row is None:
            logits_per_row = [int(seq.num_computed + n == len(seq.tokens)) for seq, n in rows]
        if self.host is not None:
            self.host.swap_out(self.cache, batch.swap_out)
            self.host.swap_in(self.cache, batch.swap_in)
        self.cache.copy_blocks(batch.copies)
        parts, source = [], []
        compiled = self.decode_step is not None and self.cache.allocated
        singles, groups = pack([n for _, n in rows], ride=self.ride if compiled else 0)
        for group in [singles] * bool(singles) + groups:
            counts = [logits_per_row[b] for b in group]
            parts.append(self._forward([rows[b] for b in group], counts, compiled and group is singles))
            source += [b for b, k in zip(group, counts, strict=True) for _ in range(k)]
        self.tokens_computed += batch.tokens
        if len(parts) == 1:  # one group, in batch order
            return parts[0]
        order = torch.tensor(source, dtype=torch.long).argsort(stable=True)  # group order -> batch order
        return torch.cat(parts)[order.to(self.device)]

    def _forward(self, rows: Rows, counts: list[int], compiled: bool) -> torch.Tensor:
        """The logits of the last counts[b] positions of each row of one forward (`compiled`: the one-token step)."""
        if compiled:
            return self._decode(rows, counts)
        ids, positions, mask, tables, starts = self._inputs(rows)
        if self.adapters is not None:
            self.adapters.index = self._adapter_index([seq for seq, _ in rows])
        self.cache.bind(tables, starts)
        h = self.model.hidden_states(ids, attention_mask=mask, position_ids=positions, cache=self.cache)
        which = [b for b, k in enumerate(counts) for _ in range(k)]
        cols = [j for (_, n), k in zip(rows, counts, strict=True) for j in range(n - k, n)]
        return self.model.logits(h[which, cols]).float()

    def _decode(self, rows: Rows, counts: list[int]) -> torch.Tensor:
        """Every token of `rows` as a one-token row of the compiled step, the rows padded to their bucket: a chunk's
        token j, at position start + j, attends over the chunk's tokens before it, as each layer stores every row's
        new keys before any row reads."""
        width = max(MIN_WIDTH, self._blocks(rows))
        tokens = [(seq, seq.num_computed + j) for seq, n in rows for j in range(n)]
        pad = bucket(len(tokens)) - len(tokens)
        tables = [self._table(seq, width) for seq, n in rows for _ in range(n)] + [[self.cache.scratch] * width] * pad
        starts = torch.tensor([at for _, at in tokens] + [0] * pad, device=self.device)
        ids = torch.tensor([seq.tokens[at] for seq, at in tokens] + [0] * pad, device=self.device)[:, None]
        index = None if self.adapters is None else self._adapter_index([seq for seq, _ in tokens], pad)
        logits = self.decode_step(ids, starts[:, None], torch.tensor(tables, device=self.device), starts, index)
        keep, first = [], 0
        for (_, n), k in zip(rows, counts, strict=True):  # a row's last k tokens
            keep += range(first + n - k, first + n)
            first += n
        return logits if len(keep) == len(logits) else logits[keep]

    def _adapter_index(self, seqs: list[Seq], pad: int = 0) -> torch.Tensor:
        """(B,) the LoRA adapter of each row of a forward (`pad` more rows: none), for the stacked layers."""
        return torch.tensor([seq.adapter for seq in seqs] + [0] * pad, device=self.device)

    def _blocks(self, rows: Rows) -> int:
        """The blocks the forward reads: enough for the longest row once its chunk is stored."""
        return -(-max(seq.num_computed + n for seq, n in rows) // self.cache.block_size)

    def _table(self, seq: Seq, width: int) -> list[int]:
        """The first `width` blocks of `seq`'s table, padded with the scratch block."""
        table = seq.block_table[:width]
        return table + [self.cache.scratch] * (width - len(table))

    def _inputs(self, rows: Rows) -> tuple[torch.Tensor | None, ...]:
        """(ids, positions, mask, tables, starts) of `rows` padded to the longest chunk (mask: None when no token is
        padding); tables (B, the blocks the forward reads)."""
        t, width = max(n for _, n in rows), self._blocks(rows)
        starts = torch.tensor([seq.num_computed for seq, _ in rows])
        lengths = torch.tensor([n for _, n in rows])
        ids = [seq.tokens[seq.num_computed : seq.num_computed + n] + [0] * (t - n) for seq, n in rows]
        tables = [self._table(seq, width) for seq, _ in rows]
        mask = torch.arange(t) < lengths[:, None]
        positions = torch.where(mask, starts[:, None] + torch.arange(t), 0)  # padding at 0: any position is masked
        device = self.device
        return (torch.tensor(ids, device=device), positions.to(device),
                None if bool(mask.all()) else mask.long().to(device), torch.tensor(tables, device=device),
                starts.to(device))  # fmt: skip
