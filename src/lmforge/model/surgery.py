"""Model surgery: replace submodules chosen by name or predicate, in place (undoably) or on a view.

Selection. `where` is a name pattern matched with `fnmatch` against the names of `model.named_modules()`
("blocks.*.attn.q_proj"; `*` also crosses dots: "*_proj" is every projection), several patterns (any
may match), or a predicate `(name, module) -> bool`. The walk is top-down and does not enter a selected
module: what a factory receives is replaced whole, never also inside. The root itself is never selected.
A module reachable under several names is replaced at each of them by the same new module.

Swap. `factory(name, old) -> new` builds each replacement; `new` may hold `old` (a wrapper: LoRA's frozen
base, a recording hook) or only its parameters (`MatVecLinear`), or new tensors (a quantized linear made from
`old.weight`). The names of the parameters under `name` are whatever `new` registers: unchanged when it holds
`old`'s parameters under their old attribute names, `name.base.weight` when it keeps `old` as `base`.
`swap_modules` returns a `Swap`: the model it changed and, by name, every module it replaced;
`Swap.restore()` puts them back, so state-dict names, exports and outputs are those from before the swap.
A `Swap` keeps the replaced modules (and their tensors) alive: drop it to free them, e.g. after quantizing.

How the next modules plug in (factories, not code here):
    LoRA               swap_modules(model, "blocks.*.attn.*_proj", lambda _, old: LoRALinear(old, r=8)): the
                       adapter keeps `old` frozen as `base` and adds its low-rank product; merging writes the
                       merged weight into `base` and `restore()`s.
    quantized linears  a factory that quantizes `old.weight` and keeps no reference to `old`.
    matvec views       `infer.matvec.matvec_view` (below).

View. `view(model)` copies the module tree and shares every tensor the modules hold: parameters, buffers and
tensor attributes (such as a MoE's last `aux_loss`), the same tensor objects, so training the view trains the
model, and the same `RuntimeOptions` object (`model.runtime`: switching the backend switches both). Everything
else is copied: the view has its own module objects and other attributes, and a swap on it leaves the model's
modules as they were. `swap_modules(..., on_view=True)`
swaps on such a view: `infer.matvec.matvec_view` is `swap_modules(model, is Linear, MatVecLinear, on_view=True)`.

Mixture-of-experts layers expose their expert matrices as `moe.ExpertLinear` modules (`forward(x, e)`), so
"blocks.*.mlp.*_proj" reaches dense projections and experts alike; a factory dispatches on the module type.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.model.runtime import RuntimeOptions
from lmforge.utils.errors import LmforgeError

Where = str | Sequence[str] | Callable[[str, nn.Module], bool]
Factory = Callable[[str, nn.Module], nn.Module]


class SurgeryError(LmforgeError):
    """A selection that matches nothing, or a factory that returns no module."""


@dataclass
class Swap:
    """What `swap_modules` did: the model it changed (the original, or its view) and, by qualified name,
    the module each replacement took the place of."""

    model: nn.Module
    replaced: dict[str, nn.Module]

    def restore(self) -> nn.Module:
        """Put every replaced module back where it was; returns the model."""
        for name, old in self.replaced.items():
            parent, _, attr = name.rpartition(".")
            setattr(self.model.get_submodule(parent), attr, old)
        return self.model


def _matcher(where: Where) -> Callable[[str, nn.Module], bool]:
    if callable(where):
        return where
    patterns = (where,) if isinstance(where, str) else tuple(where)
    return lambda name, _: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _selected(model: nn.Module, where: Where) -> list[tuple[nn.Module, str, str, nn.Module]]:
    """(parent, attribute, qualified name, module) of every selected module, top-down (module docstring)."""
    match = _matcher(where)
    found: list[tuple[nn.Module, str, str, nn.Module]] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for attr, child in parent._modules.items():  # every name, a module held twice included
            if child is None:
                continue
            name = prefix + attr
            if match(name, child):
                found.append((parent, attr, name, child))
            else:
                visit(child, name + ".")

    visit(model, "")
    return found


def select_modules(model: nn.Module, where: Where) -> list[str]:
    """The qualified names `where` selects in `model` (what `swap_modules` would replace), top-down."""
    return [name for _, _, name, _ in _selected(model, where)]


def view(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree holding the same tensors (parameters, buffers and tensor attributes) and
    the same runtime options."""
    kept = (torch.Tensor, RuntimeOptions)
    attributes = (t for m in model.modules() for t in vars(m).values() if isinstance(t, kept))
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers(), attributes)}
    return copy.deepcopy(model, shared)


def swap_modules(model: nn.Module, where: Where, factory: Factory, *, on_view: bool = False) -> Swap:
    """Replace each module `where` selects by `factory(name, old)`, in `model` or (`on_view`) in a view of it.

    Raises `SurgeryError` when nothing is selected (a misspelt pattern) or the factory returns no module;
    then nothing has been changed."""
    target = view(model) if on_view else model
    chosen = _selected(target, where)
    if not chosen:
        raise SurgeryError(f"swap_modules: where={where!r} selects no module of {type(model).__name__}")
    new: dict[int, nn.Module] = {}
    for _, _, name, old in chosen:
        if id(old) not in new:
            new[id(old)] = factory(name, old)
        if not isinstance(new[id(old)], nn.Module):
            raise SurgeryError(f"swap_modules: the factory returned {type(new[id(old)]).__name__} for {name!r}, "
                               "expected an nn.Module")  # fmt: skip
    for parent, attr, _, old in chosen:
        setattr(parent, attr, new[id(old)])
    return Swap(target, {name: old for _, _, name, old in chosen})
