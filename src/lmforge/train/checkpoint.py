"""Training checkpoints: everything a run needs to continue bit for bit, written so a crash never loses one.

A checkpoint is one file `<run>/checkpoints/step_00000100.pt` (a `torch.save` dict):

    format      "lmforge-checkpoint/2"
    step        optimizer updates done
    model       model.state_dict()
    optimizer   optimizer.state_dict() (moments, step counts, each group's lr and "initial_lr")
    sharded     True when written by an FSDP2 run (see below)
    rng         torch CPU generator state, every CUDA device's, Python's `random` and NumPy's global state
                (NumPy's as a plain tuple: ("MT19937", keys as an int64 tensor, pos, has_gauss, cached_gaussian))
    extra       anything else the trainer wants back (data position, schedule, config, best loss, ...), as
                plain values
    partial     optional, True: `model` holds only the trainable tensors (`trainable_only=True`: an adapter's
                parameters, not the frozen base the run rebuilds from its recipe); loading fills exactly those

Nothing is unpickled: a run directory may come from a stranger, and resume is on by default, so a checkpoint is
read with `torch.load(weights_only=True)`, which builds tensors and plain values (dict, list, tuple, str, int,
float, bool, None) and refuses anything else (a pickled `os.system` call, any class) with a `CheckpointError`.
Files of the previous format (1) held NumPy's RNG keys as an ndarray: for them, exactly NumPy's array types are
allowed (`ndarray`, `dtype`, the uint32 dtype class, `_reconstruct`), which build arrays and nothing else. The
payload is then checked before anything is restored: its keys and their types; every model tensor's name,
shape and dtype against the model; the optimizer's group and parameter counts, its hyper-parameters (their
kinds, and the optimizer's own constructor checks), each parameter's state keys, shapes and dtypes as the
optimizer's first update makes them (run on the meta device: no memory, no arithmetic); the random states by
their sizes and their own setters. Each failure is a `CheckpointError` naming the file and the field, e.g.
`step_00000005.pt: model['blocks.0.attn.q_proj.weight'] has shape (3, 4), the model needs (64, 64)`.

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
rank holds the whole model, so rank 0 saves its own. With ZeRO-1 (`ZeroRedundancyOptimizer`) each rank holds
part of the optimizer state: saving consolidates it on rank 0 (a collective), so the file holds the same whole
`optimizer` entry a single process writes (indexed over all parameters; it resumes a DDP or single-process run
too), and at load every rank keeps the state of its own share. With FSDP2 (DTensor parameters) saving is a collective:
the full tensors are gathered to rank 0's CPU (torch.distributed.checkpoint's `get_state_dict`), so the file
holds the same whole-model `model` entry as any other checkpoint (and loads into any model), and the optimizer
state is keyed by parameter name; at load every rank reads the file and keeps its own shard (`set_state_dict`),
so a run resumes on any number of FSDP2 ranks.
"""

from __future__ import annotations

import math
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from lmforge.train.distributed import full_state_dict, is_sharded, is_zero
from lmforge.utils.atomic import atomic_path
from lmforge.utils.errors import LmforgeError

FORMAT = "lmforge-checkpoint/2"
LEGACY_FORMAT = "lmforge-checkpoint/1"  # NumPy's RNG keys as an ndarray; still read
_NAME = re.compile(r"step_(\d+)\.pt")
_INT64 = 2**63
_MT_KEYS = 624  # words of the Mersenne Twister state (NumPy's and Python's)


class CheckpointError(LmforgeError, RuntimeError):
    """A checkpoint file cannot be read or does not fit the run; the message names the file."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


# ---------------------------------------------------------------------------------------------------------------
# random streams


def _numpy_state() -> tuple[str, torch.Tensor, int, int, float]:
    """NumPy's global RNG state in types `weights_only` loading accepts (no ndarray)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def rng_state() -> dict[str, Any]:
    """The state of every random stream a training step may draw from."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": _numpy_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# FSDP2


def _full_state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_model(model: torch.nn.Module, build: Any) -> torch.nn.Module | None:
    """The whole model: `model` itself, or for FSDP2 shards a collective that gathers the full tensors into
    `build()` (a fresh unsharded model) on rank 0's CPU, and returns None on the other ranks."""
    if not is_sharded(model):
        return model
    state = full_state_dict(model, rank0_only=True)
    if not _is_writer():
        return None
    whole = build()
    whole.load_state_dict(state)
    return whole


def _is_writer() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


# ---------------------------------------------------------------------------------------------------------------
# saving


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


def _is_plain(value: Any) -> bool:
    """Whether `value` is made only of what `torch.load(weights_only=True)` builds without an allow-list."""
    if isinstance(value, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    return isinstance(value, torch.Tensor) or type(value) in (str, int, float, bool, type(None))  # not np.float64


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int = 3,
    trainable_only: bool = False,
) -> Path | None:
    """Write the checkpoint of `step` atomically; keep the newest `keep_last` (0: keep all). Returns its path
    (None on ranks other than 0, which write nothing). `extra` holds plain values and tensors only (no objects:
    `load_checkpoint` unpickles nothing else). `trainable_only`: the model's parameters that require a gradient,
    without the frozen ones (module docstring: "partial")."""
    if keep_last < 0:
        raise ValueError(f"keep_last={keep_last}: must be >= 0 (0 keeps every checkpoint)")
    if not _is_plain(extra or {}):
        raise ValueError("extra: must hold only tensors, str, int, float, bool, None, lists, tuples and dicts "
                         "(what loading without unpickling accepts)")  # fmt: skip
    sharded = is_sharded(model)
    if trainable_only and sharded:
        raise ValueError("trainable_only checkpoints are not written by FSDP2 runs (use dist.strategy='ddp')")
    if sharded:  # a collective: every rank takes part, rank 0 receives the full tensors
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer or [], options=_full_state_options())
    else:
        model_state = trainable_state(model) if trainable_only else model.state_dict()
        if is_zero(optimizer):  # a collective: every rank sends its share of the state to rank 0
            optimizer.consolidate_state_dict(to=0)
        optimizer_state = optimizer.state_dict() if optimizer is not None and _is_writer() else None
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
    } | ({"partial": True} if trainable_only else {})
    path = folder / f"step_{step:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    if keep_last:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# reading: nothing but tensors and plain values


def _numpy_array_globals() -> list[Any]:
    """Exactly what unpickling a NumPy uint32 array needs (format-1 checkpoints hold NumPy's RNG keys as one),
    under the module names NumPy 1 and NumPy 2 write."""
    reconstruct = np.zeros(0, np.uint32).__reduce__()[0]
    names = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), *((reconstruct, name) for name in names)]


def _unpickler_reason(error: Exception) -> str:
    """The one-line reason in torch's long weights-only error (e.g. "Unsupported global: GLOBAL posix.system")."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    reason = found.group(1) if found else text.strip().split("\n", 1)[0]
    return reason.split(" was not an allowed global")[0].split(". ", 1)[0].strip()


def _read(path: Path) -> Any:
    """The unpickled payload of `path`, built from tensors and plain values only (`weights_only=True`)."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError as e:  # a class or function to call: what a crafted file asks for
        raise CheckpointError(f"{path}: not a safe checkpoint, refusing to unpickle it ({_unpickler_reason(e)}); "
                              "lmforge checkpoints hold only tensors and plain values") from None  # fmt: skip
    except Exception as e:  # a truncated or foreign file: name it instead of a traceback
        first = str(e).strip().split("\n", 1)[0]
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from None


class _Checker:
    """Checks of one payload; every failure is a `CheckpointError` naming the file and the field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, problem: str) -> NoReturn:
        raise CheckpointError(f"{self.path}: {field} {problem}")

    def instance(self, field: str, value: Any, types: type | tuple[type, ...], expected: str) -> None:
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            self.fail(field, f"is {_describe(value)}, expected {expected}")

    def integer(self, field: str, value: Any, low: int = 0, high: int = _INT64) -> None:
        self.instance(field, value, int, "an integer")
        if not low <= value < high:
            self.fail(field, f"is {value}, expected an integer in [{low}, {'2**63' if high == _INT64 else high})")

    def tensor(self, field: str, value: Any, shape: tuple[int, ...] | None = None, dtype: Any = None) -> None:
        self.instance(field, value, torch.Tensor, "a tensor")
        if shape is not None and tuple(value.shape) != tuple(shape):
            self.fail(field, f"has shape {tuple(value.shape)}, expected {tuple(shape)}")
        if dtype is not None and value.dtype != dtype:
            self.fail(field, f"has dtype {value.dtype}, expected {dtype}")


def _text(value: Any) -> str | None:
    """`value` if it is a str (comparing a tensor to a str would not give a bool)."""
    return value if isinstance(value, str) else None


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _describe(value: Any) -> str:
    """A short description of a payload value for messages (never its whole repr)."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, bool | int | float | type(None)):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:40])
    return f"a {type(value).__name__}"


_ENTRIES = ("format", "step", "model", "optimizer", "sharded", "rng", "extra")


def _check_payload(check: _Checker, payload: Any) -> None:
    """The top-level entries exist and have their types (the model and optimizer are checked separately)."""
    if not isinstance(payload, dict) or _text(payload.get("format")) not in (FORMAT, LEGACY_FORMAT):
        check.fail("is", f"not an lmforge checkpoint (format {FORMAT!r} expected)")
    for key in _ENTRIES:
        if key not in payload:
            check.fail("has", f"no {key!r} entry")
    check.integer("step", payload["step"])
    check.instance("model", payload["model"], dict, "a dict of tensors")
    for name, value in payload["model"].items():
        check.instance("a key of model", name, str, "a tensor name")
        check.tensor(f"model[{name!r}]", value)
    optimizer = payload["optimizer"]
    if optimizer is not None:
        check.instance("optimizer", optimizer, dict, "None or an optimizer state_dict")
        for key, types in (("state", dict), ("param_groups", list)):
            if key not in optimizer:
                check.fail(f"optimizer[{key!r}]", "is missing")
            check.instance(f"optimizer[{key!r}]", optimizer[key], types, f"a {types.__name__}")
        for i, group in enumerate(optimizer["param_groups"]):
            check.instance(f"optimizer['param_groups'][{i}]", group, dict, "a dict")
            check.instance(f"optimizer['param_groups'][{i}]['params']", group.get("params"), list, "a list")
    check.instance("sharded", payload["sharded"], bool, "True or False")
    check.instance("extra", payload["extra"], dict, "a dict")
    check.instance("partial", payload.get("partial", False), bool, "True or False")
    _check_rng(check, payload["rng"], legacy=payload["format"] == LEGACY_FORMAT)


def _check_rng(check: _Checker, rng: Any, legacy: bool) -> None:
    """Each random state has the type and size its setter needs."""
    check.instance("rng", rng, dict, "a dict of random states")
    for key in ("torch", "python", "numpy"):
        if key not in rng:
            check.fail(f"rng[{key!r}]", "is missing")
    check.tensor("rng['torch']", rng["torch"], tuple(torch.get_rng_state().shape), torch.uint8)
    check.instance("rng['cuda']", rng.get("cuda", []), (list, tuple), "a list of CUDA generator states")
    for i, state in enumerate(rng.get("cuda", [])):
        check.tensor(f"rng['cuda'][{i}]", state, dtype=torch.uint8)
    python = rng["python"]
    check.instance("rng['python']", python, tuple, "random.getstate()'s tuple")
    if len(python) != 3 or type(python[0]) is not int or python[0] != 3 or type(python[2]) not in (float, type(None)):
        check.fail("rng['python']", "is not a state of Python's random module (version 3)")
    check.instance("rng['python'][1]", python[1], tuple, "a tuple of 625 integers")
    if len(python[1]) != _MT_KEYS + 1:
        check.fail("rng['python'][1]", f"has {len(python[1])} entries, expected {_MT_KEYS + 1}")
    for i, word in enumerate(python[1]):
        check.integer(f"rng['python'][1][{i}]", word, 0, 2**32 if i < _MT_KEYS else _MT_KEYS + 1)
    _check_numpy_rng(check, rng["numpy"], legacy)
    _try_rng(check, rng)


def _try_rng(check: _Checker, rng: dict[str, Any]) -> None:
    """Each state is accepted by its own setter (the generators check what no type can: e.g. an all-zero
    Mersenne Twister); the current states are put back."""
    current = rng_state()
    for key in ("torch", "python", "numpy"):
        try:
            set_rng_state({**current, key: rng[key]})
        except (RuntimeError, ValueError, TypeError, OverflowError) as e:
            check.fail(f"rng[{key!r}]", f"is not a valid generator state ({e})")
        finally:
            set_rng_state(current)


def _check_numpy_rng(check: _Checker, state: Any, legacy: bool) -> None:
    check.instance("rng['numpy']", state, tuple, "np.random.get_state()'s 5 entries")
    if len(state) != 5 or _text(state[0]) != "MT19937":
        check.fail("rng['numpy']", "is not a Mersenne Twister state ('MT19937', keys, pos, has_gauss, cached)")
    keys = state[1]
    if legacy:
        check.instance("rng['numpy'][1]", keys, np.ndarray, "a NumPy array")
        if keys.dtype != np.uint32 or keys.shape != (_MT_KEYS,):
            check.fail("rng['numpy'][1]", f"is a {keys.dtype} array of shape {keys.shape}, expected uint32 (624,)")
    else:
        check.tensor("rng['numpy'][1]", keys, (_MT_KEYS,), torch.int64)
        if not bool(((keys >= 0) & (keys < 2**32)).all()):
            check.fail("rng['numpy'][1]", "has keys outside [0, 2**32)")
    check.integer("rng['numpy'][2]", state[2], 0, _MT_KEYS + 1)
    check.integer("rng['numpy'][3]", state[3], 0, 2)
    check.instance("rng['numpy'][4]", state[4], float, "a float")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries of `model.state_dict()` that are parameters requiring a gradient (detached)."""
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items() if v.requires_grad}


def _check_model(check: _Checker, saved: dict[str, torch.Tensor], model: torch.nn.Module, partial: bool) -> None:
    """The same tensor names as the model's state_dict (its trainable entries, for a partial checkpoint), each
    with the model's shape and dtype."""
    wanted = trainable_state(model) if partial else model.state_dict()  # FSDP2: DTensors, the whole tensor's shape
    missing = [name for name in wanted if name not in saved]
    if missing:
        check.fail("model", f"has no {missing[0]!r}, which the model needs ({len(missing)} missing in all)")
    unknown = [name for name in saved if name not in wanted]
    if unknown:
        check.fail(f"model[{unknown[0]!r}]", f"is not a tensor of the model ({len(unknown)} unknown in all)")
    for name, ref in wanted.items():
        value = saved[name]
        if tuple(value.shape) != tuple(ref.shape):
            check.fail(f"model[{name!r}]", f"has shape {tuple(value.shape)}, the model needs {tuple(ref.shape)}")
        if value.dtype != ref.dtype:
            check.fail(f"model[{name!r}]", f"has dtype {value.dtype}, the model needs {ref.dtype}")


def _local(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose update runs: ZeRO-1's local one (same class and hyper-parameters), else `optimizer`."""
    return optimizer.optim if is_zero(optimizer) else optimizer


def _probed_state(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], p: torch.Tensor
) -> tuple[dict[str, Any], bool] | None:
    """(the state `optimizer` creates for `p` on its first update, whether its shapes are `p`'s): the update run on
    the meta device (shapes and types, no memory, no arithmetic), or where it reads values (Adafactor) on a tiny
    CPU stand-in of `p`'s rank (the keys, kinds and dtypes only). None for an optimizer without lmforge's
    `_update` (torch.optim's)."""
    update = getattr(_local(optimizer), "_update", None)
    if update is None:
        return None
    meta, tiny = torch.zeros(p.shape, dtype=p.dtype, device="meta"), torch.zeros((2,) * p.ndim, dtype=p.dtype)
    for probe, exact in ((meta, True), (tiny, False)):
        state: dict[str, Any] = {}
        try:
            update(probe, torch.zeros_like(probe), state, dict(group))
        except (RuntimeError, NotImplementedError):
            continue
        return state, exact
    return None


def _state_shapes(shape: tuple[int, ...], group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Where the state cannot be probed: the shape of each state tensor torch.optim and Adafactor keep (moments,
    momentum: the parameter's shape; Adafactor: factored row and column statistics of a matrix)."""
    shapes = {key: shape for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "variance")}
    if len(shape) >= 2:
        shapes |= {"row_var": (*shape[:-1], 1), "col_var": (*shape[:-2], 1, shape[-1])}
    return shapes


def _kind(value: Any) -> str:
    """The kind of a hyper-parameter or state value: what a saved one must match for the optimizer to run on it
    (a NaN, an infinity or an integer outside int64 is no number a step can use)."""
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int):
        return "an integer" if -_INT64 <= value < _INT64 else "an integer outside int64"
    if isinstance(value, float):
        return "a number" if math.isfinite(value) else "a non-finite number"
    if isinstance(value, tuple | list):
        return f"a list of ({', '.join(_kind(v) for v in value)})"
    return f"a {type(value).__name__}"


def _same_kind(saved: Any, live: Any) -> bool:
    """Whether a saved value can stand in for the live one (an integer for a float is fine)."""
    numbers = ("an integer", "a number")
    return _kind(saved) == _kind(live) or (_kind(saved) in numbers and _kind(live) in numbers)


_SET_LATER = ("initial_lr",)  # group keys the constructor does not make (`schedule.set_lr` adds it)


def _check_hyperparameters(
    check: _Checker, field: str, group: dict[str, Any], optimizer: torch.optim.Optimizer
) -> None:
    """A saved group's hyper-parameters pass the optimizer's own constructor checks (for lmforge's optimizers,
    whose `defaults` are their keyword arguments), so a step cannot fail on them (a negative lr or block size)."""
    optimizer = _local(optimizer)
    if not hasattr(optimizer, "_update"):
        return
    kwargs = {key: group.get(key, value) for key, value in optimizer.defaults.items()}
    try:
        type(optimizer)([torch.zeros(1, requires_grad=True)], **kwargs)
    except ValueError as e:
        check.fail(field, f"has hyper-parameters {type(optimizer).__name__} refuses: {e}")


def _check_groups(
    check: _Checker, saved: list[dict[str, Any]], optimizer: torch.optim.Optimizer, sharded: bool
) -> dict[Any, tuple[torch.Tensor, dict[str, Any]]]:
    """Group count, parameter counts and hyper-parameters against `optimizer`; returns saved id -> (parameter,
    its live group)."""
    if len(saved) != len(optimizer.param_groups):
        check.fail("optimizer['param_groups']", f"has {len(saved)} groups, the optimizer has "
                                                 f"{len(optimizer.param_groups)}")  # fmt: skip
    params: dict[Any, tuple[torch.Tensor, dict[str, Any]]] = {}
    for i, (group, live) in enumerate(zip(saved, optimizer.param_groups, strict=True)):
        field = f"optimizer['param_groups'][{i}]"
        if len(group["params"]) != len(live["params"]):
            check.fail(f"{field}['params']", f"has {len(group['params'])} parameters, the optimizer's group "
                                              f"has {len(live['params'])}")  # fmt: skip
        for key, value in live.items():
            if key == "params" or value is None:
                continue
            if key not in group:
                check.fail(field, f"has no {key!r}, which the optimizer needs")
            if not _same_kind(group[key], value):
                check.fail(f"{field}[{key!r}]", f"is {_describe(group[key])}, expected {_kind(value)}")
        for key in _SET_LATER:
            if key in group and not _same_kind(group[key], 1.0):
                check.fail(f"{field}[{key!r}]", f"is {_describe(group[key])}, expected a number")
        _check_hyperparameters(check, field, group, optimizer)
        for j, (pid, p) in enumerate(zip(group["params"], live["params"], strict=True)):
            check.instance(f"{field}['params'][{j}]", pid, str if sharded else int,
                           "a parameter name" if sharded else "a parameter index")  # fmt: skip
            if pid in params:
                check.fail(f"{field}['params'][{j}]", f"repeats parameter {pid!r}")
            params[pid] = (p, live)
    return params


def _check_state_entry(check: _Checker, field: str, state: Any, probed: tuple[dict[str, Any], bool] | None,
                       name: str, p: torch.Tensor, group: dict[str, Any]) -> None:  # fmt: skip
    """One parameter's state: the keys the optimizer keeps (when probed), each tensor's shape and dtype kind,
    each number's kind (a step count is an integer >= 0)."""
    check.instance(field, state, dict, "a dict")
    expected, exact = probed if probed is not None else ({}, False)
    if probed is not None and state and set(state) != set(expected):
        check.fail(field, f"has keys {sorted(map(str, state))}, the optimizer keeps {sorted(expected)} for "
                          f"parameter {name!r}")  # fmt: skip
    shapes = _state_shapes(tuple(p.shape), group)
    if exact:
        shapes = {k: tuple(v.shape) for k, v in expected.items() if isinstance(v, torch.Tensor)}
    for key, value in state.items():
        where, ref = f"{field}[{key!r}]", expected.get(key)
        check.instance(where, value, (torch.Tensor, int, float), "a tensor or a number")
        if key in shapes:
            check.tensor(where, value)
            if tuple(value.shape) != shapes[key]:
                check.fail(where, f"has shape {tuple(value.shape)}, parameter {name!r} of shape {tuple(p.shape)} "
                                  f"needs {shapes[key]}")  # fmt: skip
        if isinstance(ref, torch.Tensor):
            check.tensor(where, value)
            if value.dtype != ref.dtype and not (value.is_floating_point() and ref.is_floating_point()):
                check.fail(where, f"has dtype {value.dtype}, the optimizer keeps {ref.dtype}")
        elif ref is not None and not _same_kind(value, ref):
            check.fail(where, f"is {_describe(value)}, expected {_kind(ref)}")
        count = value.item() if key == "step" and isinstance(value, torch.Tensor) and value.numel() == 1 else value
        if (isinstance(value, int) or key == "step") and not _is_count(count):
            check.fail(where, f"is {count}, expected a count in [0, 2**63)")


def _is_count(value: Any) -> bool:
    """A whole number in [0, 2**63) (optimizers keep step counts as ints, floats or 0-d tensors)."""
    return isinstance(value, int | float) and math.isfinite(value) and value == int(value) and 0 <= value < _INT64


def _check_optimizer(
    check: _Checker, saved: dict[str, Any], optimizer: torch.optim.Optimizer, model: torch.nn.Module, sharded: bool
) -> None:
    """Groups, their parameters and hyper-parameters, and each parameter's state against `optimizer`."""
    params = _check_groups(check, saved["param_groups"], optimizer, sharded)
    names = {id(p): name for name, p in model.named_parameters()}
    probes: dict[tuple[int, tuple[int, ...], torch.dtype], tuple[dict[str, Any], bool] | None] = {}
    for pid, state in saved["state"].items():
        field = f"optimizer['state'][{pid!r}]"
        if pid not in params:
            check.fail(field, "belongs to no parameter of optimizer['param_groups']")
        p, group = params[pid]
        probe_key = (id(group), tuple(p.shape), p.dtype)
        if probe_key not in probes:
            probes[probe_key] = _probed_state(optimizer, group, p)
        _check_state_entry(check, field, state, probes[probe_key], names.get(id(p), str(pid)), p, group)


def read_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """The payload of `path`, unpickled safely and checked against `model` (and `optimizer`); nothing is
    restored. Raises `CheckpointError` naming the file and the field."""
    path = Path(path)
    payload = _read(path)
    check = _Checker(path)
    _check_payload(check, payload)
    _check_model(check, payload["model"], model, payload.get("partial", False))
    if optimizer is not None:
        if payload["optimizer"] is None:
            check.fail("has", "no optimizer state")
        if payload["sharded"] != is_sharded(model):
            written, here = ("an FSDP2", "a") if payload["sharded"] else ("a", "an FSDP2")
            check.fail("was", f"written by {written} run, its optimizer state does not fit {here} run "
                              "(resume with the same dist.strategy, or load only the model)")  # fmt: skip
        _check_optimizer(check, payload["optimizer"], optimizer, model, payload["sharded"])
    return payload


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> tuple[int, dict[str, Any]]:
    """Restore `model` (and `optimizer`, and the random streams) from `path`; returns (step, extra).

    The file is checked whole (`read_checkpoint`) before anything is restored."""
    path = Path(path)
    payload = read_checkpoint(path, model, optimizer)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if optimizer is not None:  # set_state_dict only fills keys the groups already have (e.g. "initial_lr")
            for group, saved in zip(optimizer.param_groups, payload["optimizer"]["param_groups"], strict=True):
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
            model.load_state_dict(payload["model"], strict=not payload.get("partial", False))  # names checked
            if optimizer is not None:
                optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: the model or optimizer does not fit this checkpoint: {e}") from None
    if restore_rng:
        set_rng_state(payload["rng"])
    return payload["step"], payload["extra"]
