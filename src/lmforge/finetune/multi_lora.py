"""Several LoRA adapters served at once: each row of a batch with its own adapter (multi-LoRA serving, as vLLM's,
after Punica and S-LoRA).

One engine holds one base model and K adapters; each request names the adapter it wants (the API's `model`
field). A merged adapter changes the weights for every row, so here the adapters stay apart and each adapted
layer adds its row's own update:

    h_b = W x_b + b + s_k B_k A_k x_b,     k = index[b]  (0: the base model, no adapter)

`stack_adapters(model)` stacks each `lora.LoRALayer`'s adapters once, for inference: A (K+1, r, in) and
B (K+1, out, r), r the largest rank (a smaller rank is zero-padded: a zero row of A and column of B add
nothing), the scaling s_k folded into B_k, slot 0 all zeros. Row b's update is then two batched matmuls over
the gathered adapters (Punica's BGMV, "batched gather matrix-vector"):

    u_b = (x_b A_{k_b}^T) B_{k_b}^T,     x_b (T, in) -> (T, r) -> (T, out)

DoRA (lora.py) with dropout off is h = g (W x + s B A x) + b, g = m / ||W + s B A||_c per output row: nothing
trains here, so g_k is computed once per adapter and stacked as G (K+1, out), ones in slot 0 and for plain LoRA
adapters (present only when some adapter is DoRA):

    h_b = G_{k_b} * (W x_b + u_b) + b

The row indices live in one `AdapterSelector` that every stacked layer shares: before each forward the engine's
runner sets `selector.index` (B,), one adapter index per row of the forward (its padding rows 0); None runs every
row on the base. Adapters on MoE experts and merged adapters are refused; a layer an adapter does not touch gets
zeros in that adapter's slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lmforge.finetune.lora import LoRAError, LoRALayer, adapter_names, layers
from lmforge.model.moe import ExpertLinear
from lmforge.model.surgery import swap_modules

__all__ = ["AdapterSelector", "StackedLoRALinear", "selector_of", "served_adapters", "stack_adapters"]


class AdapterSelector:
    """Which adapter each row of the next forward uses: `index` (B,) long (0: none), or None (all rows: none);
    `names[k - 1]` is adapter k's name."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.index: Tensor | None = None


class StackedLoRALinear(nn.Module):
    """A frozen linear `base` plus stacked adapters (module docstring): A (K+1, r, in), B (K+1, out, r) with the
    scaling folded in, G (K+1, out) or None; the rows' adapters from `selector`."""

    def __init__(self, base: nn.Module, a: Tensor, b: Tensor, g: Tensor | None, selector: AdapterSelector) -> None:
        super().__init__()
        self.base, self.selector = base, selector
        self.register_buffer("lora_A", a, persistent=False)
        self.register_buffer("lora_B", b, persistent=False)
        self.register_buffer("dora_scale", g, persistent=False)

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base, "bias", None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        index = self.selector.index
        if index is None:
            return out
        if x.shape[0] != index.shape[0]:
            raise LoRAError(f"the adapter index has {index.shape[0]} rows, the batch {x.shape[0]}")
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
        update = (rows @ self.lora_A[index].transpose(1, 2)) @ self.lora_B[index].transpose(1, 2)
        update = update.view(out.shape)
        if self.dora_scale is None:
            return out + update
        g = self.dora_scale[index].view(index.shape[0], *[1] * (out.dim() - 2), -1)
        bias = 0 if self.bias is None else self.bias
        return g * (out - bias + update) + bias

    def extra_repr(self) -> str:
        k, r = self.lora_A.shape[0] - 1, self.lora_A.shape[1]
        return f"adapters={k}, rank={r}, dora={self.dora_scale is not None}"


def stack_adapters(model: nn.Module, served: Sequence[str] | None = None) -> list[str]:
    """Turn every `LoRALayer` of `model` into a `StackedLoRALinear` holding all its adapters (module docstring),
    all sharing one `AdapterSelector`; returns the names they are served under (adapter k is names[k - 1]):
    `served`, one per adapter in the order they were added, or the adapters' own names. The model then serves the
    base or any adapter per row; the adapters' parameters are gone (inference only)."""
    names = adapter_names(model)
    found = list(layers(model))
    if not found:
        raise LoRAError("the model has no LoRA adapters to stack (lmforge.load(base, adapter=DIR) or add_adapter)")
    served = names if served is None else list(served)
    if len(served) != len(names) or len(set(served)) != len(served):
        raise LoRAError(f"served names {served}: one distinct name per adapter of the model ({names})")
    for name, layer in found:
        if layer.merged is not None:
            raise LoRAError(f"{name}: adapter {layer.merged!r} is merged into the weights; unmerge it to serve "
                            "adapters side by side")  # fmt: skip
        if isinstance(layer.base, ExpertLinear):
            raise LoRAError(f"{name}: adapters on MoE experts are not served side by side; merge the adapter "
                            "(lmforge.finetune.lora.merge_and_unload) and serve the merged model")  # fmt: skip
        if layer.base_weight.dim() != 2:
            raise LoRAError(f"{name}: a {type(layer.base).__name__} base is not served side by side")
    selector = AdapterSelector(served)
    swap_modules(model, lambda _, m: isinstance(m, LoRALayer), lambda _, layer: _stacked(layer, names, selector))
    return served


@torch.no_grad()
def _stacked(layer: LoRALayer, names: list[str], selector: AdapterSelector) -> StackedLoRALinear:
    w = layer.base_weight
    out_features, in_features = w.shape
    rank = max(adapter.config.r for adapter in layer.adapters.values())
    kw = {"device": w.device, "dtype": w.dtype}
    a = torch.zeros(len(names) + 1, rank, in_features, **kw)
    b = torch.zeros(len(names) + 1, out_features, rank, **kw)
    dora = any(adapter.magnitude is not None for adapter in layer.adapters.values())
    g = torch.ones(len(names) + 1, out_features, **kw) if dora else None
    for k, name in enumerate(names, start=1):
        if name not in layer.adapters:  # an adapter that skips this layer: zeros
            continue
        adapter = layer.adapters[name]
        r = adapter.config.r
        a[k, :r] = adapter.lora_A.to(w.dtype)
        b[k, :, :r] = (adapter.lora_B * adapter.scaling).to(w.dtype)
        if adapter.magnitude is not None:
            g[k] = adapter.dora_scale(w.to(adapter.lora_A.dtype)).to(w.dtype)
    return StackedLoRALinear(layer.base, a, b, g, selector)


def selector_of(model: nn.Module) -> AdapterSelector | None:
    """The `AdapterSelector` of a model `stack_adapters` prepared (None: it serves no stacked adapters)."""
    for m in model.modules():
        if isinstance(m, StackedLoRALinear):
            return m.selector
    return None


def served_adapters(model: nn.Module) -> list[str]:
    """The adapters a stacked model serves (adapter k is the k-th, 1-based), [] for a plain model."""
    selector = selector_of(model)
    return [] if selector is None else list(selector.names)
