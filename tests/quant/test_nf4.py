"""NF4 (quant/nf4.py) against bitsandbytes, the reference implementation (a test-only oracle, on its CPU backend):
the code books, the packed bytes, scales and double-quant state of `quantize_4bit`, `dequantize_4bit`, closed-form
properties (nibble order, midpoint ties, nearest codes, the error bound, bits per weight), NF4Linear and
quantize_model_nf4 on a tiny Transformer.

Two places where bitsandbytes' CPU backend is not the oracle to the bit, and what is tested instead:
- its 8-bit scale codes (double quantization) round each value to a grid of 2^16 points before the nearest code, so a
  value within 2^-16 of a midpoint can take a neighbouring code: codes are equal everywhere else, ours are the exact
  nearest, and theirs are never more than 2 / 65535 worse;
- its AVX-512 `dequantize_4bit` indexes the scales by row, wrong when a row is not a whole number of blocks: the
  dequantization comparisons use 1-D tensors and rows of whole blocks (and even lengths: an odd last dimension sends
  it to a torch.compile path that costs seconds).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import ModelConfig, Transformer
from lmforge.quant.nf4 import (
    DYNAMIC_CODE,
    NF4_CODE,
    NF4_ZERO,
    DoubleQuantState,
    NF4Linear,
    NF4Tensor,
    dequantize_nf4,
    dequantize_scales,
    dynamic_map,
    normal_map,
    quantize_model_nf4,
    quantize_nf4,
)

with warnings.catch_warnings():  # its CPU backend imports torch.utils.mkldnn, which warns of torch.jit's deprecation
    warnings.simplefilter("ignore", DeprecationWarning)
    import bitsandbytes.functional as bnb

LUT_STEP = 2 / 65535  # the grid bitsandbytes' CPU 8-bit quantizer rounds to first
DTYPES = [torch.float32, torch.bfloat16]


def weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.02 * torch.randn(shape, generator=g)).to(dtype)


def bnb_quantize(w: torch.Tensor, block_size: int, double_quant: bool):
    return bnb.quantize_4bit(w, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)


# ----------------------------------------------------------------------------------------------------- code books


def test_code_books_equal_bitsandbytes_to_the_bit() -> None:
    _, state = bnb_quantize(weights((256,), torch.float32), 64, double_quant=True)
    assert torch.equal(normal_map(), bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(NF4_CODE, state.code)
    assert NF4_CODE[NF4_ZERO] == 0 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1
    assert (NF4_CODE[:NF4_ZERO] < 0).sum() == 7 and (NF4_CODE[NF4_ZERO + 1 :] > 0).sum() == 8
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map(signed=True))
    assert torch.equal(DYNAMIC_CODE, state.state2.code)


def test_code_book_is_normal_quantiles() -> None:
    """Closed form: the positive values are Φ⁻¹ at 8 equal steps from δ to 1/2, over Φ⁻¹(δ)."""
    p = torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1]
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    expected = (normal.icdf(p) / normal.icdf(p[0])).flip(0).float()
    torch.testing.assert_close(NF4_CODE[NF4_ZERO + 1 :], expected, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------- quantize


def test_nibble_order_and_padding() -> None:
    """Hand example: codes 15, 0, 7 -> the first element in the high nibble, an odd count padded with the code of 0."""
    w = torch.tensor([1.0, -1.0, 0.0])
    t = quantize_nf4(w, block_size=64)
    assert t.packed.tolist() == [0xF0, 0x70 | NF4_ZERO]
    packed, _ = bnb_quantize(w, 64, double_quant=False)
    assert torch.equal(t.packed, packed.flatten())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("shape", [(64 * 40 + 37,), (24, 42)], ids=["1d-odd-tail", "2d-tail"])
def test_packed_bytes_and_absmax_equal_bitsandbytes(shape, block_size: int, dtype: torch.dtype) -> None:
    w = weights(shape, dtype)
    t = quantize_nf4(w, block_size)
    packed, state = bnb_quantize(w, block_size, double_quant=False)
    assert (t.numel() % block_size != 0) and t.absmax.numel() == -(-t.numel() // block_size)  # a tail block
    assert t.packed.dtype == torch.uint8 and torch.equal(t.packed, packed.flatten())
    assert t.absmax.dtype == torch.float32 and torch.equal(t.absmax, state.absmax)
    assert (t.shape, t.dtype, t.block_size, t.double_quant) == (w.shape, dtype, block_size, False)


def test_midpoint_ties_take_the_lower_code() -> None:
    """Values exactly on the midpoint of two codes (absmax 1, so x / absmax = x) take the lower one, as in bnb."""
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    w = torch.cat([torch.ones(1), midpoints, torch.zeros(48)])
    t = quantize_nf4(w)
    codes = torch.stack([t.packed >> 4, t.packed & 15], 1).flatten()
    assert codes.tolist() == [15, *range(15), *[NF4_ZERO] * 48]
    packed, _ = bnb_quantize(w, 64, double_quant=False)
    assert torch.equal(t.packed, packed.flatten())


def test_codes_are_the_nearest_and_zero_blocks_stay_zero() -> None:
    w = weights((64 * 30,), torch.float32)
    w[64:128] = 0  # an all-zero block
    t = quantize_nf4(w)
    codes = torch.stack([t.packed >> 4, t.packed & 15], 1).flatten().long()
    scaled = (w.view(-1, 64) / t.absmax[:, None]).nan_to_num(0.0).flatten()
    distance = (scaled[:, None] - NF4_CODE[None, :]).abs()
    assert torch.all(distance.gather(1, codes[:, None]).squeeze(1) <= distance.min(dim=1).values + 1e-7)
    assert t.absmax[1] == 0 and torch.all(codes[64:128] == NF4_ZERO)
    packed, state = bnb_quantize(w, 64, double_quant=False)
    assert torch.equal(t.packed, packed.flatten()) and torch.equal(t.absmax, state.absmax)
    assert torch.all(dequantize_nf4(t)[64:128] == 0)
    assert torch.all(dequantize_nf4(quantize_nf4(torch.zeros(300), double_quant=True)) == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [64, 128])
def test_double_quant_state_equals_bitsandbytes(block_size: int, dtype: torch.dtype) -> None:
    """Offset, second-level absmax and code map to the bit; the 8-bit codes to the bit except within bnb's CPU grid
    step of a midpoint (module doc), where ours are the nearest and theirs at most 2 / 65535 worse."""
    w = weights((block_size * (256 * 2 + 77) + 37,), dtype)  # 3 second-level blocks, the last short; an NF4 tail
    t = quantize_nf4(w, block_size, double_quant=True)
    packed, state = bnb_quantize(w, block_size, double_quant=True)
    assert isinstance(t.absmax, DoubleQuantState) and t.double_quant
    dq = t.absmax
    assert torch.equal(t.packed, packed.flatten())
    assert state.nested and dq.block_size == state.state2.blocksize == 256
    assert torch.equal(dq.offset, state.offset)
    assert torch.equal(dq.absmax, state.state2.absmax)
    assert torch.equal(dq.code, state.state2.code)
    assert dq.codes.dtype == state.absmax.dtype == torch.uint8 and dq.codes.shape == state.absmax.shape

    # what the 8-bit codes encode, from bnb's own numbers: (scale - offset) / second-level absmax
    scales = bnb_quantize(w, block_size, double_quant=False)[1].absmax
    block = torch.arange(scales.numel()) // 256
    v = (scales - state.offset) * (1.0 / state.state2.absmax)[block]
    error = (v[:, None] - DYNAMIC_CODE[None, :]).abs()
    ours, theirs = error.gather(1, dq.codes.long()[:, None]).squeeze(1), error.gather(1, state.absmax.long()[:, None])
    assert torch.all(ours <= error.min(dim=1).values)  # ours: the nearest code
    midpoints = (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / 2
    near_midpoint = (v[:, None] - midpoints[None, :]).abs().min(dim=1).values <= LUT_STEP / 2 + 1e-7
    assert torch.equal(dq.codes[~near_midpoint], state.absmax[~near_midpoint])
    assert torch.all(theirs.squeeze(1) <= ours + LUT_STEP + 1e-7)
    assert (dq.codes != state.absmax).sum() <= max(2, scales.numel() // 100)


# ----------------------------------------------------------------------------------------------------- dequantize


def bnb_state_with(t: NF4Tensor, state):
    """bnb's quant state carrying our quantized scales (their 8-bit codes may differ: see the module doc)."""
    state = copy.copy(state)
    state.absmax = t.absmax.codes if isinstance(t.absmax, DoubleQuantState) else t.absmax
    return state


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("shape", [(64 * 300 + 38,), (48, 256)], ids=["1d-tail", "2d"])
def test_dequantize_equals_bitsandbytes(shape, block_size: int, dtype: torch.dtype, double_quant: bool) -> None:
    w = weights(shape, dtype)
    t = quantize_nf4(w, block_size, double_quant)
    packed, state = bnb_quantize(w, block_size, double_quant)
    out = dequantize_nf4(t)
    assert out.dtype == dtype and out.shape == w.shape
    reference = bnb.dequantize_4bit(packed, bnb_state_with(t, state))  # (1, n) for a 1-D shape on its CPU path
    assert torch.equal(out, reference.view(shape))
    assert torch.equal(dequantize_nf4(t, torch.float32).to(dtype), out)  # one rounding, from float32


@pytest.mark.parametrize("block_size", [64, 128])
def test_dequantization_error_bound(block_size: int) -> None:
    """|w - ŵ| <= absmax · (largest code gap) / 2; double-quantized scales within absmax2 · (largest 8-bit gap) / 2."""
    w = weights((block_size * 600 + 37,), torch.float32)
    t = quantize_nf4(w, block_size)
    blocks = torch.arange(w.numel()) // block_size
    bound = t.absmax[blocks] * (NF4_CODE.diff().max() / 2)
    assert torch.all((w - dequantize_nf4(t)).abs() <= bound * (1 + 1e-6))
    assert (w - dequantize_nf4(t)).abs().max() > 0.5 * bound.max()  # the bound is not vacuous

    dq = quantize_nf4(w, block_size, double_quant=True).absmax
    scale_bound = dq.absmax[torch.arange(t.absmax.numel()) // 256] * (DYNAMIC_CODE.diff().max() / 2)
    assert torch.all((dequantize_scales(dq) - t.absmax).abs() <= scale_bound * (1 + 1e-6))


# ----------------------------------------------------------------------------------------------------- NF4Linear


def linear(in_features: int, out_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.bias, std=0.1)
    return layer


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
def test_nf4_linear_forward_is_linear_with_the_dequantized_weight(double_quant: bool) -> None:
    lin = linear(192, 48)
    q = NF4Linear.from_linear(lin, block_size=64, double_quant=double_quant)
    t = quantize_nf4(lin.weight, 64, double_quant)
    x = torch.randn(3, 5, 192, requires_grad=True)
    assert (q.in_features, q.out_features) == (192, 48)
    assert q.weight.dtype == torch.bfloat16 and torch.equal(q.weight, dequantize_nf4(t, torch.bfloat16))
    y = q(x)
    assert y.dtype == x.dtype and y.shape == (3, 5, 48)
    expected = F.linear(x.bfloat16(), dequantize_nf4(t, torch.bfloat16), lin.bias.bfloat16()).float()
    assert torch.equal(y, expected)
    with torch.no_grad():
        reference = lin(x)
        assert (y - reference).norm() / reference.norm() < 0.1  # NF4 + bf16 noise, against the float layer
    assert not any(p.requires_grad for p in q.parameters())
    y.sum().backward()  # frozen weight, gradient to the input (what QLoRA's adapters need)
    torch.testing.assert_close(x.grad, q.weight.float().sum(0).expand_as(x), rtol=1e-2, atol=1e-3)

    q32 = NF4Linear.from_linear(lin, double_quant=double_quant, compute_dtype=torch.float32)
    torch.testing.assert_close(q32(x), F.linear(x, dequantize_nf4(t), lin.bias), rtol=1e-6, atol=1e-6)


def test_bits_per_weight() -> None:
    """4 + 8/64 + 32/(64·256) (+ one float32 offset) with double quantization, 4 + 32/64 without."""
    lin = nn.Linear(512, 256, bias=False)
    n = lin.weight.numel()
    dq, plain = NF4Linear.from_linear(lin, double_quant=True), NF4Linear.from_linear(lin, double_quant=False)
    assert 8 * dq.nbytes() / n == 4 + 8 / 64 + 32 / (64 * 256) + 32 / n
    assert 8 * dq.nbytes() / n == pytest.approx(4.127, abs=1e-3)
    assert 8 * plain.nbytes() / n == 4.5
    held = sum(b.numel() * b.element_size() for b in dq.buffers())
    assert held == dq.nbytes() == quantize_nf4(lin.weight, double_quant=True).nbytes()


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
def test_state_dict_round_trip(double_quant: bool) -> None:
    a = NF4Linear.from_linear(linear(128, 40, seed=1), double_quant=double_quant)
    b = NF4Linear.from_linear(linear(128, 40, seed=2), double_quant=double_quant)
    keys = {"packed", "absmax_codes", "absmax2", "absmax_offset"} if double_quant else {"packed", "absmax"}
    assert set(a.state_dict()) == keys | {"bias"}
    x = torch.randn(4, 128)
    assert not torch.equal(a(x), b(x))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(a(x), b(x)) and torch.equal(a.weight, b.weight)


# ----------------------------------------------------------------------------------------------------- a model


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
    return Transformer(cfg).eval()


def test_quantize_model_nf4_keeps_logits_close() -> None:
    model = tiny_model()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    block_linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")}
    with torch.no_grad():
        reference = model(ids)
        # the oracle: the float model with each block weight replaced by its dequantized NF4 weight
        oracle = copy.deepcopy(model)
        for name in block_linears:
            w = oracle.get_submodule(name).weight
            w.copy_(dequantize_nf4(quantize_nf4(w, double_quant=True)))
        expected = oracle(ids)

    swap = quantize_model_nf4(model)
    assert set(swap.replaced) == set(block_linears) and len(block_linears) == 14
    assert all(isinstance(model.get_submodule(n), NF4Linear) for n in block_linears)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed, nn.Embedding)
    with torch.no_grad():
        logits = model(ids)
        assert logits.dtype == torch.float32
        assert (logits - expected).norm() / expected.norm() < 0.02  # only bf16 compute apart
        assert (logits - reference).norm() / reference.norm() < 0.1  # NF4 weights: close to the float model
        assert not torch.equal(logits, reference)
        assert torch.equal(swap.restore()(ids), reference)


def test_quantize_model_nf4_where() -> None:
    model = tiny_model()
    swap = quantize_model_nf4(model, "blocks.*.attn.*", double_quant=False, block_size=128)
    assert sorted(swap.replaced) == sorted(f"blocks.{i}.attn.{p}_proj" for i in range(2) for p in "qkvo")
    assert isinstance(model.blocks[0].mlp.up_proj, nn.Linear)
    assert model.blocks[1].attn.q_proj.block_size == 128 and model.blocks[1].attn.q_proj.scale_block_size is None
