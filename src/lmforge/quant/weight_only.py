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
    int4 kernel  (G in 32..256, out a multiple of 16, CPU) torch's packed int4 CPU matmul
                 (`_weight_int4pack_mm_for_cpu`, the kernel gpt-fast and torchao use), which computes
                 Σ_i x_i (s' (q'_i - 8) + z') over nibbles q' in 0..15, activations and s', z' in bfloat16 (its
                 fast path), the result cast back. 4-bit codes are one plane of nibbles: q' = q + 8 (signed) or q,
                 z' = m (signed) or m + 8 s. 8-bit codes (Q8_0, Q5_0, int8 in groups) are two planes, the low and
                 the high nibble, q = 16 h + l (h = q >> 4, arithmetic), run as one product over 2 · in columns
                 with x repeated:
                     s q + m = s (l - 8) + (m + 8 s)  +  16 s (h' - 8) + z'_h,
                     h' = h + 8, z'_h = 0 (signed);  h' = h, z'_h = 128 s (unsigned)
                 so 16 s and 128 s round to bfloat16 as s does. The weight is repacked into the kernel's layout
                 once, and the codes are then dropped: the layout is a fixed permutation of the nibbles, which
                 `_kernel_nibble_order` finds by packing the bits of each position's index, in blocks of rows
                 (`_row_block_orders`), so an embedding reads its looked-up rows from it and every code comes back
                 exactly when saved, dequantized or switched off
    int8 kernel  (signed 8-bit, one scale per row: G = in, no offset, CPU) torch's int8 weight-only CPU matmul
                 (`_weight_int8pack_mm`): y_o = s_o Σ_i q_oi x_i, x and s in bfloat16 (its fast path: in float32
                 it runs ~10x slower than the exact path), the codes used as they are held

Scales and offsets are held in float16 when that holds every value exactly (a GGUF file's d and m fields), else
in float32; the dequantization computes in float32 either way.

`use_kernel(model)` switches every layer that can to a kernel (default: dequantize). A quantized token embedding
(`QuantEmbedding`, e.g. a GGUF file's Q8_0 table) dequantizes the rows it looks up, and as the tied LM head runs
the product as a `QuantLinear` (`project`), so a tied head never exists in float.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.infer.matvec import matvec
from lmforge.quant.primitives import QuantError, pack_int4, unpack_int4
from lmforge.utils.memory import release_freed_memory

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
        self.register_buffer("scale", _compact(scale))
        self.register_buffer("offset", None if offset is None else _compact(offset))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # a kernel's weight and (scales, zeros), derived (not saved): set by `use_kernel`; planes: nibble planes of
        # the int4 kernel's weight (1: 4-bit codes, 2: 8-bit codes), 0 for the int8 kernel
        self.register_buffer("kernel_weight", None, persistent=False)
        self.register_buffer("kernel_scales", None, persistent=False)
        self.kernel_planes = 0
        self.row_orders: tuple[Tensor | None, Tensor | None] | None = None  # `_row_block_orders`, with the kernel

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

    def stored_codes(self) -> Tensor:
        """The codes as `codes` holds them (8-bit, or 4-bit packed two per byte), recovered from the int4 kernel's
        layout when the kernel dropped them."""
        if self.codes is not None:
            return self.codes
        rows = torch.arange(self.out_features).split(_ROWS_AT_ONCE)
        codes = torch.cat([self.kernel_rows(r) for r in rows])
        return pack_int4(codes).view(self.out_features, -1) if self.bits == 4 else codes

    def kernel_rows(self, rows: Tensor) -> Tensor:
        """The codes (len(rows), in) of weight rows `rows` (int8 signed, uint8 unsigned), read from the int4 kernel's
        layout (`_row_block_orders`)."""
        cols = self.kernel_planes * self.in_features
        block, tail = self.row_orders  # set with the kernel, where its layout reads back (else codes are kept)
        full = self.out_features - (0 if tail is None else tail.shape[0])  # rows in whole blocks
        rows = rows.reshape(-1)
        start = (rows - rows % _ROW_BLOCK) * cols  # each block's first nibble
        if block is not None:
            at = start[:, None] + block[rows % _ROW_BLOCK].long()
        if tail is not None:
            in_tail = (rows >= full)[:, None]
            at_tail = full * cols + tail[(rows - full).clamp(0, tail.shape[0] - 1)].long()
            at = at_tail if block is None else torch.where(in_tail, at_tail, at)
        packed = self.kernel_weight.reshape(-1)[at >> 1]
        nibbles = (packed >> ((at & 1) * 4).to(torch.uint8)) & 0xF
        shift = 8 if self.signed else 0
        if self.bits == 4:
            return (nibbles.to(torch.int8) - shift) if self.signed else nibbles
        low, high = nibbles.to(torch.int16).split(self.in_features, dim=1)
        return (16 * (high - shift) + low).to(torch.int8 if self.signed else torch.uint8)

    def unpacked(self) -> Tensor:
        """The integer codes q (out, in): int8 (signed) or uint8 (unsigned)."""
        codes = self.stored_codes()
        if self.bits == 8:
            return codes
        flat = unpack_int4(codes.reshape(-1), self.out_features * self.in_features, signed=self.signed)
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
        return self.scale.device.type == "cpu" and (self._per_row_int8 or self._int4_tiles)

    @property
    def _per_row_int8(self) -> bool:  # the int8 kernel's form
        return self.bits == 8 and self.signed and self.offset is None and self.group_size == self.in_features

    @property
    def _int4_tiles(self) -> bool:  # the int4 kernel's group sizes and tiles
        return self.group_size in KERNEL_GROUPS and self.out_features % 16 == 0

    def nbytes(self) -> int:
        """Bytes of the quantized weight as held: codes (or the kernel's repacked ones in their place), scales and
        offsets; not the bias, nor a kernel's bfloat16 (scale, zero) pairs beside them (4 bytes a group and plane)."""
        codes = self.kernel_weight if self.codes is None else self.codes
        return sum(t.numel() * t.element_size() for t in (codes, self.scale, self.offset) if t is not None)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_weight is None:  # one row under torch.compile: multiply and sum, the dequantization fused
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return matvec(x, self.dequantize(x.dtype), bias)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.kernel_planes == 0:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.kernel_weight, self.kernel_scales)
        else:
            if self.kernel_planes == 2:  # the low and the high nibbles' columns take the same inputs
                rows = torch.cat([rows, rows], dim=-1)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.kernel_weight, self.group_size,
                                                           self.kernel_scales)  # fmt: skip
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @torch.no_grad()
    def set_kernel(self, on: bool) -> None:
        """Set up torch's int4 or int8 CPU kernel (`on`; the layer must be `kernel_ready`: the codes are repacked
        once, and dropped where the layout reads back, `_row_block_orders`) or drop it (the codes recovered)."""
        if not on:
            self.codes = self.stored_codes()
            self.kernel_weight = self.kernel_scales = self.row_orders = None
            self.kernel_planes = 0
            return
        if not self.kernel_ready:
            raise QuantError(f"the CPU kernels take codes in groups of {KERNEL_GROUPS} (out_features a multiple of "
                             f"16) or signed 8-bit codes with one scale per row, on the CPU; this layer is "
                             f"{self.extra_repr()}")  # fmt: skip
        if self.kernel:
            return
        if self._per_row_int8:
            self.kernel_weight, self.kernel_scales = self.codes, self.scale[:, 0].to(torch.bfloat16).contiguous()
            return
        q, s = self.unpacked(), self.scale.float()
        base = torch.zeros_like(s) if self.offset is None else self.offset.float()
        planes = 1 if self.bits == 4 else 2
        if self.bits == 4:  # one plane: q' = q + 8 (signed) or q
            scales, zeros = s, base if self.signed else base + 8 * s
        else:  # two planes, side by side: the low nibble, and the high one (q >> 4 is arithmetic)
            scales = torch.cat([s, 16 * s], dim=1)
            zeros = torch.cat([base + 8 * s, torch.zeros_like(s) if self.signed else 128 * s], dim=1)
        self.row_orders = _row_block_orders(self.out_features, planes * self.in_features)
        step = self.out_features if self.row_orders is None else _ROWS_AT_ONCE  # blocks of rows pack on their own
        packed = [self._pack_planes(q[i : i + step]) for i in range(0, self.out_features, step)]
        self.kernel_weight = packed[0] if len(packed) == 1 else torch.cat(packed)
        self.kernel_scales = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.kernel_planes = planes
        if self.row_orders is not None:
            self.codes = None

    def _pack_planes(self, q: Tensor) -> Tensor:
        """Rows of codes q (rows, in) as the int4 kernel's packed nibble planes (module docstring)."""
        if self.bits == 4:
            nibbles = q.to(torch.int32)
            if self.signed:
                nibbles += 8
        else:
            nibbles = torch.empty(q.shape[0], 2 * self.in_features, dtype=torch.int32)
            low, high = nibbles.split(self.in_features, dim=1)
            torch.bitwise_and(q, 15, out=low)
            torch.bitwise_right_shift(q, 4, out=high)
            if self.signed:
                high += 8
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.codes is None:  # dropped for the int4 kernel: saved as they were held
            destination[prefix + "codes"] = self.stored_codes()

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
        if self.codes is None:  # on the int4 kernel: the rows read from its layout
            rows = self.kernel_rows(ids)
        else:
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


def _compact(t: Tensor) -> Tensor:
    """`t` in float16 when that holds every value exactly, else in float32."""
    t = t.float().contiguous()
    half = t.half()
    return half if torch.equal(half.float(), t) else t


def _nibbles(packed: Tensor) -> Tensor:
    """The nibbles of uint8 bytes, flat: low then high of each byte."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1)


def _kernel_nibble_order(rows: int, cols: int) -> Tensor:
    """For each nibble of `_convert_weight_to_int4pack_for_cpu`'s (rows, cols) layout (`_nibbles` order), the flat
    index of the code it holds: bit b of every index, packed as a weight of 0s and 1s, lands where that code lands."""
    index = torch.arange(rows * cols, dtype=torch.int32)
    order = torch.zeros(rows * cols, dtype=torch.int32)
    for b in range(max(1, (rows * cols - 1).bit_length())):
        bit = ((index >> b) & 1).view(rows, cols)
        order |= _nibbles(torch.ops.aten._convert_weight_to_int4pack_for_cpu(bit, 1)).to(torch.int32) << b
    return order


_ROW_BLOCK = 64  # rows the kernel's layout tiles together (64 with AVX-512, 32 otherwise: both divide 64)
_ROWS_AT_ONCE = 4096  # rows packed / read back per step (a multiple of _ROW_BLOCK): small int32 buffers


@functools.lru_cache(maxsize=32)
def _row_block_orders(rows: int, cols: int) -> tuple[Tensor | None, Tensor | None] | None:
    """Where each code of a (rows, cols) weight sits in the int4 kernel's layout, as two small tables: for a block
    of `_ROW_BLOCK` rows, and for the last rows past the whole blocks (None when there are none), position[r, c] of
    code (r, c) among its block's nibbles. Checked on the layout of two blocks and the tail laid end to end (so the
    table of a block serves every block); None when the layout is not so (its codes are then kept)."""
    tail, blocks = rows % _ROW_BLOCK, min(rows // _ROW_BLOCK, 2)

    def inverse(n: int) -> Tensor:
        order = _kernel_nibble_order(n, cols)
        position = torch.empty_like(order)
        position[order.long()] = torch.arange(order.numel(), dtype=torch.int32)
        return position

    block = inverse(_ROW_BLOCK) if blocks else None
    end = inverse(tail) if tail else None
    parts = [block + i * _ROW_BLOCK * cols for i in range(blocks)]
    parts += [end + blocks * _ROW_BLOCK * cols] if tail else []
    if not torch.equal(inverse(blocks * _ROW_BLOCK + tail), torch.cat(parts)):
        return None
    return (None if block is None else block.view(_ROW_BLOCK, cols)), (None if end is None else end.view(tail, cols))


def use_kernel(model: nn.Module, on: bool = True) -> int:
    """Run every `QuantLinear` of `model` that can through torch's int4 or int8 CPU kernel (`on`), or back through
    the exact dequantize path; returns how many layers run a kernel."""
    count = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_kernel(on and m.kernel_ready)
            count += m.kernel
    release_freed_memory()  # the repacking's buffers, freed between the kept ones
    return count
