"""The merge methods by their mergekit names, with the parameters each takes (names, scopes, defaults as mergekit's
registry declares them), so that a mergekit YAML means the same thing to lmforge.

A parameter's scope says where it is read: "shared" once per output tensor (slerp's t, normalize, lambda),
"input" per input model (linear's weight), "non_base" per input except the base (weight and density of the task
vector methods). Each method is a function of one output tensor's `MethodInputs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lmforge.merge.breadcrumbs import GAMMA, breadcrumbs, breadcrumbs_ties
from lmforge.merge.dare import dare_linear, dare_ties
from lmforge.merge.linear import linear
from lmforge.merge.model_stock import model_stock
from lmforge.merge.slerp import slerp
from lmforge.merge.task_arithmetic import Rescale, task_arithmetic
from lmforge.merge.ties import ties
from lmforge.utils.errors import LmforgeError

REQUIRED = object()
Scope = Literal["shared", "input", "non_base"]


class MergeConfigError(LmforgeError):
    """A merge configuration names an unknown method, a bad parameter value, or models that cannot be merged."""


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _rescale(value: Any) -> Rescale:
    """mergekit's `rescale: true|false` (true: the L1 rule), or lmforge's "l1" / "paper" (DARE's 1 / density)."""
    if isinstance(value, bool):
        return "l1" if value else None
    if value in ("l1", "paper"):
        return value
    raise ValueError(f"expected true, false, 'l1' or 'paper', got {value!r}")


@dataclass(frozen=True)
class Param:
    name: str
    scope: Scope
    validate: Callable[[Any], Any]
    default: Any = REQUIRED


@dataclass
class MethodInputs:
    """One output tensor's inputs: the tensors in input order, which one is the base, the resolved parameters
    (shared, and one dict per input), and the generator random methods draw from."""

    tensors: list[Tensor]
    base: int | None
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]
    generator: torch.Generator | None = None

    @property
    def base_tensor(self) -> Tensor:
        assert self.base is not None
        return self.tensors[self.base]

    def others(self, key: str | None = None) -> list[Any]:
        """The non-base tensors (or, given `key`, their parameter `key`), in input order."""
        rows = [(t, p) for i, (t, p) in enumerate(zip(self.tensors, self.per_input, strict=True)) if i != self.base]
        return [t if key is None else p[key] for t, p in rows]


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[MethodInputs], Tensor]
    params: tuple[Param, ...]
    needs_base: bool
    min_inputs: int = 1
    max_inputs: int | None = None


def _task_params(normalize: bool, rescale: bool, gamma: bool = False) -> tuple[Param, ...]:
    params = (Param("int8_mask", "shared", _bool, False),  # mergekit's mask storage option: the result is the same
              Param("normalize", "shared", _bool, normalize), Param("rescale", "shared", _rescale, _rescale(rescale)),
              Param("lambda", "shared", _float, 1.0), Param("weight", "non_base", _float),
              Param("density", "non_base", _float, 1.0))  # fmt: skip
    return (*params, Param("gamma", "non_base", _float, GAMMA)) if gamma else params


def _common(x: MethodInputs) -> dict[str, Any]:
    return {"normalize": x.shared["normalize"], "lam": x.shared["lambda"], "rescale": x.shared["rescale"]}


def _task_arithmetic(x: MethodInputs) -> Tensor:
    return task_arithmetic(x.base_tensor, x.others(), x.others("weight"), x.shared["normalize"], x.shared["lambda"])


def _ties(x: MethodInputs) -> Tensor:
    return ties(x.base_tensor, x.others(), x.others("weight"), x.others("density"), **_common(x))


def _dare(combine: Callable[..., Tensor]) -> Callable[[MethodInputs], Tensor]:
    def run(x: MethodInputs) -> Tensor:
        return combine(x.base_tensor, x.others(), x.others("weight"), x.others("density"), **_common(x),
                       generator=x.generator)  # fmt: skip

    return run


def _breadcrumbs(combine: Callable[..., Tensor]) -> Callable[[MethodInputs], Tensor]:
    def run(x: MethodInputs) -> Tensor:
        return combine(x.base_tensor, x.others(), x.others("weight"), x.others("density"), x.others("gamma"),
                       **_common(x))  # fmt: skip

    return run


def _linear(x: MethodInputs) -> Tensor:
    return linear(x.tensors, [p["weight"] for p in x.per_input], x.shared["normalize"])


def _slerp(x: MethodInputs) -> Tensor:
    [other] = x.others()
    return slerp(x.shared["t"], x.base_tensor, other)


def _model_stock(x: MethodInputs) -> Tensor:
    return model_stock(x.base_tensor, x.others(), x.shared["filter_wise"])


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("linear", _linear, (Param("weight", "input", _float), Param("normalize", "shared", _bool, True)),
           needs_base=False),
    Method("slerp", _slerp, (Param("t", "shared", _float),), needs_base=True, min_inputs=2, max_inputs=2),
    Method("task_arithmetic", _task_arithmetic, _task_params(False, False), needs_base=True),
    Method("ties", _ties, _task_params(True, False), needs_base=True),
    Method("dare_linear", _dare(dare_linear), _task_params(False, True), needs_base=True),
    Method("dare_ties", _dare(dare_ties), _task_params(False, True), needs_base=True),
    Method("breadcrumbs", _breadcrumbs(breadcrumbs), _task_params(False, False, gamma=True), needs_base=True),
    Method("breadcrumbs_ties", _breadcrumbs(breadcrumbs_ties), _task_params(False, False, gamma=True),
           needs_base=True),
    Method("model_stock", _model_stock, (Param("filter_wise", "shared", _bool, False),), needs_base=True,
           min_inputs=3),
)}  # fmt: skip
RANDOM = frozenset({"dare_linear", "dare_ties"})


def get_method(name: str, where: str) -> Method:
    if name not in METHODS:
        raise MergeConfigError(f"{where}: merge_method: unknown method {name!r} (lmforge has {', '.join(METHODS)})")
    return METHODS[name]
