"""Weight-only quantized linear layers: int8 or int4 codes with group-wise scales (and optional offsets), kept
quantized in memory and run as such.

One form holds every weight-only format lmforge quantizes to or reads, with G input columns per group:

    W[o, i] = s[o, g] · q[o, i] + m[o, g],       g = i // G,    s, m float32 (out, in / G), m optional

q is 8-bit (int8 -128..127, or uint8 0..255 unsigned), or 4-bit, packed two per byte along each row
(`primitives.pack_int4`'s order: the first column of a pair in the high nibble), signed (-8..7) or unsigned
(0..15). Symmetric absmax codes have no m; a zero
point z is the offset m = -s z (s (q - z) = s q - s z); llama.cpp's blocks map on exactly (io/gguf_quants.py):

    Q8_0   G = 32   int8 q = qs                    s = d
    Q5_0   G = 32   int8 q = code - 16 (5 bits)    s = d
    Q4_0   G = 32   signed 4-bit q = code - 8      s = d
    Q4_1   G = 32   unsigned 4-bit q = code        s = d,        m = m
    Q4_K   G = 32   unsigned 4-bit q               s = d · sc,   m = -(dmin · mn)     (the 6-bit sub-block scales)
    Q6_K   G = 16   int8 q = code - 32             s = d · sc

with the float products formed as ggml forms them and the dequantized weight computed as one product and one sum
in float32, so `weight` is bit-identical to llama.cpp's dequantization (and to the float model lmforge loads).

Forward, y = x Wᵀ + b, by one of three paths:

    dequantize   W in x's dtype from the codes at each call, then one matmul: exact (the float model's products
                 on the same weights); under torch.compile the dequantization fuses into the matmul's reads
    kernel       (4-bit, G in 32..256, out a multiple of 16, CPU) torch's packed int4 CPU matmul
                 (`_weight_int4pack_mm_for_cpu`, the kernel gpt-fast and torchao use): W = s' (q' - 8) + z' with
                 q' the unsigned code (a signed code + 8), s' = s and z' = m + 8 s (unsigned) or m (signed),
                 activations and s', z' in bfloat16 (its fast path), the result cast back; the weight is repacked
                 into the kernel's layout once
    int8 kernel  (signed 8-bit, one scale per row: G = in, no offset, CPU) torch's int8 weight-only CPU matmul
                 (`_weight_int8pack_mm`): y_o = s_o Σ_i q_oi x_i, x and s in bfloat16 (its fast path: in float32
                 it runs ~10x slower than the exact path), the codes used as they are held

`use_kernel(model)` switches every layer that can to a kernel (default: dequantize). A quantized token embedding
(`QuantEmbedding`, e.g. a GGUF file's Q8_0 table) dequantizes the rows it looks up, and as the tied LM head runs
the product as a `QuantLinear` (`project`), so a tied head never exists in float.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmforge.infer.matvec import matvec
from lmforge.quant.primitives import QuantError, pack_int4, unpack_int4

__all__ = ["KERNEL_GROUPS", "QuantEmbedding", "QuantLinear", "use_kernel"]

KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes torch's int4 CPU kernel takes


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is `bits`-bit codes with group-wise scales and optional offsets (module
    docstring). Buffers: `codes` (out, in) int8 / uint8, or (out, in / 2) uint8 packed 4-bit; `scale` and
    `offset` (out, in / G) float32; the bias a frozen parameter."""

    def __init__(
        self,
        codes: Tensor,
        scale: Tensor,
        offset: Tensor | None = None,
        bias: Tensor | None = None,
        *,
        bits: int,
        signed: bool = True,
        group_size: int,
        packed: bool = False,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise QuantError(f"QuantLinear holds 4- or 8-bit codes, not bits={bits}")
        if codes.dim() != 2:
            raise QuantError(f"QuantLinear takes (out, in) codes, got shape {tuple(codes.shape)}")
        out_features, in_features = codes.shape
        in_features *= 2 if packed and bits == 4 else 1
        if group_size < 1 or in_features % group_size:
            raise QuantError(f"group_size={group_size} must divide the {in_features} input features")
        groups = (out_features, in_features // group_size)
        for name, t in (("scale", scale), ("offset", offset)):
            if t is not None and tuple(t.shape) != groups:
                raise QuantError(f"{name} has shape {tuple(t.shape)}; {groups} expected (out, in / group_size)")
        if bits == 4 and in_features % 2:
            raise QuantError(f"4-bit codes pack two per byte: {in_features} input features must be even")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.signed = signed
        byte = torch.int8 if signed else torch.uint8
        if packed:  # stored bytes, as `codes` holds them (a saved layer's state)
            codes = codes.to(byte if bits == 8 else torch.uint8)
        else:
            codes = codes.to(byte) if bits == 8 else pack_int4(codes).view(out_features, in_features // 2)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("offset", None if offset is None else offset.float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # the int4 kernel's weight and (scales, zeros), derived (not saved): set by `use_kernel`
        self.register_buffer("kernel_weight", None, persistent=False)
        self.register_buffer("kernel_scales", None, persistent=False)

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero_point: Tensor | None = None, bias: Tensor | None = None,
                   *, bits: int, group_size: int) -> QuantLinear:  # fmt: skip
        """A layer from the zero-point form W = (q - z) s of GPTQ, AWQ and `quant.primitives`: unsigned codes with
        integer zero points z (stored as the offset m = -s z, so W = s q + m, equal to (q - z) s within one float32
        rounding), or signed codes with no zero point (W = s q exactly)."""
        offset = None if zero_point is None else -(scale.float() * zero_point.float())
        return cls(codes, scale, offset, bias, bits=bits, signed=zero_point is None, group_size=group_size)

    def spec(self) -> dict[str, Any]:
        """What rebuilds this layer from its state dict besides the tensors (`from_state`; quant/modules.py)."""
        return {"bits": self.bits, "signed": self.signed, "group_size": self.group_size}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], spec: dict[str, Any]) -> QuantLinear:
        """The layer whose `state_dict()` is `state` and whose `spec()` is `spec` (a saved model's)."""
        return cls(state["codes"], state["scale"], state.get("offset"), state.get("bias"), bits=spec["bits"],
                   signed=spec["signed"], group_size=spec["group_size"], packed=True)  # fmt: skip

    @property
    def kernel(self) -> bool:
        """Whether the forward runs one of torch's CPU kernels (module docstring); set it with `use_kernel`."""
        return self.kernel_weight is not None

    def unpacked(self) -> Tensor:
        """The integer codes q (out, in): int8 (signed) or uint8 (unsigned)."""
        if self.bits == 8:
            return self.codes
        flat = unpack_int4(self.codes.reshape(-1), self.out_features * self.in_features, signed=self.signed)
        return flat.view(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W = s q + m (out, in), computed in float32 (one product, one sum) and cast to `dtype`."""
        q = self.unpacked().view(self.out_features, -1, self.group_size).float()
        w = q * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.view(self.out_features, self.in_features).to(dtype)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (float32): code that reads a projection's weight keeps working."""
        return self.dequantize()

    @property
    def kernel_ready(self) -> bool:
        """Whether torch's int4 or int8 CPU kernel can run this layer (module docstring)."""
        if self.codes.device.type != "cpu":
            return False
        if self.bits == 8:
            return self.signed and self.offset is None and self.group_size == self.in_features
        return self.group_size in KERNEL_GROUPS and self.out_features % 16 == 0  # the int4 kernel's tiles

    def nbytes(self) -> int:
        """Bytes of the quantized weight: codes, scales and offsets (not the bias)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset) if t is not None)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_weight is None:  # one row under torch.compile: multiply and sum, the dequantization fused
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return matvec(x, self.dequantize(x.dtype), bias)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.kernel_weight, self.kernel_scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.kernel_weight, self.group_size,
                                                           self.kernel_scales)  # fmt: skip
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @torch.no_grad()
    def set_kernel(self, on: bool) -> None:
        """Set up torch's int4 or int8 CPU kernel (`on`; the layer must be `kernel_ready`: a 4-bit weight is
        repacked once) or drop it."""
        if not on:
            self.kernel_weight = self.kernel_scales = None
            return
        if not self.kernel_ready:
            raise QuantError(f"the CPU kernels take 4-bit codes in groups of {KERNEL_GROUPS} or signed 8-bit codes "
                             f"with one scale per row, on the CPU; this layer is {self.extra_repr()}")  # fmt: skip
        if self.bits == 8:
            self.kernel_weight, self.kernel_scales = self.codes, self.scale[:, 0].to(torch.bfloat16).contiguous()
            return
        q = self.unpacked().to(torch.int32) + (8 if self.signed else 0)  # the kernel's unsigned codes
        zero = torch.zeros_like(self.scale) if self.offset is None else self.offset.clone()
        if not self.signed:
            zero += 8 * self.scale
        self.kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.kernel_scales = torch.stack([self.scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()

    def project(self, x: Tensor) -> Tensor:
        """x Wᵀ + b: the forward (an LM head's, as `Transformer.logits` calls it)."""
        return self(x)

    def extra_repr(self) -> str:
        kind = f"int{self.bits}" + ("" if self.signed else " unsigned")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"group_size={self.group_size}, offset={self.offset is not None}, bias={self.bias is not None}, "
                f"kernel={self.kernel}")  # fmt: skip


class QuantEmbedding(QuantLinear):
    """A token embedding whose (V, d) table is a `QuantLinear`'s weight: `forward(ids)` dequantizes the rows it
    looks up; `project(h)` is the tied LM head, h Wᵀ, computed as the layer computes it (`Transformer.logits`)."""

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.codes[ids]  # (..., d) codes, or (..., d / 2) packed bytes
        if self.bits == 4:
            rows = unpack_int4(rows.reshape(-1), rows.numel() * 2, signed=self.signed)
        q = rows.reshape(*ids.shape, -1, self.group_size).float()
        x = q * self.scale[ids][..., None]
        if self.offset is not None:
            x = x + self.offset[ids][..., None]
        return x.reshape(*ids.shape, self.in_features)

    def project(self, x: Tensor) -> Tensor:
        return super().forward(x)


def use_kernel(model: nn.Module, on: bool = True) -> int:
    """Run every `QuantLinear` of `model` that can through torch's int4 or int8 CPU kernel (`on`), or back through
    the exact dequantize path; returns how many layers run a kernel."""
    count = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_kernel(on and m.kernel_ready)
            count += m.kernel
    return count
