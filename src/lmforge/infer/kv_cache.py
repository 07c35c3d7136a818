"""Contiguous KV cache with per-row lengths, and the row bookkeeping it shares with the paged cache.

Decoding token t only needs the keys and values of tokens < t, which do not change once computed. The cache
keeps them, so a step costs O(t) reads instead of recomputing O(t^2). It implements `model.cache.Cache`.

Rows: each batch row is one sequence with its own length L_r (the real tokens it holds; padding is never
stored) and next position. A forward's real new tokens of row r go to slots L_r, L_r + 1, ... in order, so rows
may have different pasts, and a row may take a prefill chunk while another decodes one token. Between forwards,
`add_rows(n)` appends empty rows and `remove_rows(rows)` drops finished ones (the others keep their order). A
fresh cache takes the batch of its first forward, so `KVCache(max_len)` + `model(ids, cache=cache)` needs no setup.

Layers store any tensors they like (k and v for standard attention; MLA's latent and rope key), sequence on
dim -2. The position of every stored token is stored alongside (as one more "layer"), so masks compare
positions: the keys of row r are its slots 0..L_r - 1 plus the new ones, S = the longest row, slot j valid when
j < L_r' (the row's new length).

    KVCache(max_len):  per layer, tensors (B, ..., max_len, d); a row's slot s is index s.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.model.cache import Cache, CacheFullError, KeyLayout

__all__ = ["CacheFullError", "KVCache", "RowCache"]

POSITIONS = -1  # the "layer" under which the positions of the stored tokens are kept


@dataclass
class _Pending:
    """Where `prepare` put the real new tokens of the forward under way."""

    rows: torch.Tensor  # (N,) row of each real new token
    cols: torch.Tensor  # (N,) its column in the forward's input
    slots: torch.Tensor  # (N,) its slot in the row
    lengths: list[int]  # each row's length once committed
    next_pos: torch.Tensor  # (B,) each row's next position once committed


class Rows(Cache):
    """A cache of rows that join (`add_rows`) and leave (`remove_rows`) between forwards; a fresh one takes the batch
    of its first forward."""

    @property
    @abstractmethod
    def batch(self) -> int:
        """The rows held."""

    @abstractmethod
    def add_rows(self, n: int = 1, device: torch.device | str | None = None) -> list[int]:
        """Add `n` empty rows at the end; return their indices."""

    @abstractmethod
    def remove_rows(self, rows: Sequence[int]) -> None:
        """Drop `rows`; the others keep their order."""

    def reset(self) -> None:
        """Forget every row (the next forward's batch becomes the cache's)."""
        if self.batch:
            self.remove_rows(range(self.batch))

    def _match_batch(self, batch: int, device: torch.device) -> None:
        if self.batch == 0:
            self.add_rows(batch, device)
        elif batch != self.batch:
            raise ValueError(f"the cache holds {self.batch} rows; this forward has {batch}: add_rows or remove_rows")


class RowCache(Rows):
    """Per-row lengths and positions; where a row's slot lives (`_write`, `_read`, `_grow`) is the subclass's."""

    def __init__(self) -> None:
        self.lengths: list[int] = []  # real tokens stored per row
        self.next_pos: torch.Tensor | None = None  # (B,) long: the default position of each row's next token
        self._pending: _Pending | None = None

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def add_rows(self, n: int = 1, device: torch.device | str | None = None) -> list[int]:
        """Append `n` empty rows (sequences); return their indices."""
        first = self.batch
        device = self.next_pos.device if self.next_pos is not None else device
        zeros = torch.zeros(n, dtype=torch.long, device=device)
        self.next_pos = zeros if self.next_pos is None else torch.cat((self.next_pos, zeros))
        self.lengths += [0] * n
        self._add_rows(n)
        return list(range(first, first + n))

    def remove_rows(self, rows: Sequence[int]) -> None:
        """Drop the rows `rows` (finished sequences; their room is freed); the others keep their order."""
        gone = set(rows)
        keep = [r for r in range(self.batch) if r not in gone]
        self._remove_rows(keep, sorted(gone))
        self.lengths = [self.lengths[r] for r in keep]
        self.next_pos = self.next_pos[torch.tensor(keep, dtype=torch.long, device=self.next_pos.device)]

    def next_positions(self, batch: int, device: torch.device) -> torch.Tensor:
        self._match_batch(batch, device)
        return self.next_pos

    def prepare(self, valid: torch.Tensor | None, positions: torch.Tensor) -> KeyLayout:
        b, t = positions.shape
        self._match_batch(b, positions.device)
        if valid is None:
            valid = torch.ones(b, t, dtype=torch.bool, device=positions.device)
        counts = valid.sum(1)
        new_lengths = [n + k for n, k in zip(self.lengths, counts.tolist(), strict=True)]
        for row, (old, new) in enumerate(zip(self.lengths, new_lengths, strict=True)):
            if new > self.capacity(row):
                raise CacheFullError(
                    f"KV cache holds {self.capacity(row)} tokens; {old} used, {new - old} more requested"
                    + (f" (row {row})" if b > 1 else "")
                )
        self._grow(new_lengths)
        rows, cols = valid.nonzero(as_tuple=True)
        device = positions.device
        rank = valid.long().cumsum(1) - 1  # among the row's real new tokens
        slots = torch.tensor(self.lengths, dtype=torch.long, device=device)[rows] + rank[rows, cols]
        last = torch.where(valid, positions, -1).amax(1) + 1
        self._pending = _Pending(rows, cols, slots, new_lengths, torch.where(counts > 0, last, self.next_pos))
        key_pos = self.store(POSITIONS, (positions[..., None],))[0][..., 0]
        if bool(valid.all()) and len(set(self.lengths)) == 1:
            return KeyLayout(key_pos, None, self.lengths[0])
        key_valid = torch.arange(key_pos.shape[1], device=device) < torch.tensor(new_lengths, device=device)[:, None]
        return KeyLayout(key_pos, key_valid, None)

    def store(self, layer: int, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        p, out = self._pending, []
        for i, t in enumerate(new):
            self._write(layer, i, t, p.rows, p.slots, t.movedim(-2, 1)[p.rows, p.cols])
            out.append(self._read(layer, i, max(p.lengths)))
        return tuple(out)

    def commit(self) -> None:
        self.lengths, self.next_pos = self._pending.lengths, self._pending.next_pos
        self._pending = None

    @abstractmethod
    def capacity(self, row: int) -> int:
        """The most tokens row `row` can hold."""

    @abstractmethod
    def _add_rows(self, n: int) -> None: ...

    @abstractmethod
    def _remove_rows(self, keep: list[int], gone: list[int]) -> None: ...

    def _grow(self, new_lengths: list[int]) -> None:
        """Make room for each row to hold `new_lengths` tokens (a paged cache allocates blocks)."""

    @abstractmethod
    def _write(
        self, layer: int, i: int, like: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Store `values` (N, ..., d), the real new tokens of tensor `i` of `layer` (shaped like `like`), at
        (rows[n], slots[n])."""

    @abstractmethod
    def _read(self, layer: int, i: int, s: int) -> torch.Tensor:
        """Tensor `i` of `layer`, slots 0..s-1 of every row: (B, ..., s, d)."""


class KVCache(RowCache):
    """Contiguous storage: every row has `max_len` slots in one tensor per layer and tensor."""

    def __init__(self, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self._layers: dict[int, list[torch.Tensor]] = {}

    def capacity(self, row: int) -> int:
        return self.max_len

    def _add_rows(self, n: int) -> None:
        for stores in self._layers.values():
            for i, store in enumerate(stores):
                stores[i] = torch.cat((store, store.new_zeros(n, *store.shape[1:])))

    def _remove_rows(self, keep: list[int], gone: list[int]) -> None:
        for stores in self._layers.values():
            for i, store in enumerate(stores):
                stores[i] = store[torch.tensor(keep, dtype=torch.long, device=store.device)]

    def _write(
        self, layer: int, i: int, like: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, values: torch.Tensor
    ) -> None:
        stores = self._layers.setdefault(layer, [])
        if i == len(stores):
            stores.append(like.new_zeros(self.batch, *like.shape[1:-2], self.max_len, like.shape[-1]))
        stores[i].movedim(-2, 1)[rows, slots] = values

    def _read(self, layer: int, i: int, s: int) -> torch.Tensor:
        return self._layers[layer][i][..., :s, :]
