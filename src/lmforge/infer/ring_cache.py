"""Sliding-window ring-buffer KV cache: memory bounded by the window W on sliding layers (Mistral, Gemma 2 local).

A sliding layer's query at position p sees only keys at positions p - W + 1 .. p, so a row never needs more than
its last W tokens of that layer. The ring keeps exactly those: per sliding layer and tensor one buffer
(B, ..., W, d); a row's n-th real token (n counted from 0) lives at slot n mod W, overwriting the token W before
it, with its position kept in `ring_pos` (B, W) (-1: the slot is still empty). Full-attention layers of the same
model (Gemma 2 alternates the two) keep every token in an inner contiguous `KVCache(max_len)`.

One forward over T new tokens (some of them padding), per sliding layer:

    keys   = ring (B, ..., W, d)  ++  new (B, ..., T, d)          S = W + T, never more
    mask   = build_mask(positions, ring_pos ++ positions, filled ++ valid, W)   (causal, window, real keys)
    after  : each row's last min(W, its new tokens) real tokens go to slots (n_r + rank) mod W

The old ring is attended before it is overwritten, so a prefill longer than the window, or a chunk that wraps the
ring, is exact. The writes wait for `commit` (a failed forward stores nothing). Only positions increasing along a
row are supported (what decoding produces): then the keys within a query's window are among its row's last W
tokens. The key layout `prepare` returns to the model is the full layers' (all tokens) when there are any, else
the ring's; sliding layers always attend under the ring's own mask, built once per forward.

Rows work as in `kv_cache.RowCache`: per-row lengths, `add_rows` / `remove_rows` between forwards, a fresh
cache takes the batch of its first forward. ALiBi is not supported (its bias is built over the model's key
layout, which the sliding layers do not attend).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.config import ModelConfig
from lmforge.infer.kv_cache import KVCache, Rows
from lmforge.model.attention import build_mask
from lmforge.model.cache import AttendFn, KeyLayout

__all__ = ["RingKVCache"]


@dataclass
class _Pending:
    """The forward under way: what `commit` writes into the ring, and each row's state once committed."""

    rows: torch.Tensor  # (N,) row of each real new token the ring keeps (each row's last <= W)
    cols: torch.Tensor  # (N,) its column in the forward's input
    slots: torch.Tensor  # (N,) its ring slot
    positions: torch.Tensor  # (N,) its position
    mask: torch.Tensor  # (B, 1, T, W + T) what the sliding layers' queries may attend
    lengths: list[int]  # real tokens each row has taken, once committed
    next_pos: torch.Tensor  # (B,) each row's next default position, once committed
    new: dict[int, tuple[torch.Tensor, ...]]  # per sliding layer: its new tensors, written at commit


class RingKVCache(Rows):
    """Sliding layers in a ring of `cfg.sliding_window` slots per row; full layers in a `KVCache(max_len)`."""

    def __init__(self, cfg: ModelConfig, max_len: int | None = None) -> None:
        if cfg.position == "alibi":
            raise ValueError("RingKVCache does not support ALiBi positions; use KVCache")
        kinds = [cfg.layer_type(i) for i in range(cfg.n_layers)]
        self.sliding = {i for i, kind in enumerate(kinds) if kind == "sliding"}
        if not self.sliding:
            raise ValueError("RingKVCache needs a model with sliding-window layers; use KVCache")
        has_full = len(self.sliding) < cfg.n_layers
        if has_full and max_len is None:
            raise ValueError("this model has full-attention layers: RingKVCache needs max_len for them")
        self.window: int = cfg.sliding_window
        self.full = KVCache(max_len) if has_full else None
        self.lengths: list[int] = []  # real tokens each row has taken (the ring keeps the last W)
        self.next_pos: torch.Tensor | None = None  # (B,) long
        self.ring_pos: torch.Tensor | None = None  # (B, W) long: position held by each slot, -1 when empty
        self._rings: dict[int, list[torch.Tensor]] = {}  # per sliding layer: (B, ..., W, d) per tensor
        self._pending: _Pending | None = None

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def capacity(self, row: int) -> int:
        """The most tokens row `row` can take: unbounded without full layers (the ring overwrites)."""
        return self.full.capacity(row) if self.full is not None else sys.maxsize

    # rows ------------------------------------------------------------------
    def add_rows(self, n: int = 1, device: torch.device | str | None = None) -> list[int]:
        """Append `n` empty rows; return their indices."""
        first = self.batch
        device = self.next_pos.device if self.next_pos is not None else device
        zeros = torch.zeros(n, dtype=torch.long, device=device)
        empty = torch.full((n, self.window), -1, dtype=torch.long, device=device)
        self.next_pos = zeros if self.next_pos is None else torch.cat((self.next_pos, zeros))
        self.ring_pos = empty if self.ring_pos is None else torch.cat((self.ring_pos, empty))
        for ring in self._rings.values():
            for i, buf in enumerate(ring):
                ring[i] = torch.cat((buf, buf.new_zeros(n, *buf.shape[1:])))
        if self.full is not None:
            self.full.add_rows(n, device)
        self.lengths += [0] * n
        return list(range(first, first + n))

    def remove_rows(self, rows: Sequence[int]) -> None:
        """Drop the rows `rows` (finished sequences); the others keep their order."""
        gone = set(rows)
        keep = [r for r in range(self.batch) if r not in gone]
        index = torch.tensor(keep, dtype=torch.long, device=self.next_pos.device)
        self.next_pos, self.ring_pos = self.next_pos[index], self.ring_pos[index]
        for ring in self._rings.values():
            for i, buf in enumerate(ring):
                ring[i] = buf[index]
        if self.full is not None:
            self.full.remove_rows(rows)
        self.lengths = [self.lengths[r] for r in keep]

    # the protocol ----------------------------------------------------------
    def next_positions(self, batch: int, device: torch.device) -> torch.Tensor:
        self._match_batch(batch, device)
        return self.next_pos

    def prepare(self, valid: torch.Tensor | None, positions: torch.Tensor) -> KeyLayout:
        b, t = positions.shape
        self._match_batch(b, positions.device)
        full = self.full.prepare(valid, positions) if self.full is not None else None  # raises when full
        if valid is None:
            valid = torch.ones(b, t, dtype=torch.bool, device=positions.device)
        counts = valid.sum(1)
        rank = valid.long().cumsum(1) - 1  # among the row's real new tokens
        rows, cols = valid.nonzero(as_tuple=True)
        kept = rank[rows, cols] >= counts[rows] - self.window  # the ring keeps each row's last W
        rows, cols = rows[kept], cols[kept]
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=positions.device)
        slots = (lengths[rows] + rank[rows, cols]) % self.window
        key_pos = torch.cat((self.ring_pos, positions), 1)
        key_valid = torch.cat((self.ring_pos >= 0, valid), 1)
        mask = build_mask(positions, key_pos, key_valid, self.window)
        last = torch.where(valid, positions, -1).amax(1) + 1
        next_pos = torch.where(counts > 0, last, self.next_pos)
        new_lengths = [n + k for n, k in zip(self.lengths, counts.tolist(), strict=True)]
        self._pending = _Pending(rows, cols, slots, positions[rows, cols], mask, new_lengths, next_pos, {})
        return full if full is not None else KeyLayout(key_pos, key_valid, None)

    def store(self, layer: int, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if layer not in self.sliding:
            return self.full.store(layer, new)
        ring = self._rings.get(layer)
        if ring is None:  # first forward: allocate the whole window once
            ring = [t.new_zeros(self.batch, *t.shape[1:-2], self.window, t.shape[-1]) for t in new]
            self._rings[layer] = ring
        self._pending.new[layer] = new
        return tuple(torch.cat((buf, t), -2) for buf, t in zip(ring, new, strict=True))

    def attend(
        self, layer: int, q: torch.Tensor, new: tuple[torch.Tensor, ...], mask: torch.Tensor | None, fn: AttendFn
    ) -> torch.Tensor:
        """Full layers attend under the model's mask; sliding layers over ring ++ new under the ring's."""
        if layer in self.sliding:
            mask = self._pending.mask
        return fn(q, *self.store(layer, new), mask)

    def commit(self) -> None:
        p = self._pending
        for layer, new in p.new.items():
            for buf, t in zip(self._rings[layer], new, strict=True):
                buf.movedim(-2, 1)[p.rows, p.slots] = t.movedim(-2, 1)[p.rows, p.cols]
        self.ring_pos[p.rows, p.slots] = p.positions
        if self.full is not None:
            self.full.commit()
        self.lengths, self.next_pos, self._pending = p.lengths, p.next_pos, None
