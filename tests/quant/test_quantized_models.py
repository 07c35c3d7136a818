"""Quantized models as quantized layers, saved and loaded (quant/rtn.py, quant/modules.py, io/quantized.py).

RTN's layers hold `quant.primitives`' codes (its dequantization, within one float32 rounding of the zero-point form);
GPTQ's and AWQ's packed layers hold the codes their fake-quantized runs wrote as weights, so a packed model gives the
fake-quantized model's logits. A saved quantized model loads back bit for bit, every layer type kept."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lmforge
from lmforge.config import ModelConfig
from lmforge.io.hf_arch import ModelFilesError
from lmforge.model.transformer import Transformer
from lmforge.quant.awq import awq_quantize_model
from lmforge.quant.calibration import calibration_windows
from lmforge.quant.gptq import gptq_quantize_model
from lmforge.quant.llm_int8 import Int8Linear, quantize_model_llm_int8
from lmforge.quant.modules import dense_state_dict, quantized_layers
from lmforge.quant.primitives import QuantError, quantize_asymmetric, quantize_symmetric
from lmforge.quant.rtn import rtn_linear, rtn_quantize_model
from lmforge.quant.smoothquant import W8A8Linear, quantize_model_smoothquant
from lmforge.quant.weight_only import QuantLinear

CFG = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
PROJECTIONS = 2 * 7


def tiny(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG, **overrides})).eval()


def copy_of(model: Transformer) -> Transformer:
    twin = Transformer(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    ids = torch.randint(0, 320, (1200,), generator=torch.Generator().manual_seed(3))
    return calibration_windows(ids, 16, 32)


IDS = torch.tensor([[1, 5, 9, 2, 33, 70, 4, 8]])


# ----------------------------------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, None])
def test_rtn_layers_hold_the_primitives_codes(bits, symmetric, group_size):
    torch.manual_seed(1)
    linear = nn.Linear(128, 48)
    layer = rtn_linear(linear, bits=bits, group_size=group_size, symmetric=symmetric)
    quantize = quantize_symmetric if symmetric else quantize_asymmetric
    want = quantize(linear.weight.detach(), bits, group_size=group_size or 128)
    assert torch.equal(layer.unpacked().to(torch.int16), want.codes().to(torch.int16))
    torch.testing.assert_close(layer.weight, want.dequantize(), rtol=0, atol=2e-7)  # s q - s z vs (q - z) s
    assert torch.equal(layer.bias, linear.bias.detach())


def test_rtn_model_swaps_every_projection_and_refuses_bad_options_first():
    model = tiny()
    swap = rtn_quantize_model(model, bits=4, group_size=32)
    assert len(swap.replaced) == PROJECTIONS and isinstance(model.blocks[0].mlp.down_proj, QuantLinear)
    plain = tiny()
    with pytest.raises(QuantError, match="not bits=3"):
        rtn_quantize_model(plain, bits=3)
    with pytest.raises(QuantError, match=r"group_size=48 does not divide blocks\.0\.attn\.q_proj's 64"):
        rtn_quantize_model(plain, group_size=48)
    assert not quantized_layers(plain)  # nothing changed


# ----------------------------------------------------------------------------------------------------- GPTQ, AWQ


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_packed_model_gives_the_fake_quantized_logits(windows, symmetric, act_order):
    model = tiny()
    fake, packed = copy_of(model), copy_of(model)
    options = dict(bits=4, group_size=32, symmetric=symmetric, act_order=act_order, static_groups=act_order,
                   progress=False)  # fmt: skip
    results = gptq_quantize_model(fake, windows, **options)
    gptq_quantize_model(packed, windows, pack=True, **options)
    layers = quantized_layers(packed)
    assert len(layers) == PROJECTIONS and all(m.bits == 4 and m.signed == symmetric for m in layers.values())
    for name, layer in layers.items():
        torch.testing.assert_close(layer.weight, results[name].weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(packed, IDS), logits(fake, IDS), rtol=1e-5, atol=1e-5)


def test_gptq_packing_refuses_what_a_layer_cannot_hold(windows):
    with pytest.raises(QuantError, match="not bits=3"):
        gptq_quantize_model(tiny(), windows, bits=3, pack=True, progress=False)
    with pytest.raises(QuantError, match="static_groups"):
        gptq_quantize_model(tiny(), windows, group_size=32, act_order=True, pack=True, progress=False)


def test_awq_packed_model_gives_the_fake_quantized_logits(windows):
    model = tiny()
    fake, packed = copy_of(model), copy_of(model)
    awq_quantize_model(fake, windows, group_size=32, n_grid=4, progress=False)
    awq_quantize_model(packed, windows, group_size=32, n_grid=4, progress=False, pack=True)
    layers = quantized_layers(packed)
    assert len(layers) == PROJECTIONS and all(not m.signed for m in layers.values())
    for name, layer in layers.items():
        torch.testing.assert_close(layer.weight, packed.get_submodule(name).weight)
        torch.testing.assert_close(layer.weight, fake.get_submodule(name).weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(packed, IDS), logits(fake, IDS), rtol=1e-5, atol=1e-5)
    with pytest.raises(QuantError, match="not bits=3"):
        awq_quantize_model(tiny(), windows, bits=3, pack=True, progress=False)


# ----------------------------------------------------------------------------------------------------- save, load


def quantized_variants(windows):
    """name -> a tiny model holding each kind of quantized layer."""
    rtn4 = tiny()
    rtn_quantize_model(rtn4, bits=4, group_size=32)
    rtn8 = tiny(tie_embeddings=False)
    rtn_quantize_model(rtn8, bits=8, group_size=None, symmetric=True, where=["blocks.*", "lm_head"])
    int8 = tiny(attn_bias=True)
    quantize_model_llm_int8(int8)
    static = tiny()
    quantize_model_smoothquant(static, windows, activations="per_tensor", progress=False)
    dynamic = tiny()
    quantize_model_smoothquant(dynamic, windows, progress=False)
    return {"rtn4": rtn4, "rtn8_head": rtn8, "llm_int8": int8, "w8a8_static": static, "w8a8_dynamic": dynamic}


def test_saved_quantized_models_load_back_bit_for_bit(tmp_path, windows, tok):
    for name, model in quantized_variants(windows).items():
        path = tmp_path / name
        lmforge.save(model, path, tok)
        config = json.loads((path / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "lmforge"
        loaded, loaded_tok = lmforge.load(path)
        assert loaded_tok is not None and loaded_tok.encode("to be") == tok.encode("to be")
        want, got = quantized_layers(model), quantized_layers(loaded)
        assert {n: type(m) for n, m in got.items()} == {n: type(m) for n, m in want.items()}, name
        for n, t in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[n], t), (name, n)
        assert torch.equal(logits(loaded, IDS), logits(model, IDS)), name


def test_quantized_false_loads_the_dequantized_float_model(tmp_path, tok):
    model = tiny()
    rtn_quantize_model(model, bits=4, group_size=32)
    lmforge.save(model, tmp_path / "q", tok)
    dense, _ = lmforge.load(tmp_path / "q", quantized=False)
    assert not quantized_layers(dense) and isinstance(dense.blocks[0].attn.q_proj, nn.Linear)
    for n, t in dense_state_dict(model).items():
        assert torch.equal(dense.state_dict()[n], t), n
    torch.testing.assert_close(logits(dense, IDS), logits(model, IDS), rtol=1e-5, atol=1e-5)
    assert {type(m) for m in quantized_variants_types(tmp_path, tok)} == {Int8Linear, W8A8Linear}


def quantized_variants_types(tmp_path, tok):
    """The layer types of a model holding both 8-bit activation formats, through a save and a load."""
    model = tiny()
    quantize_model_llm_int8(model, "blocks.0.*")
    quantize_model_smoothquant(model, torch.randint(0, 320, (4, 16)), where="blocks.1.*", progress=False)
    lmforge.save(model, tmp_path / "mixed", tok)
    return quantized_layers(lmforge.load(tmp_path / "mixed")[0]).values()


def test_a_quantized_model_exports_to_gguf(tmp_path, tok):
    model = tiny()
    rtn_quantize_model(model, bits=8, group_size=None, symmetric=True)
    path = tmp_path / "m.gguf"
    lmforge.save(model, path, tok, qtype="f32")
    back, _ = lmforge.load(path)
    torch.testing.assert_close(logits(back, IDS), logits(model, IDS), rtol=1e-5, atol=1e-5)


def test_broken_quantized_directories_name_what_is_wrong(tmp_path, tok):
    model = tiny()
    rtn_quantize_model(model, bits=4, group_size=32)
    path = tmp_path / "q"
    lmforge.save(model, path, tok)
    config_path = path / "config.json"
    good = json.loads(config_path.read_text())

    def broken(change) -> str:
        config = json.loads(json.dumps(good))
        change(config["quantization_config"])
        config_path.write_text(json.dumps(config))
        with pytest.raises(ModelFilesError) as e:
            lmforge.load(path)
        return str(e.value)

    assert "format_version is 9" in broken(lambda q: q.update(format_version=9))
    assert "unknown quantized layer type 'Nope'" in broken(lambda q: q["layers"]["blocks.0.attn.q_proj"].update(
        type="Nope"))
    assert "needs 'group_size'" in broken(lambda q: q["layers"]["blocks.0.attn.q_proj"].pop("group_size"))
    assert "'blocks.9.attn.q_proj', not in the model" in broken(lambda q: q["layers"].update(
        {"blocks.9.attn.q_proj": q["layers"]["blocks.0.attn.q_proj"]}))
    assert "missing tensor 'blocks.0.attn.q_proj.weight' (1 missing, 3 unexpected)" in broken(lambda q: q["layers"].pop(
        "blocks.0.attn.q_proj"))


def test_per_row_int8_layers_run_torchs_int8_kernel():
    """absmax int8 with one scale per row (`int8`) on `_weight_int8pack_mm` (bfloat16 activations: the exact
    path's result within bfloat16 rounding); 4-bit layers and grouped 8-bit ones (two nibble planes) the int4 kernel."""
    from lmforge.quant.weight_only import use_kernel

    model = tiny()
    rtn_quantize_model(model, bits=8, group_size=None, symmetric=True, where="blocks.0.*")
    rtn_quantize_model(model, bits=8, group_size=32, where="blocks.1.attn.*")
    rtn_quantize_model(model, bits=4, group_size=32, where="blocks.1.mlp.*")
    want = logits(model, IDS)
    assert use_kernel(model) == 7 + 4 + 3
    assert model.blocks[0].attn.q_proj.kernel_planes == 0 and model.blocks[0].attn.q_proj.codes is not None
    assert model.blocks[1].attn.q_proj.kernel_planes == 2 and model.blocks[1].mlp.up_proj.kernel_planes == 1
    layer = model.blocks[0].mlp.up_proj
    x = torch.randn(5, layer.in_features)
    exact = x @ layer.weight.t()
    assert ((layer(x) - exact).norm() / exact.norm()).item() < 1e-2
    assert ((logits(model, IDS) - want).norm() / want.norm()).item() < 2e-2
