"""Contiguous KV cache for incremental decoding.

Decoding token t only needs the keys and values of tokens < t, which do not
change once computed. The cache keeps them in tensors preallocated to
`max_len` slots, so a step costs O(t) reads instead of recomputing O(t^2).

Each layer stores any tensors it likes (k and v for standard attention; the
compressed latent and the rope key for MLA), all with the sequence on dim -2.
The cache also remembers, per batch row, which slots hold real tokens (for
left-padded batches) and the next position id, so a caller only passes the new
tokens on each step.
"""

from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    pass


class KVCache:
    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0  # slots filled so far (same for every row)
        self._layers: dict[int, list[torch.Tensor]] = {}
        self.valid: torch.Tensor | None = None  # (B, max_len) bool: slot holds a real token
        self.next_pos: torch.Tensor | None = None  # (B,) position id of the next token

    def reserve(self, batch: int, n_new: int, device: torch.device) -> None:
        if self.length + n_new > self.max_len:
            raise CacheFullError(f"KV cache holds {self.max_len} tokens; {self.length} used, {n_new} more requested")
        if self.valid is None:
            self.valid = torch.zeros(batch, self.max_len, dtype=torch.bool, device=device)
            self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write `new` (sequence on dim -2) at the current slots; return all slots so far."""
        if layer not in self._layers:
            self._layers[layer] = [t.new_zeros(*t.shape[:-2], self.max_len, t.shape[-1]) for t in new]
        end = self.length + new[0].shape[-2]
        out = []
        for store, t in zip(self._layers[layer], new, strict=True):
            store[..., self.length : end, :] = t
            out.append(store[..., :end, :])
        return tuple(out)

    def advance(self, valid_new: torch.Tensor, positions: torch.Tensor) -> None:
        """Mark the new slots filled: `valid_new` (B, T) bool, `positions` (B, T) their position ids."""
        n = valid_new.shape[1]
        self.valid[:, self.length : self.length + n] = valid_new
        self.next_pos = positions[:, -1] + 1
        self.length += n

    def reset(self) -> None:
        self.length = 0
        self._layers.clear()
        self.valid = self.next_pos = None
