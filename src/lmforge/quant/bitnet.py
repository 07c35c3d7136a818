"""BitNet b1.58: linear layers with ternary weights {-1, 0, +1} and int8 activations, trained from scratch
(Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits", and its "Training Tips, Code
and FAQ" note).

Weights, absmean ternarization with one scale per weight matrix (log2 3 = 1.58 bits a weight):

    γ = mean_ij |W_ij|        s_W = 1 / max(γ, ε)        C_W = clamp(round(W · s_W), -1, 1)        W̃ = C_W / s_W

Activations, absmax int8 per token (each row of the last dimension):

    s_t = 127 / max(max_j |x_tj|, ε)        C_x = clamp(round(x_t · s_t), -128, 127)        x̃_t = C_x / s_t

with ε = 1e-5, round half to even, in float32 and the result cast back to the input's dtype. y = x̃ W̃ᵀ (+ b): an
integer product C_x C_Wᵀ rescaled by 1 / (s_t s_W), additions only, since the weights are ternary. The arithmetic is
that of the public code (the training-tips note's `weight_quant` / `activation_quant`, which Hugging Face's
`AutoBitLinear(online_quant=True)` repeats), not the paper's formula W / (γ + ε): the code clamps γ at ε and
multiplies by its reciprocal; the two differ for weights within ~ε/γ of a rounding midpoint. |x_t · s_t| <= 127,
so the code -128 is never produced in practice; a token (or a matrix) of zeros has codes 0 and gives 0, not NaN.

Training. The layer keeps full-precision latent weights W, which the optimizer updates; the forward sees W̃ and x̃.
The gradient goes straight through both quantizers, with no clipping mask (unlike quant/qat.py):

    W_used = W + (W̃ - W).detach()        x_used = x + (x̃ - x).detach()        dL/dW = dL/dW̃,  dL/dx = dL/dx̃

Norms. The reference BitLinear applies a parameter-free RMSNorm to its input before quantizing it (and BitNet
b1.58 2B4T adds SubLN before the output projections). This module does not: `bitnet_model` swaps the linears of the
existing Transformer, whose pre-norms (attn_norm, mlp_norm) feed q/k/v and gate/up; o_proj and down_proj take the
attention output and the SwiGLU product as they are. Per-token absmax scaling makes the codes independent of the
input's magnitude either way.

    bitnet_model(model)    every nn.Linear under blocks.* becomes a BitLinear over the same parameters; the
                           embedding and the LM head stay in full precision, as in the paper
    BitLinear.ternary()    (C_W int8, s_W): the weights a 2-bit packed inference format stores
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.configfile import check
from lmforge.model.surgery import Swap, Where, swap_modules
from lmforge.quant.nf4 import linear_where
from lmforge.quant.qat import baked_linear

__all__ = ["EPS", "BitLinear", "activation_quant", "activation_quantize", "bitnet_model", "convert_bitnet",
           "ternary_quantize", "weight_quant"]  # fmt: skip

EPS = 1e-5  # the floor of γ and of a token's absmax (the reference code's clamp)


def ternary_quantize(w: Tensor, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Absmean ternary codes of `w` (int8 in {-1, 0, 1}, w's shape) and the 0-d float32 scale s_W = 1 / max(γ, ε),
    γ = mean |w| (module doc); W̃ = C_W / s_W."""
    w = w.detach().float()
    scale = 1.0 / w.abs().mean().clamp(min=eps)
    return (w * scale).round().clamp(-1, 1).to(torch.int8), scale


def weight_quant(w: Tensor, eps: float = EPS) -> Tensor:
    """W̃ = C_W / s_W in w's dtype (forward only; `BitLinear` adds the straight-through gradient)."""
    codes, scale = ternary_quantize(w, eps)
    return (codes.float() / scale).to(w.dtype)


def activation_quantize(x: Tensor, bits: int = 8, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Per-token absmax codes of `x` (int8 in -2^(b-1)..2^(b-1) - 1, x's shape) and float32 scales
    s_t = (2^(b-1) - 1) / max(max_j |x_tj|, ε) of shape (..., 1); x̃ = C_x / s_t."""
    check(isinstance(bits, int) and 2 <= bits <= 8, "bits", bits, "must be an integer from 2 to 8")
    top = 2 ** (bits - 1) - 1
    x = x.detach().float()
    scale = top / x.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    return (x * scale).round().clamp(-top - 1, top).to(torch.int8), scale


def activation_quant(x: Tensor, bits: int = 8, eps: float = EPS) -> Tensor:
    """x̃ = C_x / s_t in x's dtype (forward only)."""
    codes, scale = activation_quantize(x, bits, eps)
    return (codes.float() / scale).to(x.dtype)


def _straight_through(x: Tensor, q: Tensor) -> Tensor:
    """q in the forward, the identity's gradient to x in the backward: x + (q - x).detach()."""
    return x + (q - x).detach()


class BitLinear(nn.Module):
    """A BitNet b1.58 linear layer: y = x̃ W̃ᵀ + b with W̃ the absmean-ternarized latent weight and x̃ the per-token
    int8 input, both with straight-through gradients (module doc). `weight` (and `bias`, kept in full precision)
    are float parameters: the layer's own when made `from_linear`, so training the BitLinear trains them."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"BitLinear takes a 2-D weight (out, in), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BitLinear:
        """The layer over `linear`'s own weight and bias parameters (the same tensors)."""
        return cls(linear.weight, linear.bias)

    def ternary(self) -> tuple[Tensor, Tensor]:
        """(C_W int8 (out, in) in {-1, 0, 1}, s_W 0-d float32) of the current latent weight."""
        return ternary_quantize(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        w = _straight_through(self.weight, weight_quant(self.weight))
        return F.linear(_straight_through(x, activation_quant(x)), w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def bitnet_model(model: nn.Module, where: Where = "blocks.*") -> Swap:
    """Replace, in place, every `nn.Linear` that `where` selects (default: all under `blocks`: attention and MLP
    projections, not the embedding nor the LM head) by a `BitLinear` over its own parameters (state-dict names
    unchanged). Returns the `Swap` (`restore()` gives back float layers holding the latent weights). Expert
    matrices (`ExpertLinear`) are not `nn.Linear` and stay as they are."""
    return swap_modules(model, linear_where(where), lambda _, old: BitLinear.from_linear(old))


def convert_bitnet(model: nn.Module) -> nn.Module:
    """Replace, in place, every `BitLinear` of `model` by an `nn.Linear` whose weight is W̃ = s_W C_W (the ternary
    weight the forward uses, baked in; bias unchanged): what an export holds. The per-token int8 activations are
    not part of a plain linear (an inference path applies its own). Returns the model."""
    factory = lambda _, old: baked_linear(old, weight_quant(old.weight))
    swap_modules(model, lambda _, m: isinstance(m, BitLinear), factory)
    return model
