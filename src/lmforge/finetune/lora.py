"""LoRA, rsLoRA and DoRA: low-rank adapters on a frozen model's linear maps, by model surgery.

LoRA (Hu et al. 2021). A frozen linear map W (out, in) gets a trainable low-rank update:

    h = W x + s B A dropout(x),    A (r, in), B (out, r),    s = alpha / r

A starts Kaiming-uniform (a = sqrt 5, as nn.Linear and PEFT), B at zero, so at init h = W x exactly. Only A and
B train: r (in + out) parameters instead of in * out. Merging writes W' = W + s B A into the frozen weight (the
adapted model then costs nothing extra); unmerging subtracts it back.

QLoRA (Dettmers et al. 2023) is the same on a base whose W is stored in 4-bit NF4 (`quant.nf4.NF4Linear`,
dequantized into bf16 at each forward), with float32 adapters: the frozen model's memory drops about 7x while the
adapters train in full precision. Such a base is not merged into (4 bits would round the update away). The same
holds on any quantized base `lmforge quantize` writes or a GGUF file loads (QuantLinear, Int8Linear, W8A8Linear).

rsLoRA (Kalajdzievski 2023): s = alpha / sqrt(r), which keeps the update's scale stable as r grows.

DoRA (Liu et al. 2024) splits the adapted weight into a magnitude m (out,) and a direction:

    W' = m * (W + s B A) / ||W + s B A||_c,      ||V||_c = the norm of each output row of V (PEFT's "column")

m starts at ||W||_c (so W' = W at init) and trains with A and B. As in the paper (section 4.3) the norm is
treated as a constant in the backward pass (detached), which saves memory and, the paper shows, costs no
accuracy. Unmerged, the forward never forms W' (PEFT's formulation; b the base bias):

    h = W x + b + (m / n - 1) W dropout(x) + (m / n) s B A dropout(x),    n = ||W + s B A||_c (detached)

which is W' x + b when dropout is off. Merging writes W' into the frozen weight and keeps m / n to unmerge.

Where adapters go. `add_adapter(model, LoraConfig(...), name)` wraps each selected module (name patterns of
`model.surgery`, default every attention and MLP projection) in a `LoRALayer` that keeps the old module frozen
as `base` and holds any number of named adapters, one active at a time (`set_adapter`). A `LoRALayer` wraps a
`nn.Linear` (forward(x)) or a MoE `ExpertLinear` (forward(x, e): E experts, each with its own A, B and m, shapes
(E, r, in), (E, out, r), (E, out)). Its `weight` is the adapted weight (differentiable in the adapter), so code
that reads a projection's weight rather than calling it (MLA's absorbed attention) sees the adapter too.
Parameter names: `<module>.base.weight` for the frozen weight, `<module>.adapters.<name>.lora_A` (and lora_B,
magnitude) for an adapter. `merge_and_unload` merges the active adapter and puts the plain modules back: a
model with the original parameter names, for `lmforge.save` and the ecosystem.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.configfile import check, check_finite, check_positive
from lmforge.model.moe import ExpertLinear
from lmforge.model.surgery import Where, swap_modules
from lmforge.quant.llm_int8 import Int8Linear
from lmforge.quant.nf4 import NF4Linear
from lmforge.quant.smoothquant import W8A8Linear
from lmforge.quant.weight_only import QuantLinear
from lmforge.utils.errors import LmforgeError

__all__ = [
    "DEFAULT_TARGETS",
    "LoRAAdapter",
    "LoRAError",
    "LoRALayer",
    "LoraConfig",
    "adapter_names",
    "adapter_parameters",
    "adapter_state_dict",
    "add_adapter",
    "layers",
    "load_adapter_state_dict",
    "merge_adapter",
    "merge_and_unload",
    "resolve_adapter",
    "set_adapter",
    "train_only_adapter",
    "unmerge_adapter",
]

DEFAULT_TARGETS = ("blocks.*.attn.*_proj", "blocks.*.mlp.*_proj")  # attention and MLP (and expert) projections


class LoRAError(LmforgeError):
    """An adapter that does not fit: a module LoRA cannot wrap, an unknown or duplicate adapter name, a merge
    in the wrong state, a state dict that does not match."""


@dataclass(frozen=True)
class LoraConfig:
    """An adapter's shape: rank `r`, `alpha` (scaling alpha / r, or alpha / sqrt(r) with `rslora`), `dropout` on
    the adapter's input, DoRA's magnitude with `dora`, and the modules it goes on (`target`: surgery patterns)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target: Sequence[str] = DEFAULT_TARGETS
    rslora: bool = False
    dora: bool = False

    def __post_init__(self) -> None:
        check_positive("r", self.r)
        check_finite("alpha", self.alpha)
        check_finite("dropout", self.dropout, at_least=0.0)
        check(self.dropout < 1.0, "dropout", self.dropout, "must be below 1")
        target = (self.target,) if isinstance(self.target, str) else tuple(self.target)
        check(bool(target) and all(isinstance(t, str) and t for t in target), "target", self.target,
              "must be one or more module name patterns")  # fmt: skip
        object.__setattr__(self, "target", target)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRAAdapter(nn.Module):
    """One adapter of a layer: lora_A (..., r, in), lora_B (..., out, r), with DoRA magnitude (..., out); the
    leading dimension is the experts' for an `ExpertLinear`."""

    def __init__(self, weight: Tensor, config: LoraConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        *lead, out_features, in_features = weight.shape
        self.config, self.scaling = config, config.scaling
        kw = {"device": weight.device, "dtype": dtype or weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(*lead, config.r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(*lead, out_features, config.r, **kw))
        for a in self.lora_A.detach().view(-1, config.r, in_features):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.magnitude = nn.Parameter(row_norm(weight.detach()).to(kw["dtype"])) if config.dora else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged_scale: Tensor | None = None  # DoRA, while merged: m / n of the merge (to unmerge)

    def delta(self, e: int | None = None) -> Tensor:
        """s B A: (..., out, in), or expert e's (out, in)."""
        a, b = (self.lora_A, self.lora_B) if e is None else (self.lora_A[e], self.lora_B[e])
        return self.scaling * (b @ a)

    def dora_scale(self, weight: Tensor, e: int | None = None) -> Tensor:
        """m / ||W + s B A||_c (..., out), or expert e's, the norm detached (module docstring); `weight` is W
        (of expert e)."""
        magnitude = self.magnitude if e is None else self.magnitude[e]
        return magnitude / row_norm(weight + self.delta(e)).detach()


def row_norm(weight: Tensor) -> Tensor:
    """The L2 norm of each output row of `weight` (..., out, in) -> (..., out), in the weight's dtype."""
    return torch.linalg.vector_norm(weight.float(), dim=-1).to(weight.dtype)


QUANTIZED_BASES = (NF4Linear, QuantLinear, Int8Linear, W8A8Linear)  # frozen bases whose weight is codes


class LoRALayer(nn.Module):
    """A frozen `base` (nn.Linear, ExpertLinear, or a quantized linear: QLoRA's NF4Linear, `lmforge quantize`'s
    layers) plus named adapters, `active` one of them or None."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, ExpertLinear, *QUANTIZED_BASES)):
            raise LoRAError(f"LoRA wraps nn.Linear, ExpertLinear and quantized linear modules, not "
                            f"{type(base).__name__}")  # fmt: skip
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: str | None = None  # the adapter merged into base's weight

    @property
    def base_weight(self) -> Tensor:
        return self.base.weight

    @property
    def weight(self) -> Tensor:
        """The adapted weight: base's with the active adapter (unless merged, then base's already is)."""
        w, adapter = self.base_weight, self._adapter()
        if adapter is None:
            return w
        if adapter.magnitude is None:
            return w + adapter.delta()
        return adapter.dora_scale(w).unsqueeze(-1) * (w + adapter.delta())

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base, "bias", None)

    def _adapter(self) -> LoRAAdapter | None:
        """The adapter the forward adds: the active one unless it is merged."""
        if self.active is None or self.merged == self.active:
            return None
        return self.adapters[self.active]

    def forward(self, x: Tensor, *expert: int) -> Tensor:
        out = self.base(x, *expert)
        adapter = self._adapter()
        if adapter is None:
            return out
        e = expert[0] if expert else None
        a, b = (adapter.lora_A, adapter.lora_B) if e is None else (adapter.lora_A[e], adapter.lora_B[e])
        dropped = adapter.dropout(x)
        update = F.linear(F.linear(dropped, a), b) * adapter.scaling
        if adapter.magnitude is None:
            return out + update
        w = self.base_weight if e is None else self.base_weight[e]
        scale = adapter.dora_scale(w, e)
        plain = F.linear(dropped, w) if dropped is not x else out - (0 if self.bias is None else self.bias)
        return out + (scale - 1) * plain + scale * update

    def merge(self) -> None:
        """Write the active adapter into base's weight (module docstring)."""
        if self.merged is not None:
            raise LoRAError(f"adapter {self.merged!r} is merged already; unmerge it first")
        if self.active is None:
            raise LoRAError("no active adapter to merge")
        if isinstance(self.base, QUANTIZED_BASES):
            bits = getattr(self.base, "bits", 4 if isinstance(self.base, NF4Linear) else 8)
            raise LoRAError(f"an adapter is not merged into a quantized base ({type(self.base).__name__}, {bits}-bit "
                            "codes), which would round it away: load the float model with the adapter "
                            "(lmforge.load(base, adapter=DIR, quantized=False)) and merge that")  # fmt: skip
        adapter = self.adapters[self.active]
        with torch.no_grad():
            w = self.base_weight
            delta = adapter.delta()
            if adapter.magnitude is None:
                w.add_(delta)
            else:
                adapter.merged_scale = (adapter.magnitude / row_norm(w + delta)).unsqueeze(-1)
                w.copy_(adapter.merged_scale * (w + delta))
        self.merged = self.active

    def unmerge(self) -> None:
        """Take the merged adapter back out of base's weight."""
        if self.merged is None:
            raise LoRAError("no adapter is merged")
        adapter = self.adapters[self.merged]
        with torch.no_grad():
            w = self.base_weight
            if adapter.magnitude is not None:
                w.div_(adapter.merged_scale)
                adapter.merged_scale = None
            w.sub_(adapter.delta())
        self.merged = None

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active!r}, merged={self.merged!r}"


def layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """(qualified name, layer) of every `LoRALayer` in `model`."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer))


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters `model` holds, in the order they were added."""
    names: dict[str, None] = {}
    for _, layer in layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def add_adapter(
    model: nn.Module, config: LoraConfig, name: str = "default", *, where: Where | None = None
) -> list[str]:
    """Add adapter `name` to the modules `config.target` (or `where`) selects, wrapping each in a `LoRALayer` the
    first time; it becomes the active adapter. Returns the adapted modules' names."""
    check(isinstance(name, str) and name.isidentifier(), "name", name, "must be an identifier (letters, digits, _)")
    if name in adapter_names(model):
        raise LoRAError(f"the model has an adapter named {name!r} already")
    if any(layer.merged is not None for _, layer in layers(model)):
        raise LoRAError("unmerge the merged adapter before adding another")

    def wrap(module_name: str, old: nn.Module) -> LoRALayer:
        layer = old if isinstance(old, LoRALayer) else LoRALayer(old)
        if layer.base_weight.dim() not in (2, 3):
            raise LoRAError(f"{module_name}: a weight of shape {tuple(layer.base_weight.shape)} is not a linear map")
        quantized = isinstance(layer.base, QUANTIZED_BASES)  # QLoRA: float32 adapters on a quantized base
        layer.adapters[name] = LoRAAdapter(layer.base_weight, config, torch.float32 if quantized else None)
        return layer.train(old.training)  # a new module trains by default; follow the model's mode

    swap = swap_modules(model, config.target if where is None else where, wrap)
    set_adapter(model, name)
    return list(swap.replaced)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` the active one everywhere (None: the base model alone)."""
    if name is not None and name not in adapter_names(model):
        raise LoRAError(f"no adapter named {name!r}; the model has {adapter_names(model)}")
    for _, layer in layers(model):
        if layer.merged is not None and layer.merged != name:
            raise LoRAError(f"adapter {layer.merged!r} is merged; unmerge it before switching")
        layer.active = name if name in layer.adapters else None


def merge_adapter(model: nn.Module) -> None:
    """Merge the active adapter into the frozen weights (outputs unchanged; no adapter cost per token)."""
    for _, layer in layers(model):
        if layer.active is not None:
            layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in layers(model):
        if layer.merged is not None:
            layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter (if any) and replace every `LoRALayer` by its base: the plain model, with the
    original parameter names. The adapters are gone."""
    found = list(layers(model))
    if not found:
        return model
    for _, layer in found:
        if layer.active is not None and layer.merged is None:
            layer.merge()
    swap_modules(model, lambda _, m: isinstance(m, LoRALayer), lambda _, layer: layer.base)
    return model


def adapter_parameters(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    """(qualified name, parameter) of adapter `name` (default: the active one) in every layer."""
    name = resolve_adapter(model, name)
    marker = f".adapters.{name}."
    return ((n, p) for n, p in model.named_parameters(remove_duplicate=False) if marker in n)


def train_only_adapter(model: nn.Module, name: str | None = None) -> int:
    """Freeze everything but adapter `name` (default: the active one); returns its parameter count."""
    name = resolve_adapter(model, name)
    for p in model.parameters():
        p.requires_grad_(False)
    total = 0
    for _, p in adapter_parameters(model, name):
        p.requires_grad_(True)
        total += p.numel()
    return total


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """Adapter `name`'s tensors by `<module>.lora_A` / `.lora_B` / `.magnitude` (module names of the plain
    model: what `load_adapter_state_dict` reads back)."""
    name = resolve_adapter(model, name)
    out = {}
    for module_name, layer in layers(model):
        if name in layer.adapters:
            for key, t in layer.adapters[name].named_parameters():
                out[f"{module_name}.{key}"] = t.detach()
    return out


def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor], name: str | None = None) -> None:
    """Copy `adapter_state_dict`'s tensors into adapter `name`; every key must match, both ways."""
    ours = adapter_state_dict(model, name)
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise LoRAError(f"the adapter's tensors do not match the model's: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}")  # fmt: skip
    with torch.no_grad():
        for key, t in ours.items():
            if state[key].shape != t.shape:
                raise LoRAError(f"{key}: shape {tuple(state[key].shape)}, the model's adapter has {tuple(t.shape)}")
            t.copy_(state[key])


def resolve_adapter(model: nn.Module, name: str | None) -> str:
    """`name` if the model has that adapter, else (None) the active adapter; a clear error otherwise."""
    names = adapter_names(model)
    if name is None:
        active = {layer.active for _, layer in layers(model)} - {None}
        if len(active) != 1:
            raise LoRAError(f"no active adapter; name one of {names}")
        return active.pop()
    if name not in names:
        raise LoRAError(f"no adapter named {name!r}; the model has {names}")
    return name
