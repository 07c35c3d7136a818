"""Data-parallel training on torch.distributed: DDP, FSDP2 and DDP + ZeRO-1, launched with torchrun, on any module.

    torchrun --standalone --nproc_per_node=N -m lmforge train run.toml        (gloo on CPU, nccl on CUDA)

Every rank holds B/N rows of the global batch (the loaders shard rows by rank). With N ranks, rank r's
micro-batch loss is  N * (sum of its token losses) / (counted tokens of the global batch)  and the wrappers
average gradients over ranks, so the update is the gradient of the global batch's mean token loss: the same
update a single process computes on the whole batch (objective.py; tested to 1e-5).

    DDP    every rank keeps the whole model; gradients are all-reduced (averaged) in buckets during backward.
    FSDP2  `fully_shard` each repeated submodule (the items of the outermost `nn.ModuleList`s, e.g. a
           Transformer's blocks, or those a `shard` predicate picks), then the root: parameters, gradients and
           optimizer state are sharded across ranks (DTensors); a group's parameters are all-gathered just
           before its forward and backward and freed after, and gradients are reduce-scattered (averaged).
           A mixed-precision policy gathers the parameters in `param_dtype` (the forward and backward compute
           in it) and reduces gradients in `reduce_dtype`; the sharded parameters and the optimizer stay fp32.
    ZeRO-1 ("zero1") DDP for the gradients, and `ZeroRedundancyOptimizer` for the state: each rank keeps the
           optimizer state of about 1/N of the parameters (greedy by size), updates those, and broadcasts them
           to the others after each step (`shard_optimizer`); checkpoints consolidate the state on rank 0.

What is wrapped is the objective (objective.py: any `nn.Module` holding the model and computing the loss), so
the loss runs inside the wrapper's forward (FSDP2 gathers the LM head there, which the chunked loss reads
directly). Tied weights (a parameter reachable from two modules) are fine when both modules are in one FSDP2
group (the root holds what no sharded submodule does); frozen parameters (requires_grad False) are kept and not
reduced. `full_state_dict` gathers whole tensors on every rank, or on rank 0 only (to its CPU).

`shutdown()` ends a run the way that avoids gloo's teardown race at interpreter exit (a barrier, destroying
the process group, flushing, then `os._exit`), see PLATFORM.md.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp", "zero1")
ShardPredicate = Callable[[str, nn.Module], bool]  # (qualified name, module) -> shard it as its own FSDP2 group


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


def unwrap(module: Any) -> Any:
    """The module inside a DDP wrapper or a `torch.compile` of one (FSDP2 shards in place: itself)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def is_sharded(module: nn.Module) -> bool:
    """Whether `module`'s parameters are FSDP2 shards (DTensors)."""
    return any(hasattr(p, "full_tensor") for p in module.parameters())


def repeated_submodules(module: nn.Module) -> list[nn.Module]:
    """The items of the outermost `nn.ModuleList`s inside `module`, in order (a Transformer's blocks): FSDP2's
    default groups, one per repeated layer."""
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                found.extend(child)
            else:
                visit(child)

    visit(module)
    return found


def _shard_groups(module: nn.Module, shard: ShardPredicate | None) -> list[nn.Module]:
    """The submodules to shard as groups, children before parents (`fully_shard` wants them bottom-up)."""
    if shard is None:
        return repeated_submodules(module)
    picked = [m for name, m in module.named_modules() if name and shard(name, m)]
    return picked[::-1]  # named_modules is pre-order: reversed, every descendant comes before its ancestor


def parallelize(
    module: nn.Module,
    strategy: str,
    info: DistInfo,
    *,
    shard: ShardPredicate | None = None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> nn.Module:
    """The module to call for training: a DDP wrapper of `module` ("ddp", "zero1"), or `module` sharded in place
    by FSDP2 ("fsdp": `shard` picks the groups, default `repeated_submodules`; `param_dtype`/`reduce_dtype` its
    mixed-precision policy). One process: `module` itself. Build the optimizer afterwards (FSDP2 replaces the
    parameters by sharded ones), and for "zero1" pass it through `shard_optimizer`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"invalid dist.strategy={strategy!r}: must be one of {', '.join(STRATEGIES)}")
    if strategy != "fsdp" and (param_dtype is not None or reduce_dtype is not None):
        raise ValueError(f"a mixed-precision policy (param_dtype, reduce_dtype) needs dist.strategy='fsdp', not "
                         f"{strategy!r}")  # fmt: skip
    if not info.enabled:
        return module
    if strategy != "fsdp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for group in _shard_groups(module, shard):
        fully_shard(group, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def shard_optimizer(optimizer: torch.optim.Optimizer, strategy: str, info: DistInfo) -> torch.optim.Optimizer:
    """The optimizer to step: for "zero1" with several ranks a `ZeroRedundancyOptimizer` of the same class,
    groups and hyper-parameters (each rank keeps and updates the state of its share of the parameters);
    otherwise `optimizer` itself. Call it before the first step (the state is not carried over)."""
    if strategy != "zero1" or not info.enabled:
        return optimizer
    if optimizer.state:
        raise ValueError("shard_optimizer needs an optimizer that has not stepped yet (its state is not moved)")
    from torch.distributed.optim import ZeroRedundancyOptimizer

    groups = [dict(group) for group in optimizer.param_groups]
    return ZeroRedundancyOptimizer(groups, optimizer_class=type(optimizer), **optimizer.defaults)


def is_zero(optimizer: Any) -> bool:
    """Whether `optimizer` is a `ZeroRedundancyOptimizer` (its state lives on several ranks)."""
    if not dist.is_available():
        return False
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def full_state_dict(module: nn.Module, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """`module`'s state dict with whole tensors: FSDP2 shards are all-gathered (a collective: every rank calls
    it). `rank0_only`: gathered to rank 0's CPU, the other ranks get {} (memory: one full copy in all)."""
    module = unwrap(module)
    if not is_sharded(module):
        keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
        return module.state_dict() if keep else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    return get_model_state_dict(module, options=options)


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
