"""A decode step compiled for one model, without re-checking the model's module tree on every call.

Before running a compiled graph, `torch.compile` checks its guards: that every input still is what the graph was
traced for. A module argument brings a check per submodule (type, hooks, attributes) and per parameter (dtype,
shape, strides): about 10,000 checks for a 30-layer model, ~1 ms a call on a CPU, 5% of a 20 ms decode step. A
serving step's model does not change between calls, so, as vLLM calls its compiled graphs past the guards, the
checks on the module tree are dropped (`guard_filter_fn`); those on the other inputs (ids, positions, cache
tensors: shapes, dtypes) stay.

What keeps that safe: dynamo keeps its graphs per code object, so the step function gets a code object of its
own for each model (`own_code`): graphs traced for one model are never offered to another, whatever their shapes
(a draft model, engines of two models in one process), while the engines of one model share them; a model cast
or moved (its first parameter's storage, dtype or device changed: `fingerprint`) counts as another model. What
the caller must not do is restructure a model (swap a module, add a hook) once it has stepped; `check_unchanged`
catches a cast or a move under a compiled step with a clear error.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_CODES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, types.CodeType]] = weakref.WeakKeyDictionary()


def own_code(method: Callable, model: nn.Module) -> Callable:
    """`method` (a bound method) with a code object of `model`'s own: the same one for every call with `model` as
    it is now (once cast or moved, a new one)."""
    func = method.__func__
    code = _CODES.setdefault(model, {}).setdefault((func.__code__, fingerprint(model)), func.__code__.replace())
    clone = types.FunctionType(code, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    return types.MethodType(clone, method.__self__)


def skip_module_guards(entries: list[Any]) -> list[bool]:
    """A `guard_filter_fn`: keep every guard but those on the module tree passed in (see the module docstring)."""
    return [not entry.orig_guard.source.is_unspecialized_nn_module() for entry in entries]


def compile_step(method: Callable, model: nn.Module, **options: Any) -> Callable:
    """`torch.compile(method, **options)` with its own code object for `model` and no guards on module trees."""
    return torch.compile(own_code(method, model), options={"guard_filter_fn": skip_module_guards}, **options)


def fingerprint(model: nn.Module) -> tuple:
    """What `check_unchanged` compares: the first parameter's storage, dtype and device."""
    first = next(model.parameters())
    return first.data_ptr(), first.dtype, first.device


def check_unchanged(model: nn.Module, seen: tuple) -> None:
    """Raise if `model` was cast or moved since `fingerprint` gave `seen` (its compiled step would be stale)."""
    if fingerprint(model) != seen:
        raise RuntimeError(
            "the model was cast, moved or reloaded after its decode step was compiled; build a new engine "
            "(or decoder) for it"
        )
