"""GPTQ and AWQ checkpoints in the Hugging Face layout: what transformers (through gptqmodel), vLLM and TGI read.

A 4- or 8-bit layer W = s (u - z), with unsigned codes u in 0..2^b - 1, an integer zero point z and a float scale s
per group of G input columns (g = i // G), is stored as four tensors under the linear's module name (b bits,
p = 32 / b codes per int32, code k of a word in bits k b .. k b + b - 1, the first code in the low bits):

    GPTQ ("gptq" checkpoint format, v1)
        qweight  int32 (in / p, out)    qweight[r, o] = Σ_k u[o, r p + k] << k b         packed along the input
        qzeros   int32 (in / G, out / p) qzeros[g, c] = Σ_k (z[c p + k, g] - 1) << k b  packed along the output;
                                         v1 stores z - 1 (AutoGPTQ's historical offset; readers add the 1 back,
                                         without a carry, so z = 0 has no v1 form: a model with one is written
                                         in gptqmodel's "gptq_v2" format, which stores z as it is)
        scales   float16 (in / G, out)
        g_idx    int32 (in,)            g_idx[i] = i // G (act-order with static groups keeps groups contiguous)
    AWQ ("gemm" version, 4-bit)
        qweight  int32 (in, out / 8)    qweight[i, c] = Σ_k u[c 8 + ORDER[k], i] << 4 k   packed along the output,
        qzeros   int32 (in / G, out / 8) the same order for z (no offset)                  ORDER = 0 2 4 6 1 3 5 7
        scales   float16 (in / G, out)

config.json gets a `quantization_config` transformers knows: {"quant_method": "gptq", "bits", "group_size",
"sym", "desc_act": false, "checkpoint_format": "gptq" or "gptq_v2"} or {"quant_method": "awq", "bits": 4, "group_size",
"zero_point": true, "version": "gemm"}. Every other tensor is written as `save_hf` writes it.

Reading (`load_hf_quantized`, what `lmforge.load` does with such a directory, whoever wrote it: AutoGPTQ,
gptqmodel, AutoAWQ, lmforge) unpacks the same words back into `QuantLinear` layers, W = s (u - z) with s in float16
as stored: a symmetric GPTQ layer (every z = 2^(b-1)) as signed codes q = u - z, any other as unsigned codes with the
offset m = -s z. v1 zero points are read as (stored + 1) mod 2^b, as gptqmodel reads them. Act-order checkpoints
whose g_idx is not i // G (groups permuted over the columns), AWQ's GEMV / Marlin layouts and other bit widths are
refused, naming the key.

The layers come from lmforge's `QuantLinear` (W = s q + m, quant/weight_only.py): signed codes (symmetric) are
u = q + 2^(b-1) with z = 2^(b-1); unsigned codes with an offset m = -s z (what GPTQ, AWQ and RTN write:
`QuantLinear.from_codes`) have the integer z = -m / s back exactly, checked (a GGUF Q4_1 / Q4_K layer's offset is
no integer zero point: it has no GPTQ form). The scales are stored in float16, as these formats hold them: the
written weights are lmforge's with s rounded to float16 (relative change <= 2^-11 per scale).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.io.hf import (
    SHARD_BYTES,
    ModelFilesError,
    fill_float_tensors,
    hf_config,
    hf_state_dict,
    open_weights,
    read_config,
    stored_names,
    write_model_directory,
)  # fmt: skip
from lmforge.io.hf_arch import config_from_hf, tensor_maps
from lmforge.model.transformer import Transformer
from lmforge.quant.modules import quantized_layers
from lmforge.quant.primitives import QuantError
from lmforge.quant.weight_only import QuantLinear

__all__ = [
    "AWQ_ORDER", "HF_FORMATS", "awq_layer", "awq_tensors", "check_exportable", "gptq_layer", "gptq_tensors",
    "load_hf_quantized", "save_hf_quantized",
]  # fmt: skip

HF_FORMATS = ("gptq", "awq")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # which output column the k-th nibble of an AWQ word holds (of 8)


def _pack_rows(u: Tensor, bits: int) -> Tensor:
    """int32 words of p = 32 / bits consecutive rows of `u` (rows, cols) each, the first row in the low bits."""
    p = 32 // bits
    u = u.to(torch.int64).reshape(u.shape[0] // p, p, u.shape[1])
    shifts = (torch.arange(p, dtype=torch.int64) * bits).view(1, p, 1)
    words = (u << shifts).sum(1)  # < 2^32: each code fills its own bits
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, as int32


def _codes_and_zeros(layer: QuantLinear, where: str) -> tuple[Tensor, Tensor, Tensor]:
    """(u (out, in) unsigned codes, z (out, in / G) integer zero points, s (out, in / G) float32) with
    W = s (u - z) equal to the layer's s q + m."""
    q, s, half = layer.unpacked().to(torch.int32), layer.scale.float(), 2 ** (layer.bits - 1)
    if layer.signed:
        if layer.offset is not None:
            raise QuantError(f"{where}: signed codes with an offset have no GPTQ / AWQ form")
        return q + half, torch.full(s.shape, half, dtype=torch.int32), s
    if layer.offset is None:
        return q, torch.zeros(s.shape, dtype=torch.int32), s
    z = torch.where(s == 0, 0.0, -layer.offset.float() / s).round()
    if (z < 0).any() or (z > 2**layer.bits - 1).any() or not torch.equal(-(s * z), layer.offset.float()):
        raise QuantError(f"{where}: its offsets are not integer zero points (a GGUF Q4_1 / Q4_K layer?); "
                         "GPTQ and AWQ store W = s (q - z): write it as GGUF or in lmforge's layout")  # fmt: skip
    return q, z.to(torch.int32), s


def gptq_tensors(layer: QuantLinear, where: str = "layer", *, v2: bool = False) -> dict[str, Tensor]:
    """The layer's qweight, qzeros, scales and g_idx in the GPTQ layout (module docstring): zero points stored
    minus one (the "gptq" v1 checkpoint format), or as they are (`v2`: "gptq_v2", gptqmodel's)."""
    u, z, s = _codes_and_zeros(layer, where)
    p = 32 // layer.bits
    if layer.out_features % p:
        raise QuantError(f"{where}: GPTQ packs {p} output columns per word; the layer has {layer.out_features}")
    if not v2 and (z == 0).any():
        raise QuantError(f"{where}: a zero point of 0, which the v1 format cannot hold (write it with v2=True)")
    return {
        "qweight": _pack_rows(u.t(), layer.bits),
        "qzeros": _pack_rows(z if v2 else z - 1, layer.bits).t().contiguous(),  # (out, G') packed by rows
        "scales": s.t().to(torch.float16).contiguous(),
        "g_idx": torch.arange(layer.in_features, dtype=torch.int32) // layer.group_size,
    }


def _needs_v2(layers: dict[str, QuantLinear]) -> bool:
    """Whether a zero point is 0: v1 stores z - 1, which wraps to 2^b - 1 there, and its readers add the 1 back
    without a carry, so such a model is written in the "gptq_v2" format (zero points as they are)."""
    return any(not m.signed and m.offset is not None and bool((m.offset == 0).any()) for m in layers.values())


def awq_tensors(layer: QuantLinear, where: str = "layer") -> dict[str, Tensor]:
    """The layer's qweight, qzeros and scales in AWQ's GEMM layout (4-bit; module docstring)."""
    if layer.bits != 4:
        raise QuantError(f"{where}: AWQ's GEMM layout holds 4-bit codes; the layer has {layer.bits}")
    if layer.out_features % 8:
        raise QuantError(f"{where}: AWQ packs 8 output columns per word; the layer has {layer.out_features}")
    u, z, s = _codes_and_zeros(layer, where)
    order = torch.tensor(AWQ_ORDER)

    def along_output(x: Tensor) -> Tensor:  # (out, n) -> (n, out / 8) words, nibbles in AWQ's order
        x = x.reshape(-1, 8, x.shape[1])[:, order].reshape(x.shape)
        return _pack_rows(x, 4).t().contiguous()

    return {"qweight": along_output(u), "qzeros": along_output(z), "scales": s.t().to(torch.float16).contiguous()}


def _hf_module(model: Transformer, name: str) -> str:
    """The Hugging Face module name of lmforge's linear `name` (a one-to-one rename), or an error."""
    maps = tensor_maps(model.config, [f"{name}.weight"])
    theirs = maps[0].theirs if len(maps) == 1 and len(maps[0].ours) == 1 else ()
    if len(theirs) != 1 or not theirs[0].endswith(".weight") or maps[0].save([torch.ones(1, 2)])[0].shape != (1, 2):
        raise QuantError(f"{name}: a {model.config.arch} checkpoint stores this layer fused or transposed; the "
                         "GPTQ / AWQ layouts are written for one linear per checkpoint weight")  # fmt: skip
    return theirs[0].removesuffix(".weight")


def _settings(model: Transformer, layers: dict[str, Any]) -> tuple[int, int]:
    """The (bits, group size) every block linear shares, -1 for one group per row (the formats' per-channel);
    anything else has no single quantization_config."""
    linears = {n for n, m in model.blocks.named_modules(prefix="blocks")
               if isinstance(m, torch.nn.Linear | QuantLinear)}  # fmt: skip
    if missing := sorted(linears - set(layers)):
        raise QuantError(f"{missing[0]}: not quantized; transformers quantizes every linear of the blocks")
    if other := sorted(n for n, m in layers.items() if type(m) is not QuantLinear or not n.startswith("blocks.")):
        raise QuantError(f"{other[0]}: a {type(layers[other[0]]).__name__}; the GPTQ / AWQ layouts hold the "
                         "blocks' weight-only QuantLinear layers")  # fmt: skip
    settings = {(m.bits, m.group_size) for m in layers.values()}
    if len(settings) > 1 and all(m.group_size == m.in_features for m in layers.values()):
        settings = {(m.bits, -1) for m in layers.values()}
    if len(settings) != 1:
        raise QuantError(f"the layers mix (bits, group size) {sorted(settings)}; one quantization_config holds one")
    return settings.pop()


def check_exportable(model: Transformer, fmt: str, bits: int) -> None:
    """Refuse, before any quantization work, a float `model` whose quantized block linears could not be written
    in `fmt` ("gptq" or "awq") at `bits`: a fused or stacked checkpoint layout (GPT-2's c_attn, MoE experts), AWQ
    at other than 4 bits, or an output width the int32 words cannot pack."""
    if fmt not in HF_FORMATS:
        raise QuantError(f"format {fmt!r}: the Hugging Face quantized layouts are {', '.join(HF_FORMATS)}")
    if fmt == "awq" and bits != 4:
        raise QuantError(f"AWQ's GEMM layout holds 4-bit codes, not {bits}")
    for name, m in model.blocks.named_modules(prefix="blocks"):
        if isinstance(m, torch.nn.Linear):
            _hf_module(model, name)
            if m.out_features % (32 // bits):
                raise QuantError(f"{name}: {m.out_features} outputs; {fmt} packs {32 // bits} per int32 word")


def save_hf_quantized(model: Transformer, path: str | Path, tokenizer: Any | None = None, *, fmt: str = "gptq",
                      shard_bytes: int = SHARD_BYTES) -> None:  # fmt: skip
    """Write `model`, whose block linears are `QuantLinear` layers (GPTQ, AWQ, RTN), as a Hugging Face GPTQ
    (`fmt="gptq"`) or AWQ (`fmt="awq"`) checkpoint (module docstring); the directory is replaced whole."""
    if fmt not in HF_FORMATS:
        raise QuantError(f"format {fmt!r}: the Hugging Face quantized layouts are {', '.join(HF_FORMATS)}")
    layers = quantized_layers(model)
    if not layers:
        raise QuantError("the model holds no quantized layer: quantize it first (lmforge quantize)")
    bits, group = _settings(model, layers)
    dense = {n: m for n, m in model.named_modules() if n in layers}
    state = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in dense}
    tensors = hf_state_dict(model, state)
    v2 = fmt == "gptq" and _needs_v2(dense)
    for name, layer in dense.items():
        where, hf = f"layer {name}", _hf_module(model, name)
        packed = awq_tensors(layer, where) if fmt == "awq" else gptq_tensors(layer, where, v2=v2)
        tensors.update({f"{hf}.{k}": v for k, v in packed.items()})
        if layer.bias is not None:
            tensors[f"{hf}.bias"] = layer.bias.detach().to(torch.float16).contiguous()
    config = hf_config(model, {"norm": model.norm.weight})
    if fmt == "awq":
        quant = {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True, "version": "gemm"}
    else:
        quant = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False,
                 "sym": all(m.signed for m in dense.values()), "lm_head": False,
                 "checkpoint_format": "gptq_v2" if v2 else "gptq"}  # fmt: skip
    config["quantization_config"] = quant
    write_model_directory(path, tensors, config, shard_bytes=shard_bytes, tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------------- reading


def _unpack_rows(words: Tensor, bits: int) -> Tensor:
    """The inverse of `_pack_rows`: (rows / p, cols) int32 words -> (rows, cols) int32 codes."""
    p = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(p, dtype=torch.int64) * bits).view(1, p, 1)
    return ((w[:, None, :] >> shifts) & (2**bits - 1)).reshape(-1, words.shape[1]).to(torch.int32)


def _layer(u: Tensor, z: Tensor, scales: Tensor, bias: Tensor | None, bits: int, where: str) -> QuantLinear:
    """A QuantLinear of W = s (u - z): u (out, in), z and s (out, groups)."""
    out, inp = u.shape
    if z.shape != scales.shape or inp % scales.shape[1] or scales.shape[0] != out:
        raise QuantError(f"{where}: scales {tuple(scales.shape)} and zero points {tuple(z.shape)} do not fit the "
                         f"({out}, {inp}) weight")  # fmt: skip
    group, s = inp // scales.shape[1], scales.float()
    half = 2 ** (bits - 1)
    if bool((z == half).all()):  # symmetric: signed codes, no offset
        return QuantLinear.from_codes((u - half).to(torch.int8), s, None, bias, bits=bits, group_size=group)
    return QuantLinear.from_codes(u.to(torch.uint8), s, z, bias, bits=bits, group_size=group)


def gptq_layer(t: dict[str, Tensor], bits: int, *, v2: bool, where: str = "layer") -> QuantLinear:
    """The QuantLinear a GPTQ layer's qweight, qzeros, scales (and g_idx, bias) hold (module docstring)."""
    u = _unpack_rows(t["qweight"], bits).t()  # (out, in)
    stored = _unpack_rows(t["qzeros"].t().contiguous(), bits)  # (out, groups)
    z = stored if v2 else (stored + 1) & (2**bits - 1)
    scales = t["scales"].t()
    if "g_idx" in t:
        group = u.shape[1] // max(1, scales.shape[1])
        if not torch.equal(t["g_idx"].to(torch.int64), torch.arange(u.shape[1]) // group):
            raise QuantError(f"{where}: g_idx is not i // {group} (act-order with permuted groups): not supported")
    return _layer(u, z[: u.shape[0]], scales, t.get("bias"), bits, where)


def awq_layer(t: dict[str, Tensor], where: str = "layer") -> QuantLinear:
    """The QuantLinear an AWQ (GEMM) layer's qweight, qzeros, scales (and bias) hold (module docstring)."""
    order = torch.tensor(AWQ_ORDER)

    def from_output(words: Tensor) -> Tensor:  # (n, out / 8) words -> (out, n) codes
        x = _unpack_rows(words.t().contiguous(), 4)
        u = torch.empty_like(x)
        u.view(-1, 8, x.shape[1])[:, order] = x.view(-1, 8, x.shape[1])
        return u

    return _layer(from_output(t["qweight"]), from_output(t["qzeros"]), t["scales"].t(), t.get("bias"), 4, where)


def _read_settings(quant: dict[str, Any], where: str) -> tuple[str, int, bool]:
    """(format, bits, v2) from a GPTQ / AWQ quantization_config, or a ModelFilesError naming the key."""
    fmt, bits = quant.get("quant_method"), quant.get("bits")
    if fmt == "awq":
        if bits != 4 or str(quant.get("version", "gemm")).lower() != "gemm":
            raise ModelFilesError(f"{where}: AWQ bits={bits!r} version={quant.get('version')!r}: lmforge reads 4-bit "
                                  "GEMM checkpoints")  # fmt: skip
        return fmt, 4, False
    if bits not in (4, 8):
        raise ModelFilesError(f"{where}.bits is {bits!r}: lmforge reads 4- and 8-bit GPTQ checkpoints")
    version = quant.get("checkpoint_format", "gptq")
    if version not in ("gptq", "gptq_v2"):
        raise ModelFilesError(f"{where}.checkpoint_format is {version!r}: lmforge reads 'gptq' and 'gptq_v2'")
    return fmt, bits, version == "gptq_v2"


def load_hf_quantized(path: str | Path, dtype: torch.dtype | None = None, **overrides: Any) -> Transformer:
    """The model in a Hugging Face GPTQ or AWQ directory (eval mode): every block linear a `QuantLinear` holding the
    checkpoint's codes, zero points and float16 scales; `dtype` casts the other float tensors."""
    path = Path(path)
    config = read_config(path)
    where = f"{path / 'config.json'}: quantization_config"
    fmt, bits, v2 = _read_settings(config.get("quantization_config") or {}, where)
    cfg = config_from_hf(config, where=str(path / "config.json")).replace(**overrides)
    sources = open_weights(path)
    stored = stored_names(cfg, sources)  # canonical name -> name in the file
    with torch.device("meta"):
        model = Transformer(cfg)
    used: set[str] = set()
    keys = ("qweight", "qzeros", "scales") + (("g_idx",) if fmt == "gptq" else ())
    for name, old in [(n, m) for n, m in model.blocks.named_modules(prefix="blocks") if isinstance(m, torch.nn.Linear)]:
        hf = _hf_module(model, name)
        wanted = [f"{hf}.{k}" for k in keys] + ([f"{hf}.bias"] if f"{hf}.bias" in stored else [])
        if missing := [n for n in wanted if n not in stored and not n.endswith("g_idx")]:
            raise ModelFilesError(f"{path}: missing tensor {missing[0]!r} (a {fmt} checkpoint's layer {name})")
        tensors = {n.rpartition(".")[2]: sources[stored[n]].get(stored[n]) for n in wanted if n in stored}
        try:
            layer = gptq_layer(tensors, bits, v2=v2, where=hf) if fmt == "gptq" else awq_layer(tensors, hf)
        except (QuantError, RuntimeError) as e:
            raise ModelFilesError(f"{path}: {e}") from None
        if (layer.out_features, layer.in_features) != tuple(old.weight.shape):
            raise ModelFilesError(f"{path}: layer {hf} is ({layer.out_features}, {layer.in_features}) (out, in); "
                                  f"the config needs {tuple(old.weight.shape)}")  # fmt: skip
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
        used.update(n for n in wanted if n in stored)
    return fill_float_tensors(model, path, sources, dtype, used=used)
