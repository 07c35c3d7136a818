"""Swap space: host (CPU) memory that holds a preempted sequence's computed blocks until it runs again.

Preemption by recompute frees a victim's blocks and feeds all its tokens again later: a forward over L tokens,
about 2 * parameters * L multiply-adds. Preemption by swap copies the victim's blocks that hold its L computed
tokens to host memory, and back into fresh pool blocks when it is readmitted: 2 * bytes_per_token * L bytes
moved, and no forward. For any real model copying is far cheaper (SmolLM2-135M: 45 KiB of keys and values per
token in float32 against 270 MFLOP to recompute it), so the scheduler swaps whenever the victim has at least one
full block computed and the host has room for its blocks; a victim with less recomputes (nothing worth a copy),
and so does one for which the host is full.

Two halves, like the pool's: `HostBlocks` is bookkeeping (which host blocks are free: the scheduler's), and
`HostPools` holds the tensors (per layer and tensor one host pool shaped like the device pool, allocated at the
first swap-out, pinned when the device is a GPU: the runner's, one per model, so a draft model's cache swaps on the
same host block ids). A swap-out copies device blocks to host blocks before the step's forward overwrites them
(the freed device blocks may serve others in the same step); a swap-in copies them into the readmitted
sequence's fresh blocks before the forward that continues it. No step both swaps out and swaps in (the scheduler
admits nobody in a step that preempted), so neither copy can read what the other writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from lmforge.infer.paged_cache import BlockPools

Pairs = Sequence[tuple[int, int]]


class HostBlocks:
    """The free list of `num_blocks` host blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # popped from the end: block 0 first

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        """`n` free host blocks (call only with n <= free_blocks)."""
        assert n <= len(self._free), "take: not enough free host blocks"
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: Iterable[int]) -> None:
        self._free += blocks


class HostPools:
    """Host copies of a `BlockPools`' tensors, `num_blocks` blocks each (see the module docstring)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._host: dict[tuple[int, int], torch.Tensor] = {}

    def swap_out(self, pools: BlockPools, pairs: Pairs) -> None:
        """Copy device block `src` to host block `dst` in every tensor, for each (src, dst) of `pairs`."""
        if not pairs:
            return
        src, dst = _columns(pairs)
        for key, pool in pools.tensors():
            host = self._host.get(key)
            if host is None:
                host = torch.empty(self.num_blocks, *pool.shape[1:], dtype=pool.dtype, pin_memory=pool.is_cuda)
                self._host[key] = host
            host[dst] = pool[src.to(pool.device)].cpu()

    def swap_in(self, pools: BlockPools, pairs: Pairs) -> None:
        """Copy host block `src` to device block `dst` in every tensor, for each (src, dst) of `pairs`."""
        if not pairs:
            return
        src, dst = _columns(pairs)
        for key, pool in pools.tensors():
            pool[dst.to(pool.device)] = self._host[key][src].to(pool.device, non_blocking=True)


def _columns(pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor(side, dtype=torch.long) for side in zip(*pairs, strict=True))
