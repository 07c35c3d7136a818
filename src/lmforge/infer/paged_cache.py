"""A paged KV cache, the reference a paged engine builds on: fixed-size blocks in a pool, per-row block tables.

Storage (`BlockPools`): for each layer and tensor one pool of `n_blocks` blocks of `block_size` slots,
(n_blocks, ..., block_size, d). A row (sequence) owns a block table, a list of block ids; its slot s lives in
block table[s // block_size] at offset s % block_size. Rows grow by taking free blocks as their tokens arrive, and
give them back when they leave (`remove_rows`), so memory follows the tokens actually held instead of
batch x max_len.

Attention (the reference): gather the slots each row attends over into a contiguous (B, ..., S, d) view and call
the layer's `fn` (`Cache.attend`'s default); a block-table kernel would read the pool directly. The (block,
offset) index of every slot read is computed once per forward, shared by every layer and tensor, so a layer's read
is one gather of exactly the S slots it needs. Row bookkeeping (per-row lengths and positions, where the real new
tokens go) is `kv_cache.RowCache`'s.

Blocks are reference-counted, so a caller (an engine's block manager, prefix caching) can start a row on blocks
that hold tokens already: `add_rows(block_tables=[[...]], lengths=[n])` shares those blocks; a shared block must
not be written again (the row's new tokens go to slots n, n + 1, ...: give it its own block from n on).

`BlockTableCache` is the same pools with all bookkeeping moved out, for an engine whose block manager owns the
blocks (free list, reference counts, prefix cache, copy-on-write). Its rows are sequences whose token at slot s
has position s, fed right-padded chunks at explicit positions, so nothing in a forward needs a host-side number:
before each forward the caller `bind`s the rows' block tables (B, W) and computed lengths (B,) as tensors, and

    key slots    j = 0 .. W * block_size - 1 of each row, at block tables[b, j // block_size], position j;
                 valid while j < start_b + (the row's real new tokens)
    new token    (b, t) at position p goes to slot p; a padding token (attention mask 0) goes to the scratch block

The scratch block (one block past the caller's `num_blocks`) takes every write that must not land in a real block:
padding tokens, and the padded rows of a compiled step's batch bucket (whose tables are all scratch). So a forward
is pure tensor work, and one `torch.compile`d decode step serves any block tables (`engine.runner`).
`copy_blocks` copies whole blocks (copy-on-write).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lmforge.infer.kv_cache import RowCache
from lmforge.model.cache import Cache, CacheFullError, KeyLayout


class BlockPools:
    """Per layer and tensor i, a pool (n_blocks, ..., block_size, d), allocated by its first write; slots are
    addressed by (block, offset) index tensors of one shape (or broadcasting to one)."""

    def __init__(self, n_blocks: int, block_size: int) -> None:
        self.n_blocks, self.block_size = n_blocks, block_size
        self._pools: dict[int, list[torch.Tensor]] = {}

    @property
    def allocated(self) -> bool:
        """Whether the pools exist (a first forward has written to them)."""
        return bool(self._pools)

    def tensors(self) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
        """((layer, i), pool) for every pool allocated so far."""
        for layer, pools in self._pools.items():
            for i, pool in enumerate(pools):
                yield (layer, i), pool

    def _put(
        self, layer: int, i: int, like: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Store `values` (*index, ..., d) at slots (blocks, offsets) (*index) of tensor `i` (shaped like `like`)."""
        pools = self._pools.setdefault(layer, [])
        if i == len(pools):
            pool = like.new_zeros(self.n_blocks, *like.shape[1:-2], self.block_size, like.shape[-1])
            pools.append(torch._dynamo.mark_dynamic(pool, 0) or pool)  # a compiled step serves every pool size
        pools[i][_at(pools[i], blocks, offsets)] = values

    def _gather(self, layer: int, i: int, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Slots (blocks, offsets) (B, S) of tensor `i` of `layer`: (B, ..., S, d)."""
        pool = self._pools[layer][i]
        return pool[_at(pool, blocks, offsets)].movedim(1, -2)


def _at(pool: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple:
    """The index of slots (blocks, offsets) in a pool (n_blocks, ..., block_size, d): its result is (*index, ..., d)
    (advanced indices split by slices put their dimensions first)."""
    return blocks, *(slice(None),) * (pool.dim() - 3), offsets


class PagedKVCache(RowCache, BlockPools):
    """`n_blocks` blocks of `block_size` slots shared by every row (see the module docstring)."""

    def __init__(self, n_blocks: int, block_size: int = 16) -> None:
        RowCache.__init__(self)
        BlockPools.__init__(self, n_blocks, block_size)
        self.tables: list[list[int]] = []  # per row: its blocks, in slot order
        self.refs = [0] * n_blocks  # rows using each block
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: block 0 is taken first
        self._table: torch.Tensor | None = None  # (B, max blocks) the tables of the forward under way
        self._read_at: tuple[torch.Tensor, torch.Tensor] | None = None  # (blocks (B, S), offsets (S,)) it reads

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def add_rows(
        self,
        n: int = 1,
        device: torch.device | str | None = None,
        block_tables: Sequence[Sequence[int]] | None = None,
        lengths: Sequence[int] | None = None,
    ) -> list[int]:
        """Append `n` rows: empty, or starting on caller-given `block_tables` that already hold their first
        `lengths` tokens (written there by another row: their keys and positions are in the pool)."""
        added = super().add_rows(n, device)
        if block_tables is None:
            return added
        for row, table, length in zip(added, block_tables, lengths or [0] * n, strict=True):
            if length > len(table) * self.block_size:
                raise ValueError(f"a row of {length} tokens needs more than its {len(table)} blocks")
            self.tables[row] = [self._take(block) for block in table]
            self.lengths[row] = length
            self.next_pos[row] = length
        return added

    def _add_rows(self, n: int) -> None:
        self.tables += [[] for _ in range(n)]

    def _remove_rows(self, keep: list[int], gone: list[int]) -> None:
        for row in gone:
            for block in self.tables[row]:
                self.refs[block] -= 1
                if self.refs[block] == 0:
                    self._free.append(block)
        self.tables = [self.tables[r] for r in keep]

    def capacity(self, row: int) -> int:
        return (len(self.tables[row]) + len(self._free)) * self.block_size

    def _grow(self, new_lengths: list[int]) -> None:
        for row, length in enumerate(new_lengths):
            need = -(-length // self.block_size) - len(self.tables[row])
            if need > len(self._free):
                free = self.free_blocks
                raise CacheFullError(f"paged KV cache: row {row} needs {need} more blocks; {free} are free")
            for _ in range(need):
                self.tables[row].append(self._take(self._free[-1]))
        width = max(len(t) for t in self.tables)
        padded = [t + [0] * (width - len(t)) for t in self.tables]  # past a row's length: masked out
        self._table = torch.tensor(padded, dtype=torch.long, device=self.next_pos.device)
        self._read_at = slot_index(self._table, self.block_size, max(new_lengths))

    def _take(self, block: int) -> int:
        if self.refs[block] == 0:
            self._free.remove(block)
        self.refs[block] += 1
        return block

    def _write(
        self, layer: int, i: int, like: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, values: torch.Tensor
    ) -> None:
        self._put(layer, i, like, self._table[rows, slots // self.block_size], slots % self.block_size, values)

    def _read(self, layer: int, i: int, s: int) -> torch.Tensor:
        """Slots 0..s-1 of every row (s: the longest row, as `_grow` computed the index for)."""
        return self._gather(layer, i, *self._read_at)


def slot_index(tables: torch.Tensor, block_size: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks (B, s), offsets (s,)): where slots 0..s-1 of each row of block tables (B, W) live."""
    j = torch.arange(s, device=tables.device)
    return tables[:, j // block_size], j % block_size


class BlockTableCache(BlockPools, Cache):
    """Pools whose blocks a caller allocates: each forward's rows are `bind`-ed to their block tables and computed
    lengths, as tensors (see the module docstring).

    The caller guarantees that a row's table covers every slot it writes and reads (W * block_size >= its length
    after the forward), that it writes no block another row reads as already computed (see
    `engine.block_manager`), and that it passes `position_ids` (a row's new tokens at start, start + 1, ...).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks + 1, block_size)
        self.scratch = num_blocks  # the block padding writes to (never one of the caller's)
        self.tables: torch.Tensor | None = None  # (B, W) the block tables of the next forward
        self.starts: torch.Tensor | None = None  # (B,) tokens each row holds before it
        self._write_at: tuple[torch.Tensor, torch.Tensor] | None = None  # (blocks, offsets) (B, T) of the new tokens
        self._keys: tuple[torch.Tensor, torch.Tensor] | None = None  # (blocks (B, S), offsets (S,)) of the keys

    def bind(self, tables: torch.Tensor, starts: torch.Tensor) -> None:
        """The next forward's rows: row b's slot s lives in block tables[b, s // block_size]; it holds starts[b]
        computed tokens."""
        self.tables, self.starts = tables, starts

    def next_positions(self, batch: int, device: torch.device) -> torch.Tensor:
        return self.starts

    def prepare(self, valid: torch.Tensor | None, positions: torch.Tensor) -> KeyLayout:
        s = self.tables.shape[1] * self.block_size
        self._keys = slot_index(self.tables, self.block_size, s)
        at = positions if valid is None else positions.where(valid, 0)  # padding: any slot, then the scratch block
        written = self._keys[0].gather(1, at)
        if valid is not None:
            written = written.where(valid, self.scratch)
        self._write_at = written, at % self.block_size
        ends = self.starts + (positions.shape[1] if valid is None else valid.sum(1))
        key_positions = torch.arange(s, device=positions.device)
        return KeyLayout(key_positions[None], key_positions < ends[:, None])

    def store(self, layer: int, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        out = []
        for i, t in enumerate(new):
            self._put(layer, i, t, *self._write_at, t.movedim(-2, 1))
            out.append(self._gather(layer, i, *self._keys))
        return tuple(out)

    def commit(self) -> None:
        self._write_at = self._keys = None

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy the contents of block `src` to block `dst` in every pool, for each (src, dst) of `pairs`."""
        if not pairs:
            return
        src, dst = (torch.tensor(side, dtype=torch.long) for side in zip(*pairs, strict=True))
        for _, pool in self.tensors():
            pool[dst.to(pool.device)] = pool[src.to(pool.device)]
