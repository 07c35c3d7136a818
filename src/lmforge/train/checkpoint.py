"""Training checkpoints: everything a run needs to continue bit for bit, written so a crash never loses one.

A checkpoint is one file `<run>/checkpoints/step_00000100.pt` (a `torch.save` dict):

    format      "lmforge-checkpoint/1"
    step        optimizer updates done
    model       model.state_dict()
    optimizer   optimizer.state_dict() (moments, step counts, each group's lr and "initial_lr")
    sharded     True when written by an FSDP2 run (see below)
    rng         torch CPU generator state, every CUDA device's, Python's `random` and NumPy's global state
    extra       anything else the trainer wants back (data position, schedule, config, best loss, ...)

Resume is exact because every input of the next step is restored: the weights and optimizer state (the
update), the lr (a pure function of the step, `schedule.py`), the batch (a pure function of (seed, step), the
data loader), and the random streams (dropout, sampling). So 20 steps straight equal 10 steps, a restart, and
10 more.

Crash safety: the file is written to a temporary name in the same directory, fsynced, then renamed over the
final name (`lmforge.utils.atomic`), so a process killed at any instant (even SIGKILL mid-write) leaves either no
new checkpoint or a complete one; `latest_checkpoint` only ever sees complete files (temporary files start with
a dot and end in .tmp), and the next save sweeps leftovers away. After a successful save, all but the newest
`keep_last` checkpoints are deleted.

Several processes: every rank calls `save_checkpoint` and `load_checkpoint`; rank 0 alone writes. With DDP each
rank holds the whole model, so rank 0 saves its own. With FSDP2 (DTensor parameters) saving is a collective:
the full tensors are gathered to rank 0's CPU (torch.distributed.checkpoint's `get_state_dict`), so the file
holds the same whole-model `model` entry as any other checkpoint (and loads into any model), and the optimizer
state is keyed by parameter name; at load every rank reads the file and keeps its own shard (`set_state_dict`),
so a run resumes on any number of FSDP2 ranks.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.utils.atomic import atomic_path
from lmforge.utils.errors import LmforgeError

FORMAT = "lmforge-checkpoint/1"
_NAME = re.compile(r"step_(\d+)\.pt")


class CheckpointError(LmforgeError, RuntimeError):
    """A checkpoint file cannot be read or does not fit the run; the message names the file."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """The state of every random stream a training step may draw from."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are FSDP2 shards (DTensors)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def _full_state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_model(model: torch.nn.Module, build: Any) -> torch.nn.Module | None:
    """The whole model: `model` itself, or for FSDP2 shards a collective that gathers the full tensors into
    `build()` (a fresh unsharded model) on rank 0's CPU, and returns None on the other ranks."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_state_options())
    if not _is_writer():
        return None
    whole = build()
    whole.load_state_dict(state)
    return whole


def _is_writer() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int = 3,
) -> Path | None:
    """Write the checkpoint of `step` atomically; keep the newest `keep_last` (0: keep all). Returns its path
    (None on ranks other than 0, which write nothing)."""
    if keep_last < 0:
        raise ValueError(f"keep_last={keep_last}: must be >= 0 (0 keeps every checkpoint)")
    sharded = is_sharded(model)
    if sharded:  # a collective: every rank takes part, rank 0 receives the full tensors
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer or [], options=_full_state_options())
    else:
        model_state = model.state_dict()
        optimizer_state = optimizer.state_dict() if optimizer is not None else None
    if not _is_writer():
        return None
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(".step_*.pt.*.tmp"):  # from a process killed while writing
        leftover.unlink(missing_ok=True)
    payload = {
        "format": FORMAT,
        "step": step,
        "model": model_state,
        "optimizer": optimizer_state if optimizer is not None else None,
        "sharded": sharded,
        "rng": rng_state(),
        "extra": extra or {},
    }
    path = folder / f"step_{step:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    if keep_last:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> tuple[int, dict[str, Any]]:
    """Restore `model` (and `optimizer`, and the random streams) from `path`; returns (step, extra)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:  # a truncated or foreign file: name it instead of a pickle traceback
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an lmforge checkpoint (format {FORMAT!r} expected)")
    if optimizer is not None and payload["optimizer"] is None:
        raise CheckpointError(f"{path}: has no optimizer state")
    if optimizer is not None and payload.get("sharded", False) != is_sharded(model):
        written, here = ("an FSDP2", "a") if payload.get("sharded") else ("a", "an FSDP2")
        raise CheckpointError(f"{path}: written by {written} run, its optimizer state does not fit {here} run "
                              "(resume with the same dist.strategy, or load only the model)")  # fmt: skip
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if optimizer is not None:  # set_state_dict only fills keys the groups already have (e.g. "initial_lr")
            for group, saved in zip(optimizer.param_groups, payload["optimizer"]["param_groups"], strict=False):
                for key, value in saved.items():
                    group.setdefault(key, value)
        try:
            set_state_dict(model, optimizer or [], model_state_dict=payload["model"],
                           optim_state_dict=payload["optimizer"] if optimizer is not None else {},
                           options=_full_state_options())  # fmt: skip
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: the model or optimizer does not fit this checkpoint: {e}") from None
    else:
        try:
            model.load_state_dict(payload["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{path}: the model does not fit this checkpoint: {e}") from None
        try:
            if optimizer is not None:
                optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: the optimizer does not fit this checkpoint: {e}") from None
    if restore_rng:
        set_rng_state(payload["rng"])
    return int(payload["step"]), payload["extra"]
