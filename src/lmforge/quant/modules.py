"""The quantized layers a model can hold in place of `nn.Linear` / `nn.Embedding`, by type name, and the float
view of a model that holds them.

Every quantized layer (`QuantLinear`, `QuantEmbedding`, `Int8Linear`, `W8A8Linear`) has

    weight                   its dequantized weight (code that reads a projection's weight keeps working)
    bias                     a frozen parameter, or None
    spec()                   its settings besides the tensors (bits, group size, threshold, ...), JSON values
    from_state(state, spec)  the layer rebuilt from its `state_dict()` and `spec()`

so a quantized model saves as its state dict plus {name: {"type": type name, **spec}} (io/quantized.py), and
`dense_state_dict` gives the float weights under the names an unquantized model has (for GGUF export, merging).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.quant.llm_int8 import Int8Linear
from lmforge.quant.primitives import QuantError
from lmforge.quant.smoothquant import W8A8Linear
from lmforge.quant.weight_only import QuantEmbedding, QuantLinear

__all__ = [
    "QUANTIZED_TYPES", "bits_per_weight", "dense_state_dict", "dequantize_model", "layer_from_state", "layer_spec",
    "quantized_layers",
]

QUANTIZED_TYPES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (QuantLinear, QuantEmbedding, Int8Linear, W8A8Linear)
}


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> layer, for every quantized layer of `model` (module doc)."""
    return {name: m for name, m in model.named_modules() if type(m).__name__ in QUANTIZED_TYPES}


def layer_spec(layer: nn.Module) -> dict[str, Any]:
    """{"type": the layer's type name, **its spec()}: what a saved model lists for it."""
    return {"type": type(layer).__name__, **layer.spec()}


def layer_from_state(spec: dict[str, Any], state: dict[str, Tensor], where: str) -> nn.Module:
    """The quantized layer `spec` describes, holding `state` (its state-dict tensors); a `QuantError` naming `where`
    (the layer's name in its file) for an unknown type or a missing setting or tensor."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in QUANTIZED_TYPES:
        raise QuantError(f"{where}: unknown quantized layer type {kind!r} (known: {', '.join(QUANTIZED_TYPES)})")
    settings = {k: v for k, v in spec.items() if k != "type"}
    try:
        return QUANTIZED_TYPES[kind].from_state(state, settings)
    except KeyError as e:
        raise QuantError(f"{where}: a {kind} needs {e.args[0]!r}, which the file does not hold") from None


def bits_per_weight(layers: Iterable[nn.Module]) -> float:
    """Bits a weight of `layers` (quantized layers and plain linears) takes as held: codes, scales and offsets of
    a quantized one (`nbytes`), the weight tensor of a plain one; biases not counted."""
    layers = list(layers)
    held = sum(m.nbytes() if hasattr(m, "nbytes") else m.weight.nbytes for m in layers)
    return 8 * held / sum(m.in_features * m.out_features for m in layers)


def dense_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model.state_dict()` with each quantized layer's tensors replaced by its dequantized `weight` (and `bias`):
    the names and float values of the same model unquantized."""
    layers = quantized_layers(model)
    state = {}
    for name, t in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner not in layers:
            state[name] = t
    for name, layer in layers.items():
        with torch.no_grad():
            state[f"{name}.weight"] = layer.weight
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.detach()
    return state


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace, in place, every quantized layer of `model` by the `nn.Linear` (or `nn.Embedding`) holding its
    dequantized weight in `dtype` (default float32) and its bias: the float model the codes stand for."""
    for name, layer in quantized_layers(model).items():
        w = layer.weight.to(dtype or torch.float32)
        if isinstance(layer, QuantEmbedding):
            dense: nn.Module = nn.Embedding(*w.shape, _weight=w, _freeze=True)
        else:
            dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            dense.weight = nn.Parameter(w, requires_grad=False)
            if layer.bias is not None:
                dense.bias = nn.Parameter(layer.bias.detach().to(w.dtype), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, dense)
    return model
