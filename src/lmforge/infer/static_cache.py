"""A static (preallocated, compile-friendly) KV cache: fixed shapes, positions as tensors, no host state.

Every layer's tensors have a fixed `max_len` slots (sequence on dim -2); the slot of a token is its position,
written with `index_copy_` at positions given as a *tensor*, and attention always reads all `max_len` slots: a
slot not written yet holds a position after every query's (`key positions = 0..max_len-1`), so the causal mask
hides it and it adds exactly zero weight. Nothing in `prepare`, `store` or `commit` reads or changes a Python
number, so `torch.compile` traces a decode step once and replays it at every position; the slot dimension is
marked dynamic, so one graph serves every cache size.

Rows share positions (no padding: `valid` must be None). The owner (`static_decode.StaticDecoder`) keeps the
host-side count of filled slots and advances `position`, the next slot, outside the compiled step.
"""

from __future__ import annotations

import torch

from lmforge.model.cache import Cache, KeyLayout


def slots_dim(t: torch.Tensor) -> torch.Tensor:
    """Compile the slot dimension (-2, or 0 of a vector) as symbolic: one graph serves every cache size."""
    torch._dynamo.mark_dynamic(t, t.dim() - 2 if t.dim() > 1 else 0)
    return t


class StaticKVCache(Cache):
    """Per-layer tensors of `max_len` slots, written at the new tokens' positions, read whole."""

    def __init__(self, max_len: int, device: torch.device) -> None:
        self.max_len = max_len
        self.key_positions = slots_dim(torch.arange(max_len, device=device))  # (S,): slot s holds position s
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # the next slot, as a tensor
        self._slots: torch.Tensor | None = None  # (T,) where this forward writes
        self._layers: dict[int, tuple[torch.Tensor, ...]] = {}

    def next_positions(self, batch: int, device: torch.device) -> torch.Tensor:
        return self.position.expand(batch)

    def prepare(self, valid: torch.Tensor | None, positions: torch.Tensor) -> KeyLayout:
        if valid is not None:
            raise ValueError("the static cache takes no padding: its rows share positions")
        self._slots = positions[0]
        return KeyLayout(self.key_positions[None])

    def store(self, layer: int, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if layer not in self._layers:  # the first (eager) prefill allocates; compiled steps only write
            self._layers[layer] = tuple(slots_dim(t.new_zeros(*t.shape[:-2], self.max_len, t.shape[-1])) for t in new)
        stores = self._layers[layer]
        for store, t in zip(stores, new, strict=True):
            store.index_copy_(store.dim() - 2, self._slots, t)
        return stores

    def commit(self) -> None:
        """Nothing to do inside the (compiled) forward: the owner advances `position` after it."""

    def reset(self) -> None:
        self._layers.clear()
        self.position.zero_()
