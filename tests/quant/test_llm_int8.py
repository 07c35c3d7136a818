"""LLM.int8() (quant/llm_int8.py) against bitsandbytes 0.50 on its CPU backend (a test-only oracle): the row-wise codes,
statistics and outlier columns of `int8_vectorwise_quant`, its dequantization, the int32 product of
`int8_linear_matmul`, `int8_mm_dequant`, and `Linear8bitLt` (eval mode, int8 weights) end to end, with and without
outliers; plus hand-computed codes, the outlier decomposition against the float layer, the input gradient,
Int8Linear's state and quantize_model_llm_int8 on a tiny Transformer.

What bitsandbytes' CPU backend does not give, and what is tested instead:
- `int8_double_quant` (row- and column-wise statistics, for its backward) has only a CUDA kernel: not used here;
- its `int8_mm_dequant` scales by the constant 6.200124e-05 where 1 / 127² = 6.2000124e-05 (1.8e-5 relative), and
  its outlier product is added in float16 after the int8 part was rounded to float16: the outputs are compared
  within float16 rounding, ours against the exact (float64) decomposition within one rounding;
- `Linear8bitLt` in training mode on CPU dequantizes the weight and runs a float matmul (its `MatMul8bitFp`), with no
  int8 arithmetic: the comparisons run it in eval mode (`MatMul8bitLt`);
- it casts inputs and weights to float16 before quantizing, so the parity tests feed float16 tensors.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from lmforge import ModelConfig, Transformer
from lmforge.configfile import ConfigError
from lmforge.quant.llm_int8 import (
    Int8Linear,
    int8_matmul,
    int8_mm_dequantize,
    llm_int8_matmul,
    quantize_model_llm_int8,
    vectorwise_dequantize,
    vectorwise_quantize,
)

with warnings.catch_warnings():  # its CPU backend imports torch.utils.mkldnn, which warns of torch.jit's deprecation
    warnings.simplefilter("ignore", DeprecationWarning)
    import bitsandbytes.functional as bnb
    from bitsandbytes.nn import Linear8bitLt

FP16_ULP = 2.0**-10  # the spacing of float16 values in [1, 2)


def activations(rows: int, cols: int, outliers: tuple[int, ...] = (), seed: int = 0) -> torch.Tensor:
    """float16 activations ~ N(0, 1), with outlier feature columns: magnitudes 20..60 in some rows of each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    for c in outliers:
        hit = torch.rand(rows, generator=g) < 0.3
        hit[0] = True
        x[hit, c] = (20 + 40 * torch.rand(int(hit.sum()), generator=g)) * torch.sign(torch.randn(1, generator=g))
    return x.half()


def linear(in_features: int, out_features: int, seed: int = 0, dtype: torch.dtype = torch.float16) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.bias, std=0.1)
    return layer.to(dtype)


def bnb_linear(lin: nn.Linear, threshold: float) -> Linear8bitLt:
    """bitsandbytes' LLM.int8() layer over `lin`'s float16 weights, quantized (`.to(device)` does it), in eval mode."""
    layer = Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu").eval()


def bnb_vectorwise(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, stats, cols = bnb.int8_vectorwise_quant(x.clone(), threshold=threshold)
    return codes, stats, torch.empty(0, dtype=torch.int64) if cols is None else cols


# ----------------------------------------------------------------------------------------------------- quantization


def test_vectorwise_codes_by_hand() -> None:
    """threshold 6: column 2 holds an outlier (8). Only the outlier element is zeroed before the row absmax, so row 1
    keeps its -4 in column 2 in its scale (bitsandbytes' rule), then the whole column's codes are zeroed."""
    x = torch.tensor([[1.0, -2.0, 8.0], [0.5, 1.0, -4.0]])
    codes, absmax, cols = vectorwise_quantize(x, threshold=6.0)
    assert cols.tolist() == [2] and absmax.tolist() == [2.0, 4.0]
    assert codes.dtype == torch.int8 and codes.tolist() == [[64, -127, 0], [16, 32, 0]]  # 63.5 -> 64; 15.875, 31.75
    codes, absmax, cols = vectorwise_quantize(x)  # threshold 0: no outliers
    assert cols.numel() == 0 and absmax.tolist() == [8.0, 4.0]
    assert codes.tolist() == [[16, -32, 127], [16, 32, -127]]
    for threshold in (0.0, 6.0):
        expected = bnb_vectorwise(x.half(), threshold)
        assert all(torch.equal(a, b) for a, b in zip(vectorwise_quantize(x, threshold), expected, strict=True))


@pytest.mark.parametrize("threshold", [0.0, 6.0, 3.0])
@pytest.mark.parametrize(("rows", "cols"), [(64, 96), (1, 96), (7, 33)])
def test_vectorwise_quantize_equals_bitsandbytes(rows: int, cols: int, threshold: float) -> None:
    x = activations(rows, cols, outliers=(3, cols - 1))
    codes, absmax, outlier_cols = vectorwise_quantize(x, threshold)
    expected_codes, expected_absmax, expected_cols = bnb_vectorwise(x, threshold)
    assert codes.dtype == torch.int8 and torch.equal(codes, expected_codes)
    assert absmax.dtype == torch.float32 and torch.equal(absmax, expected_absmax)
    assert outlier_cols.dtype == torch.int64 and torch.equal(outlier_cols, expected_cols)
    expected = torch.nonzero((x.abs() >= threshold).any(0)).flatten() if threshold else torch.empty(0)
    assert outlier_cols.tolist() == expected.tolist() and outlier_cols.numel() >= (2 if threshold else 0)


def test_vectorwise_dequantize_equals_bitsandbytes() -> None:
    w = linear(96, 48).weight
    codes, absmax, _ = vectorwise_quantize(w)
    w_hat = vectorwise_dequantize(codes, absmax)
    assert w_hat.dtype == torch.float32 and torch.equal(w_hat, bnb.int8_vectorwise_dequant(codes, absmax))
    assert torch.all((w.float() - w_hat).abs() <= absmax[:, None] / 127 / 2 * (1 + 1e-6))  # half a step per row


def test_weight_codes_equal_linear8bitlt() -> None:
    lin = linear(96, 48)
    ours, theirs = Int8Linear.from_linear(lin), bnb_linear(lin, threshold=6.0)
    assert ours.codes.dtype == torch.int8 and torch.equal(ours.codes, theirs.weight.data)
    assert torch.equal(ours.absmax, theirs.weight.SCB)


def test_all_zero_rows_quantize_to_zero() -> None:
    x = torch.randn(4, 16)
    x[1] = 0.0
    codes, absmax, _ = vectorwise_quantize(x)
    assert absmax[1] == 0 and torch.all(codes[1] == 0) and not torch.isnan(vectorwise_dequantize(codes, absmax)).any()
    lin = Int8Linear.from_linear(linear(16, 8, dtype=torch.float32))
    y = lin(x)
    assert not torch.isnan(y).any() and torch.equal(y[1], lin.bias)  # 0 · W + b


# ----------------------------------------------------------------------------------------------------- products


@pytest.mark.parametrize(("m", "k", "n"), [(1, 3, 5), (7, 13, 3), (33, 64, 16), (5, 2048, 24)])
def test_int8_matmul_is_exact(m: int, k: int, n: int) -> None:
    """A Bᵀ in int32, exact (k = 2048 sums past 2^24, where a float32 product would round)."""
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    if k == 2048:
        a[0], b[0] = 127, 127  # 2048 · 127² > 2^24
    out = int8_matmul(a, b)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out.long(), a.long() @ b.long().T)
    assert torch.equal(out, bnb.int8_linear_matmul(a, b))
    assert torch.equal(int8_matmul(a, b, pad=True), out)  # zero-padded to the shapes CUDA's int8 GEMM takes


def test_mm_dequantize_within_float16_rounding_of_bitsandbytes() -> None:
    """acc · (absmax_a ⊗ absmax_b) / 127²: ours in float32, bnb's in float16 with its constant 6.200124e-05."""
    x_codes, x_absmax, _ = vectorwise_quantize(activations(32, 96))
    w_codes, w_absmax, _ = vectorwise_quantize(linear(96, 48).weight)
    acc = int8_matmul(x_codes, w_codes)
    out = int8_mm_dequantize(acc, x_absmax, w_absmax)
    exact = acc.double() * (x_absmax.double()[:, None] * w_absmax.double()[None, :]) / 127**2
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=0)
    theirs = bnb.int8_mm_dequant(acc, x_absmax, w_absmax)
    assert theirs.dtype == torch.float16
    torch.testing.assert_close(out, theirs.float(), rtol=FP16_ULP, atol=1e-7)


def exact_decomposition(lin: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The LLM.int8() output in float64 from our (bnb-identical) codes: the int8 part plus the outlier part."""
    codes, absmax, cols = vectorwise_quantize(x, lin.threshold)
    int8_part = (codes.double() @ lin.codes.double().T) * (absmax.double()[:, None] * lin.absmax.double()) / 127**2
    w_hat = lin.codes.double() * lin.absmax.double()[:, None] / 127
    return int8_part + x[:, cols].double() @ w_hat[:, cols].T + lin.bias.double()


@pytest.mark.parametrize("threshold", [0.0, 6.0], ids=["no-outliers", "outliers"])
def test_int8_linear_equals_linear8bitlt(threshold: float) -> None:
    lin = linear(96, 48)
    x = activations(21, 96, outliers=(5, 17, 90))
    ours, theirs = Int8Linear.from_linear(lin, threshold=threshold), bnb_linear(lin, threshold)
    with torch.no_grad():
        y, expected = ours(x.view(3, 7, 96)), theirs(x.view(3, 7, 96))
    assert y.dtype == torch.float16 and y.shape == expected.shape == (3, 7, 48)
    if threshold:
        assert theirs.state.idx.tolist() == [5, 17, 90] == vectorwise_quantize(x, threshold)[2].tolist()
    exact = exact_decomposition(ours, x).view(3, 7, 48)
    torch.testing.assert_close(y.double(), exact, rtol=FP16_ULP / 2, atol=1e-4)  # one float16 rounding of the exact
    # bnb rounds the int8 part to float16, then adds the outlier part in float16: a few roundings of the parts
    atol = 2 * FP16_ULP * exact.abs().max().item()
    torch.testing.assert_close(y.float(), expected.float(), rtol=2 * FP16_ULP, atol=atol)


def test_outlier_columns_keep_the_error_small() -> None:
    """With a few outlier features (|x| ~ 20..60), the int8-only product loses the other features' precision (each
    row's scale is set by its outliers); holding the outlier columns back in float keeps the output close to the
    float layer. Without values past the threshold, both thresholds give the same result."""
    lin = linear(256, 64, dtype=torch.float32)

    def output(threshold: float, x: torch.Tensor) -> torch.Tensor:
        return Int8Linear.from_linear(lin, threshold=threshold)(x)

    def error(threshold: float, x: torch.Tensor) -> float:
        return ((output(threshold, x) - lin(x)).norm() / lin(x).norm()).item()

    with torch.no_grad():
        x = activations(64, 256, outliers=(7, 100)).float()
        assert error(6.0, x) < 0.01
        assert error(0.0, x) > 5 * error(6.0, x)
        plain = activations(64, 256).float()
        assert plain.abs().max() < 6 and torch.equal(output(6.0, plain), output(0.0, plain))
        assert error(0.0, plain) < 0.01


def test_llm_int8_matmul_is_the_layer() -> None:
    lin = Int8Linear.from_linear(linear(96, 48, dtype=torch.float32))
    x = activations(2 * 5, 96, outliers=(1,)).float().view(2, 5, 96)
    expected = llm_int8_matmul(x, lin.codes, lin.absmax, lin.bias, threshold=lin.threshold)
    assert torch.equal(lin(x), expected) and expected.shape == (2, 5, 48)
    exact = exact_decomposition(lin, x.view(10, 96))
    torch.testing.assert_close(expected.double().view(10, 48), exact, rtol=1e-6, atol=1e-6)  # float32 roundings


# ----------------------------------------------------------------------------------------------------- Int8Linear


def test_gradient_reaches_the_input_through_the_dequantized_weight() -> None:
    """Frozen int8 weight; dL/dx = dL/dy · Ŵ, as bitsandbytes' MatMul8bitLt backward (what adapters need)."""
    lin = Int8Linear.from_linear(linear(96, 48, dtype=torch.float32))
    x = activations(12, 96, outliers=(4,)).float().view(3, 4, 96).requires_grad_(True)
    g = torch.randn(3, 4, 48)
    (lin(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ lin.weight, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in lin.parameters())


def test_int8_linear_state() -> None:
    a = Int8Linear.from_linear(linear(128, 40, seed=1, dtype=torch.float32), threshold=4.0)
    b = Int8Linear.from_linear(linear(128, 40, seed=2, dtype=torch.float32))
    assert (a.in_features, a.out_features, a.threshold) == (128, 40, 4.0)
    assert a.weight.dtype == torch.float32 and torch.equal(a.weight, vectorwise_dequantize(a.codes, a.absmax))
    assert Int8Linear.from_linear(linear(128, 40)).weight.dtype == torch.float16
    assert a.nbytes() == 128 * 40 + 4 * 40
    assert set(a.state_dict()) == {"codes", "absmax", "bias"}
    x = torch.randn(4, 128)
    assert not torch.equal(a(x), b(x))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    b.threshold = a.threshold
    assert torch.equal(a(x), b(x)) and "threshold=4.0" in repr(a)


def test_errors_name_the_value() -> None:
    with pytest.raises(ConfigError, match=r"invalid threshold=-1.0"):
        Int8Linear.from_linear(linear(8, 4), threshold=-1.0)
    with pytest.raises(ConfigError, match=r"invalid threshold=nan"):
        vectorwise_quantize(torch.randn(2, 3), threshold=float("nan"))
    with pytest.raises(ValueError, match=r"2-D tensor \(rows, columns\), got shape \(2, 3, 4\)"):
        vectorwise_quantize(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"2-D int8 codes, got shape \(2, 3, 4\)"):
        Int8Linear(torch.zeros(2, 3, 4, dtype=torch.int8), torch.ones(2))


# ----------------------------------------------------------------------------------------------------- a model


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("threshold", [6.0, 3.0], ids=["default", "outliers"])  # 3.0: 2..4 of 64 columns a layer
def test_quantize_model_llm_int8_keeps_logits_close(threshold: float) -> None:
    model = tiny_model()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    block_linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")}
    with torch.no_grad():
        reference = model(ids)
        swap = quantize_model_llm_int8(model, threshold=threshold)
        assert set(swap.replaced) == block_linears and len(block_linears) == 14
        assert all(isinstance(model.get_submodule(n), Int8Linear) for n in block_linears)
        assert all(model.get_submodule(n).threshold == threshold for n in block_linears)
        assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed, nn.Embedding)
        logits = model(ids)
        assert logits.dtype == torch.float32 and not torch.equal(logits, reference)
        assert (logits - reference).norm() / reference.norm() < 0.02
        assert torch.equal(swap.restore()(ids), reference)


def test_quantize_model_llm_int8_where() -> None:
    model = tiny_model()
    float_model = copy.deepcopy(model)
    swap = quantize_model_llm_int8(model, "blocks.*.attn.*")
    assert sorted(swap.replaced) == sorted(f"blocks.{i}.attn.{p}_proj" for i in range(2) for p in "qkvo")
    assert isinstance(model.blocks[0].mlp.up_proj, nn.Linear)
    w = float_model.blocks[1].attn.q_proj.weight
    q = model.blocks[1].attn.q_proj
    assert torch.all((q.weight - w).abs() <= q.absmax[:, None] / 254 * (1 + 1e-6))  # half a step of its row
