"""GPTQ / AWQ checkpoints in the Hugging Face layout (io/hf_gptq.py).

The oracle for the layout is transformers itself, loading the directory through its GPTQ / AWQ quantizers
(gptqmodel's CPU kernels, test-only): its dequantized weights equal lmforge's (with the scales rounded to float16,
as the format stores them) within float16 rounding, and its logits equal lmforge's within the kernel's half-precision
arithmetic, and `lmforge.load` reads the same weights back. The packing is also checked against a word-by-word
unpacking written here from the format's definition.
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_reference import hf_and_lmforge, hf_config
from lmforge.io.hf_gptq import AWQ_ORDER, awq_layer, awq_tensors, gptq_layer, gptq_tensors, save_hf_quantized
from lmforge.quant.modules import dequantize_model, quantized_layers
from lmforge.quant.primitives import QuantError
from lmforge.quant.rtn import rtn_quantize_model
from lmforge.quant.weight_only import QuantLinear


def _layer(bits: int, signed: bool, out: int = 16, inp: int = 64, group: int = 32, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    hi = 2**bits
    codes = torch.randint(-hi // 2, hi // 2, (out, inp), generator=g) if signed else torch.randint(0, hi, (out, inp),
                                                                                                   generator=g)
    scale = torch.rand(out, inp // group, generator=g) + 0.1
    zero = None if signed else torch.randint(1, hi, (out, inp // group), generator=g)
    dtype = torch.int8 if signed else torch.uint8
    return QuantLinear.from_codes(codes.to(dtype), scale, zero, bits=bits, group_size=group)


def _unpack_words(words: torch.Tensor, bits: int) -> list[list[int]]:
    """Each int32 word's codes, lowest bits first (the format's definition), as Python ints."""
    p = 32 // bits
    return [[(int(w) & 0xFFFFFFFF) >> (k * bits) & (2**bits - 1) for k in range(p)] for w in words.flatten()]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_gptq_words_hold_the_codes_and_zero_points_minus_one(bits, signed):
    layer = _layer(bits, signed)
    t, p = gptq_tensors(layer), 32 // bits
    q = layer.unpacked().long()
    u = q + 2 ** (bits - 1) if signed else q
    z = torch.full(layer.scale.shape, 2 ** (bits - 1)) if signed else (-layer.offset / layer.scale).round().long()
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (64 // p, 16)
    words = _unpack_words(t["qweight"], bits)  # row-major over (in / p, out)
    for r in range(64 // p):
        for o in range(16):
            assert words[r * 16 + o] == [int(u[o, r * p + k]) for k in range(p)]
    zwords = _unpack_words(t["qzeros"], bits)  # (groups, out / p)
    for g in range(2):
        for c in range(16 // p):
            assert zwords[g * (16 // p) + c] == [int(z[c * p + k, g]) - 1 for k in range(p)]
    assert torch.equal(t["scales"], layer.scale.t().half())
    assert torch.equal(t["g_idx"], torch.arange(64, dtype=torch.int32) // 32)


def test_awq_words_hold_the_codes_in_awq_order():
    layer = _layer(4, False)
    t = awq_tensors(layer)
    u, z = layer.unpacked().long(), (-layer.offset / layer.scale).round().long()
    assert t["qweight"].shape == (64, 2) and t["qzeros"].shape == (2, 2)
    words = _unpack_words(t["qweight"], 4)
    for i in range(64):
        for c in range(2):
            assert words[i * 2 + c] == [int(u[c * 8 + AWQ_ORDER[k], i]) for k in range(8)]
    zwords = _unpack_words(t["qzeros"], 4)
    for g in range(2):
        for c in range(2):
            assert zwords[g * 2 + c] == [int(z[c * 8 + AWQ_ORDER[k], g]) for k in range(8)]


def test_a_zero_point_of_zero_needs_the_v2_format():
    layer = _layer(4, False)
    layer.offset[0, 0] = 0.0  # z = 0 in one group
    with pytest.raises(QuantError, match="zero point of 0"):
        gptq_tensors(layer)
    t = gptq_tensors(layer, v2=True)
    z = (-layer.offset / layer.scale).round().long()
    assert [w[:8] for w in _unpack_words(t["qzeros"], 4)] == [[int(z[c * 8 + k, g]) for k in range(8)]
                                                              for g in range(2) for c in range(2)]


def test_offsets_that_are_no_integer_zero_point_are_refused():
    layer = _layer(4, False)
    layer.offset.add_(0.01)  # as a GGUF Q4_1 block's float minimum
    with pytest.raises(QuantError, match="not integer zero points"):
        gptq_tensors(layer, "layer blocks.0.attn.q_proj")


def _quantized(arch: str, directory, **rtn):
    model = hf_and_lmforge(arch, directory)[1]
    rtn_quantize_model(model, **rtn)
    return model


def test_layers_left_float_or_mixed_settings_are_refused(tmp_path):
    model = _quantized("llama", tmp_path / "base", bits=4, group_size=32)
    model.blocks[0].attn.q_proj = torch.nn.Linear(64, 64, bias=False)
    with pytest.raises(QuantError, match=r"blocks\.0\.attn\.q_proj: not quantized"):
        save_hf_quantized(model, tmp_path / "out")
    model = hf_and_lmforge("llama", tmp_path / "base")[1]
    rtn_quantize_model(model, bits=4, group_size=32, where="blocks.0.*")
    rtn_quantize_model(model, bits=8, group_size=32, where="blocks.1.*")
    with pytest.raises(QuantError, match="mix"):
        save_hf_quantized(model, tmp_path / "out")
    with pytest.raises(QuantError, match="no quantized layer"):
        save_hf_quantized(hf_and_lmforge("llama", tmp_path / "base")[1], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_fused_checkpoint_layout_is_refused(tmp_path):
    model = _quantized("gpt2", tmp_path / "base", bits=4, group_size=32)
    with pytest.raises(QuantError, match="fused or transposed"):
        save_hf_quantized(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _fp16_scales(model: torch.nn.Module) -> None:
    """The model's weights as the format stores them: each scale rounded to float16, zero points kept."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            s16 = m.scale.half().float()
            if m.offset is not None:
                m.offset.copy_(-(s16 * (-m.offset / m.scale).round()))
            m.scale.copy_(s16)


def _their_weight(layer: torch.nn.Module, fmt: str) -> torch.Tensor:
    """The (in, out) weight gptqmodel's torch kernel multiplies by, from the buffers it loaded."""
    if fmt == "gptq":
        return layer.dequantize_weight()
    from gptqmodel.nn_modules.qlinear.torch_awq import dequantize_gemm

    return dequantize_gemm(qweight=layer.qweight, qzeros=layer.qzeros, scales=layer.scales, bits=4,
                           group_size=layer.group_size)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fmt", "arch", "bits", "symmetric", "zero"),
    [("gptq", "llama", 4, True, False), ("gptq", "qwen2", 4, False, False), ("gptq", "llama", 8, False, True),
     ("awq", "qwen2", 4, False, False)],
)
def test_transformers_loads_the_checkpoint_with_the_same_weights_and_logits(tmp_path, fmt, arch, bits, symmetric,
                                                                            zero):  # fmt: skip
    import gptqmodel  # noqa: F401  (transformers' GPTQ / AWQ runtime, installed by the README's test command)
    import transformers

    model = hf_and_lmforge(arch, tmp_path / "base")[1]
    if zero:  # a group of non-negative weights: zero point 0, which only the gptq_v2 format holds
        model.blocks[0].mlp.down_proj.weight.data[:, :32].abs_()
    rtn_quantize_model(model, bits=bits, group_size=32, symmetric=symmetric)
    save_hf_quantized(model, tmp_path / "out", fmt=fmt)
    quant = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == fmt and quant["bits"] == bits and quant["group_size"] == 32
    assert quant.get("checkpoint_format") == ("gptq_v2" if zero else "gptq" if fmt == "gptq" else None)
    _fp16_scales(model)
    backend = (transformers.GPTQConfig(bits=bits, group_size=32, backend="torch") if fmt == "gptq"
               else transformers.AwqConfig(bits=bits, group_size=32, backend="torch_awq"))  # fmt: skip
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu", dtype=torch.float32,
                                                               quantization_config=backend)  # fmt: skip
    ids = torch.randint(0, hf_config(arch).vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    import lmforge

    read = lmforge.load(tmp_path / "out")[0]  # lmforge reading the directory back: the weights gptqmodel reads
    for i, block in enumerate(model.blocks):
        for name, layer in [("mlp.down_proj", block.mlp.down_proj), ("self_attn.k_proj", block.attn.k_proj)]:
            w = _their_weight(theirs.model.layers[i].get_submodule(name), fmt)
            assert torch.equal(w.float().t(), layer.dequantize().half().float())  # s (u - z) in float16
            ours = read.get_submodule(f"blocks.{i}.{name.replace('self_attn', 'attn')}")
            assert torch.equal(w.float().t(), ours.dequantize().half().float())
    with torch.no_grad():
        ref = theirs(ids).logits.float()
        names = set(quantized_layers(model))
        for name, m in dequantize_model(model).named_modules():  # the weights their torch kernels use: float16
            for p in m.parameters() if name in names else ():
                p.copy_(p.half().float())
        ours = model(ids)
    # the GPTQ kernel multiplies in x's dtype (float32): the same logits; the AWQ one casts x to float16
    assert (ours - ref).abs().max() <= (1e-6 if fmt == "gptq" else 2e-3) * ours.abs().max()


def test_one_group_per_row_is_written_as_group_size_minus_one(tmp_path):
    model = _quantized("llama", tmp_path / "base", bits=8, group_size=None)  # in 64 (attention) and 96 (down_proj)
    save_hf_quantized(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["group_size"] == -1
    assert not gptq_tensors(model.blocks[0].mlp.down_proj)["g_idx"].any()


# ----------------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_gptq_words_read_back_into_the_same_layer(bits, signed):
    layer = _layer(bits, signed, out=32)
    for v2 in (False, True):
        back = gptq_layer(gptq_tensors(layer, v2=v2), bits, v2=v2)
        assert back.signed == signed and back.group_size == layer.group_size
        assert torch.equal(back.unpacked(), layer.unpacked())
        assert torch.equal(back.dequantize(), _with_fp16_scales(layer).dequantize())


def test_awq_words_read_back_into_the_same_layer():
    layer = _layer(4, False, out=32)
    back = awq_layer(awq_tensors(layer))
    assert torch.equal(back.unpacked(), layer.unpacked())
    assert torch.equal(back.dequantize(), _with_fp16_scales(layer).dequantize())


def _with_fp16_scales(layer: QuantLinear) -> QuantLinear:
    copy = QuantLinear(layer.codes, layer.scale, layer.offset, bits=layer.bits, signed=layer.signed,
                       group_size=layer.group_size, packed=True)  # fmt: skip
    with torch.no_grad():
        _fp16_scales(copy)
    return copy


@pytest.mark.parametrize(("fmt", "arch", "bits", "group"), [("gptq", "llama", 4, 32), ("gptq", "qwen2", 8, None),
                                                            ("awq", "qwen2", 4, 32)])  # fmt: skip
def test_lmforge_loads_a_gptq_or_awq_directory(tmp_path, fmt, arch, bits, group):
    """`lmforge.load` of a GPTQ / AWQ directory: every block linear quantized as written (scales in float16), the
    written model's logits exactly (qwen2: q/k/v biases, stored in float16; 8 bits in one group per row)."""
    import lmforge

    model = _quantized(arch, tmp_path / "base", bits=bits, group_size=group, symmetric=fmt == "gptq" and bits == 4)
    save_hf_quantized(model, tmp_path / "out", fmt=fmt)
    _fp16_scales(model)
    for layer in quantized_layers(model).values():
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.half().float()
    read, _ = lmforge.load(tmp_path / "out")
    assert set(quantized_layers(read)) == set(quantized_layers(model))
    for name, layer in quantized_layers(model).items():
        theirs = read.get_submodule(name)
        assert (theirs.bits, theirs.signed, theirs.group_size) == (layer.bits, layer.signed, layer.group_size)
        assert torch.equal(theirs.dequantize(), layer.dequantize())
    ids = torch.randint(0, hf_config(arch).vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(read(ids), model(ids))


def test_unreadable_gptq_directories_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    import lmforge
    from lmforge.io.hf import ModelFilesError

    model = _quantized("llama", tmp_path / "base", bits=4, group_size=32)
    save_hf_quantized(model, tmp_path / "out")
    config_path = tmp_path / "out" / "config.json"
    config = json.loads(config_path.read_text())
    for key, value, match in [("bits", 3, "bits is 3"), ("checkpoint_format", "marlin", "format is 'marlin'")]:
        bad = {**config, "quantization_config": {**config["quantization_config"], key: value}}
        config_path.write_text(json.dumps(bad))
        with pytest.raises(ModelFilesError, match=match):
            lmforge.load(tmp_path / "out")
    config_path.write_text(json.dumps(config))
    weights = tmp_path / "out" / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.0.mlp.down_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()  # act-order: groups permuted over the columns
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelFilesError, match="g_idx is not i // 32"):
        lmforge.load(tmp_path / "out")
    del tensors["model.layers.0.mlp.down_proj.qzeros"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelFilesError, match=r"missing tensor 'model\.layers\.0\.mlp\.down_proj\.qzeros'"):
        lmforge.load(tmp_path / "out")
