"""A paged KV cache, the reference a paged engine builds on: fixed-size blocks in a pool, per-row block tables.

Storage: for each layer and tensor one pool of `n_blocks` blocks of `block_size` slots, (n_blocks, ..., block_size,
d). A row (sequence) owns a block table, a list of block ids; its slot s lives in block table[s // block_size] at
offset s % block_size. Rows grow by taking free blocks as their tokens arrive, and give them back when they leave
(`remove_rows`), so memory follows the tokens actually held instead of batch x max_len.

Attention (the reference): gather each row's blocks into a contiguous (B, ..., S, d) view and call the layer's
`fn` (`Cache.attend`'s default); a block-table kernel would read the pool directly. Row bookkeeping (per-row
lengths and positions, where the real new tokens go) is `kv_cache.RowCache`'s.

Blocks are reference-counted, so a caller (an engine's block manager, prefix caching) can start a row on blocks
that hold tokens already: `add_rows(block_tables=[[...]], lengths=[n])` shares those blocks; a shared block must
not be written again (the row's new tokens go to slots n, n + 1, ...: give it its own block from n on).

`BlockTableCache` is the same pool with the bookkeeping moved out: an engine's block manager owns the blocks
(free list, reference counts, prefix cache, copy-on-write) and, before each forward, `bind`s the rows of that
forward to their block tables and computed lengths; `copy_blocks` copies whole blocks (copy-on-write).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmforge.infer.kv_cache import RowCache
from lmforge.model.cache import CacheFullError


class PagedKVCache(RowCache):
    """`n_blocks` blocks of `block_size` slots shared by every row (see the module docstring)."""

    def __init__(self, n_blocks: int, block_size: int = 16) -> None:
        super().__init__()
        self.n_blocks, self.block_size = n_blocks, block_size
        self.tables: list[list[int]] = []  # per row: its blocks, in slot order
        self.refs = [0] * n_blocks  # rows using each block
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: block 0 is taken first
        self._pools: dict[int, list[torch.Tensor]] = {}
        self._table: torch.Tensor | None = None  # (B, max blocks) the tables of the forward under way

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
        self._bind_tables()

    def _bind_tables(self) -> None:
        """The rows' block tables as the (B, max blocks) tensor the forward under way reads and writes through."""
        width = max(len(t) for t in self.tables)
        padded = [t + [0] * (width - len(t)) for t in self.tables]  # past a row's length: masked out
        self._table = torch.tensor(padded, dtype=torch.long, device=self.next_pos.device)

    def _take(self, block: int) -> int:
        if self.refs[block] == 0:
            self._free.remove(block)
        self.refs[block] += 1
        return block

    def _write(
        self, layer: int, i: int, like: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, values: torch.Tensor
    ) -> None:
        pools = self._pools.setdefault(layer, [])
        if i == len(pools):
            pools.append(like.new_zeros(self.n_blocks, *like.shape[1:-2], self.block_size, like.shape[-1]))
        blocks = self._table[rows, slots // self.block_size]
        pools[i].movedim(-2, 1)[blocks, slots % self.block_size] = values

    def _read(self, layer: int, i: int, s: int) -> torch.Tensor:
        """Gather every row's blocks: (B, blocks, block_size, ..., d) -> (B, ..., s, d)."""
        pool = self._pools[layer][i].movedim(-2, 1)  # (n_blocks, block_size, ..., d)
        rows = pool[self._table].flatten(1, 2)  # (B, blocks * block_size, ..., d)
        return rows[:, :s].movedim(1, -2)


class BlockTableCache(PagedKVCache):
    """A paged pool whose blocks a caller allocates: each forward's rows are `bind`-ed to their block tables.

    The caller guarantees that a row's table covers every slot it writes and that it writes no block another
    row reads as already computed (see `engine.block_manager`). Reference counts and the free list of
    `PagedKVCache` are not used; `add_rows` / `remove_rows` are replaced by `bind`.
    """

    def bind(self, tables: Sequence[Sequence[int]], lengths: Sequence[int], device: torch.device | str) -> None:
        """The next forward's rows: row r holds `lengths[r]` computed tokens in blocks `tables[r]`."""
        self.tables = [list(t) for t in tables]
        self.lengths = list(lengths)
        self.next_pos = torch.tensor(self.lengths, dtype=torch.long, device=device)

    def capacity(self, row: int) -> int:
        return len(self.tables[row]) * self.block_size

    def _grow(self, new_lengths: list[int]) -> None:
        self._bind_tables()

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy the contents of block `src` to block `dst` in every pool, for each (src, dst) of `pairs`."""
        if not pairs:
            return
        src, dst = (torch.tensor(side, dtype=torch.long) for side in zip(*pairs, strict=True))
        for pools in self._pools.values():
            for pool in pools:
                pool[dst.to(pool.device)] = pool[src.to(pool.device)]
