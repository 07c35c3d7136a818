"""LLM.int8(): int8 matrix multiplication with outlier features kept in float (Dettmers et al. 2022).

Vector-wise quantization. For activations X (tokens, in) and a weight W (out, in), every row of each gets its own
absmax scale (a row of X is a token, a row of W an output feature), and the int8 product is rescaled by their outer
product:

    a_t = max_j |X_tj|,   C_X = round(X · (127 / a))            int8 (tokens, in)
    b_o = max_j |W_oj|,   C_W = round(W · (127 / b))            int8 (out, in)
    X Wᵀ ≈ (C_X C_Wᵀ) ⊙ (a ⊗ b) / 127²                         C_X C_Wᵀ accumulated exactly in int32

Outliers. From a few billion parameters on, a handful of hidden dimensions carry activations far larger than the
rest (the paper's emergent features). A token's absmax set by one of them leaves its other values a few codes.
Mixed-precision decomposition: the outlier columns O = {j : |X_tj| >= τ for some token t} (τ = 6.0) are multiplied
in float, the rest in int8:

    X Wᵀ ≈ X_{:,O} Ŵ_{:,O}ᵀ + int8 product of X_{:,¬O} and W_{:,¬O}       (O is small: ~0.1% of the columns)

This follows bitsandbytes (`int8_vectorwise_quant`, `Linear8bitLt(has_fp16_weights=False)`), so that the codes,
the statistics a, b and the outlier columns are bitsandbytes' own (a test oracle, never imported here):
- only the elements with |x| >= τ are set to 0 before the row absmax is taken, so the other values of an outlier
  column still count towards their token's a_t; then the whole outlier columns of C_X are set to 0;
- codes are round(x · (127 / a)) in float32, rounding half to even: the product by the reciprocal, where
  quant/primitives.py divides by s = a / 127 (the two can differ by one code on a value within an ulp of a half);
- the weight is held as C_W and b only (bitsandbytes' CB and SCB), and the outlier part uses the weight columns
  dequantized from them, Ŵ_{:,O} = C_W[:, O] · b / 127, not the float weight; W has no outlier decomposition;
- τ = 0 turns the decomposition off; O is taken over every token of the call (the flattened batch).
Where this module departs from it: bitsandbytes casts X and W to float16 before quantizing; here the float32 values
of the input's own dtype are quantized (the same for float16 inputs; bfloat16 activations past 65504 do not
overflow). The int8 part is dequantized in float32 with 1 / 127² (bitsandbytes' CPU kernel uses 6.200124e-05, 1.8e-5
away), the outlier part and the bias are added in float32 and the sum is rounded once to the input's dtype (it rounds
the int8 part to float16 and adds the outlier product in float16). A token whose values are all 0 (or outliers)
has a = 0 and codes 0 (bitsandbytes' 127 / 0 makes NaNs there, whose int8 cast is undefined).

The int32 product is `torch._int_mm` (exact for any k: a float32 product rounds once |C_X C_Wᵀ| passes 2^24, from
k > 1040); on CUDA, whose int8 GEMM needs m > 16 and k, n multiples of 8, the operands are padded with zeros first.

`Int8Linear` holds a linear layer this way, frozen: in · out + 4 · out bytes (against 2 in · out in float16). The
gradient reaches the input straight through the dequantized weight, dL/dX = dL/dY Ŵ, as bitsandbytes' backward does,
so adapters on earlier layers train. `quantize_model_llm_int8` swaps it in for a model's linear layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.configfile import check_finite
from lmforge.model.surgery import Swap, Where, swap_modules
from lmforge.quant.nf4 import linear_where
from lmforge.utils.dtypes import dtype_name, dtype_named

DEFAULT_THRESHOLD = 6.0  # τ: the paper's and bitsandbytes' outlier threshold for inference
INT8_MAX = 127


def vectorwise_quantize(x: Tensor, threshold: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Row-wise absmax int8 quantization of the 2-D `x` with outlier columns held out when `threshold` > 0 (module
    doc): (codes int8 (rows, cols), absmax float32 (rows,), outlier column indices int64, empty when none)."""
    check_finite("threshold", threshold, at_least=0.0)
    if x.dim() != 2:
        raise ValueError(f"vectorwise_quantize takes a 2-D tensor (rows, columns), got shape {tuple(x.shape)}")
    x = x.detach().float()
    cols = torch.empty(0, dtype=torch.int64, device=x.device)
    if threshold > 0:
        outliers = x.abs() >= threshold
        cols = outliers.any(dim=0).nonzero().flatten()
        x = x.masked_fill(outliers, 0.0)
    absmax = x.abs().amax(dim=1)
    reciprocal = torch.where(absmax > 0, INT8_MAX / absmax, 0.0)
    codes = torch.round(x * reciprocal[:, None]).to(torch.int8)
    codes[:, cols] = 0
    return codes, absmax, cols


def vectorwise_dequantize(codes: Tensor, absmax: Tensor) -> Tensor:
    """x̂ = codes · absmax / 127 per row, in float32 (as bitsandbytes: times absmax, then times float32(1 / 127))."""
    return codes.float() * absmax.float()[:, None] * (1 / INT8_MAX)


def int8_matmul(a: Tensor, b: Tensor, *, pad: bool | None = None) -> Tensor:
    """a bᵀ for int8 a (m, k) and b (n, k), exact in int32: (m, n). `pad` (default: on CUDA) first pads with zero
    rows and columns to m > 16 and k, n multiples of 8, the shapes CUDA's int8 GEMM takes; zeros add nothing."""
    m, n = a.shape[0], b.shape[0]
    if a.is_cuda if pad is None else pad:
        k_pad = -a.shape[1] % 8
        a = F.pad(a, (0, k_pad, 0, max(17 - m, 0)))
        b = F.pad(b, (0, k_pad, 0, -n % 8))
    return torch._int_mm(a, b.t())[:m, :n]


def int8_mm_dequantize(acc: Tensor, absmax_a: Tensor, absmax_b: Tensor) -> Tensor:
    """The float32 product that int32 `acc` = C_a C_bᵀ stands for: acc ⊙ (absmax_a ⊗ absmax_b) / 127²."""
    return acc.float() * (absmax_a.float()[:, None] * absmax_b.float()[None, :] * (1 / INT8_MAX**2))


def _llm_int8_product(x: Tensor, codes: Tensor, absmax: Tensor, threshold: float) -> Tensor:
    """X Ŵᵀ in float32 for 2-D x: the int8 product of the regular columns plus the float product of the outlier ones."""
    x_codes, x_absmax, cols = vectorwise_quantize(x, threshold)
    y = int8_mm_dequantize(int8_matmul(x_codes, codes), x_absmax, absmax)
    if cols.numel():
        y = y.addmm_(x[:, cols].float(), vectorwise_dequantize(codes[:, cols], absmax).T)
    return y


class _LLMInt8Product(torch.autograd.Function):
    """`_llm_int8_product` with the gradient to x straight through the frozen weight: dL/dx = dL/dy Ŵ."""

    @staticmethod
    def forward(ctx, x: Tensor, codes: Tensor, absmax: Tensor, threshold: float) -> Tensor:
        ctx.save_for_backward(codes, absmax)
        ctx.x_dtype = x.dtype
        return _llm_int8_product(x, codes, absmax, threshold)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        codes, absmax = ctx.saved_tensors
        grad_x = grad @ vectorwise_dequantize(codes, absmax) if ctx.needs_input_grad[0] else None
        return (None if grad_x is None else grad_x.to(ctx.x_dtype)), None, None, None


def llm_int8_matmul(x: Tensor, codes: Tensor, absmax: Tensor, bias: Tensor | None = None,
                    threshold: float = DEFAULT_THRESHOLD) -> Tensor:  # fmt: skip
    """y = X Ŵᵀ + b by LLM.int8() for x (..., in) and a weight held as int8 `codes` (out, in) and row `absmax`
    (out,): computed in float32, returned in x's dtype, (..., out)."""
    y = _LLMInt8Product.apply(x.reshape(-1, x.shape[-1]), codes, absmax, threshold)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], codes.shape[0])


class Int8Linear(nn.Module):
    """A frozen linear layer in LLM.int8(): y = X Ŵᵀ + b with outlier columns of X (|x| >= `threshold`) in float.

    Buffers (saved in the state dict): `codes` (out, in) int8 and `absmax` (out,) float32, bitsandbytes' CB and
    SCB; the bias stays a frozen parameter. `weight` is the dequantized weight in the dtype it was quantized from
    (code reading a projection's weight keeps working). Casting the module (`.half()`) also casts the float32 row
    scales: quantize after casting."""

    def __init__(self, codes: Tensor, absmax: Tensor, bias: Tensor | None = None,
                 threshold: float = DEFAULT_THRESHOLD, weight_dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        if codes.dim() != 2 or codes.dtype != torch.int8:
            raise ValueError(f"Int8Linear takes 2-D int8 codes, got shape {tuple(codes.shape)} of {codes.dtype}")
        check_finite("threshold", threshold, at_least=0.0)
        self.out_features, self.in_features = codes.shape
        self.threshold, self.weight_dtype = threshold, weight_dtype
        self.register_buffer("codes", codes)
        self.register_buffer("absmax", absmax.float())
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = DEFAULT_THRESHOLD) -> Int8Linear:
        """Quantize `linear`'s weight row-wise (keeping no reference to `linear`)."""
        codes, absmax, _ = vectorwise_quantize(linear.weight)
        return cls(codes, absmax, linear.bias, threshold, linear.weight.dtype)

    def spec(self) -> dict[str, Any]:
        """What rebuilds this layer from its state dict besides the tensors (`from_state`; quant/modules.py)."""
        return {"threshold": self.threshold, "weight_dtype": dtype_name(self.weight_dtype)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], spec: dict[str, Any]) -> Int8Linear:
        """The layer whose `state_dict()` is `state` and whose `spec()` is `spec` (a saved model's)."""
        return cls(state["codes"], state["absmax"], state.get("bias"), spec["threshold"],
                   dtype_named(spec["weight_dtype"]))  # fmt: skip

    @property
    def weight(self) -> Tensor:
        """The dequantized weight, (out_features, in_features) in `weight_dtype`."""
        return vectorwise_dequantize(self.codes, self.absmax).to(self.weight_dtype)

    def nbytes(self) -> int:
        """Bytes holding the weight: int8 codes and float32 row scales (not the bias)."""
        return self.codes.numel() + 4 * self.absmax.numel()

    def forward(self, x: Tensor) -> Tensor:
        return llm_int8_matmul(x, self.codes, self.absmax, self.bias, self.threshold)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"threshold={self.threshold}")  # fmt: skip


def quantize_model_llm_int8(model: nn.Module, where: Where = "blocks.*", *,
                            threshold: float = DEFAULT_THRESHOLD) -> Swap:  # fmt: skip
    """Replace, in place, every `nn.Linear` that `where` selects (default: all under `blocks`, so not the embedding
    nor the LM head) by an `Int8Linear`. Returns the `Swap` (`restore()` undoes it; drop it to free the float layers).
    Mixture-of-experts expert matrices (`ExpertLinear`) are not `nn.Linear` and stay as they are."""
    factory = lambda _, old: Int8Linear.from_linear(old, threshold)
    return swap_modules(model, linear_where(where), factory)
