"""Quantized models in a model directory: lmforge's layout, read back bit for bit by `lmforge.load`.

    config.json         the model's Hugging Face config (as `save_hf` writes it), plus
                        "quantization_config": {"quant_method": "lmforge", "format_version": 1,
                                                "layers": {name: {"type": "QuantLinear", "bits": 4, ...}}}
    model.safetensors   the model's own state dict under lmforge's parameter names (a quantized layer's codes have
                        no Hugging Face name): each quantized layer's tensors as it holds them (packed 4-bit or
                        8-bit codes, float32 scales and offsets; quant/modules.py), every other tensor as it is
                        (sharded with an index above 4 GiB, as `save_hf`)
    tokenizer files     as `save_hf` writes them

`layers` names each quantized layer with its type and settings (`quant.modules.layer_spec`); loading builds the
model on the meta device, puts each listed layer back from its tensors (`layer_from_state`) and assigns the rest, so
the file's tensors are used in place (memory-mapped). transformers does not read this layout: its quantizers read
their own formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.io.hf import (
    KEEP_FP32,
    SHARD_BYTES,
    hf_config,
    open_weights,
    quant_method,
    read_config,
    write_model_directory,
)  # fmt: skip
from lmforge.io.hf_arch import ModelFilesError, config_from_hf
from lmforge.model.transformer import Transformer
from lmforge.quant.modules import layer_from_state, layer_spec, quantized_layers
from lmforge.quant.primitives import QuantError

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "is_quantized_directory", "load_quantized", "save_quantized"]

QUANT_METHOD = "lmforge"
FORMAT_VERSION = 1


def is_quantized_directory(path: str | Path) -> bool:
    """Whether `path` is a model directory in this layout (its config.json's quantization_config says so)."""
    return quant_method(path) == QUANT_METHOD


def save_quantized(model: Transformer, path: str | Path, tokenizer: Any | None = None, *,
                   shard_bytes: int = SHARD_BYTES) -> None:  # fmt: skip
    """Write `model`, which holds quantized layers, in this layout (module doc), replacing the directory whole."""
    layers = {name: layer_spec(m) for name, m in quantized_layers(model).items()}
    if not layers:
        raise QuantError("save_quantized: the model holds no quantized layer (save it with lmforge.save)")
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    config = hf_config(model, tensors)
    config["dtype"] = str(model.norm.weight.dtype).removeprefix("torch.")
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "layers": layers}
    write_model_directory(path, tensors, config, shard_bytes=shard_bytes, tokenizer=tokenizer)


def _layers(path: Path, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    quant = config["quantization_config"]
    where = f"{path / 'config.json'}: quantization_config"
    if quant.get("format_version") != FORMAT_VERSION:
        raise ModelFilesError(f"{where}.format_version is {quant.get('format_version')!r}; this lmforge reads "
                              f"{FORMAT_VERSION}")  # fmt: skip
    layers = quant.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise ModelFilesError(f"{where}.layers must map layer names to their settings")
    return layers


def load_quantized(path: str | Path, dtype: torch.dtype | None = None, **overrides: Any) -> Transformer:
    """The model a `save_quantized` directory holds (eval mode); `dtype` casts the float tensors outside the
    quantized layers (norms, a float head), `overrides` replace `ModelConfig` fields."""
    path = Path(path)
    config = read_config(path)
    cfg = config_from_hf(config, where=str(path / "config.json")).replace(**overrides)
    layers = _layers(path, config)
    sources = open_weights(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    for name, spec in layers.items():
        parent, _, attr = name.rpartition(".")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ModelFilesError(f"{path}: quantization_config names layer {name!r}, not in the model") from None
        prefix = f"{name}."
        state = {k.removeprefix(prefix): sources[k].get(k) for k in sources if k.startswith(prefix)}
        try:
            layer = layer_from_state(spec, state, f"{path}: layer {name}")
        except QuantError as e:
            raise ModelFilesError(str(e)) from None
        shape, want = (layer.out_features, layer.in_features), tuple(old.weight.shape)
        if shape != want:
            raise ModelFilesError(f"{path}: layer {name} is {shape} (out, in); the config needs {want}")
        setattr(model.get_submodule(parent), attr, layer)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sources))
    extra = sorted(set(sources) - set(expected))
    if missing or extra:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
        raise ModelFilesError(f"{path}: {what} ({len(missing)} missing, {len(extra)} unexpected)")
    state = {}
    for name, want in expected.items():
        t = sources[name].get(name)
        if tuple(t.shape) != tuple(want.shape) or t.dtype.is_floating_point != want.dtype.is_floating_point:
            raise ModelFilesError(f"{path}: tensor {name!r} is {tuple(t.shape)} {t.dtype}; the model needs "
                                  f"{tuple(want.shape)} {want.dtype}")  # fmt: skip
        owner = name.rpartition(".")[0]
        cast = dtype is not None and t.is_floating_point() and owner not in layers and not name.endswith(KEEP_FP32)
        state[name] = t.to(dtype) if cast else t
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()
