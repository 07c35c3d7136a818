"""Data-parallel training on torch.distributed: DDP and FSDP2, launched with torchrun.

    torchrun --standalone --nproc_per_node=N -m lmforge train run.toml        (gloo on CPU, nccl on CUDA)

Every rank holds B/N rows of the global batch (the loaders shard rows by rank). With N ranks, rank r's
micro-batch loss is  N * (sum of its token losses) / (counted tokens of the global batch)  and both wrappers
average gradients over ranks, so the update is the gradient of the global batch's mean token loss: the same
update a single process computes on the whole batch (tested to 1e-5).

    DDP    every rank keeps the whole model; gradients are all-reduced (averaged) in buckets during backward.
    FSDP2  `fully_shard` each block, then the root: parameters, gradients and optimizer state are sharded
           across ranks (DTensors); a block's parameters are all-gathered just before its forward and backward
           and freed after, and gradients are reduce-scattered (averaged).

`shutdown()` ends a run the way that avoids gloo's teardown race at interpreter exit (a barrier, destroying
the process group, flushing, then `os._exit`), see PLATFORM.md.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(backend: str = "auto", device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); one process: no group."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if use_cuda else "cpu"))


def parallelize(objective: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """The module to call for training: a DDP wrapper of `objective`, or `objective` sharded in place by FSDP2.

    `objective` is a `ModelLoss(model)` (lmforge.train.loss): the wrappers hook its forward, so the loss is
    inside it (FSDP2 gathers the LM head there, which the chunked loss uses directly). Build the optimizer
    afterwards: FSDP2 replaces the parameters by sharded ones."""
    if strategy not in STRATEGIES:
        raise ValueError(f"invalid dist.strategy={strategy!r}: must be one of {', '.join(STRATEGIES)}")
    if not info.enabled:
        return objective
    if strategy == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(objective, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for block in objective.model.blocks:
        fully_shard(block)
    fully_shard(objective)
    return objective


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shutdown(info: DistInfo, code: int = 0) -> None:
    """Leave the process group cleanly and exit (only for multi-process runs; returns otherwise)."""
    if not info.enabled:
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
