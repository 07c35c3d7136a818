"""GGML block (de)quantization, vectorized with numpy.

A quantized tensor is a flat run of *blocks*; each block packs `block_size` consecutive
weights of one row (rows are never split across blocks) into `type_size` bytes. All fields
are little-endian; `f16` is IEEE half precision, `d`/`dmin` are scales, `q` the small
integer codes. Element index `i` counts within the block.

Legacy blocks (32 weights):

| type | bytes | fields (in order)                              | weight `i`                                   |
|------|-------|------------------------------------------------|----------------------------------------------|
| Q4_0 | 18    | d:f16, qs:u8[16]                               | `d * (q - 8)`, q = 4-bit code                |
| Q4_1 | 20    | d:f16, m:f16, qs:u8[16]                        | `d * q + m`                                  |
| Q5_0 | 22    | d:f16, qh:u8[4], qs:u8[16]                     | `d * (q - 16)`, q = 4 low bits + 1 high bit  |
| Q5_1 | 24    | d:f16, m:f16, qh:u8[4], qs:u8[16]              | `d * q + m`                                  |
| Q8_0 | 34    | d:f16, qs:i8[32]                               | `d * qs[i]`                                  |

4-bit codes: `qs[j]` holds weight `j` in its low nibble and weight `j + 16` in its high
nibble. Q5: `qh` is a little-endian u32 whose bit `i` is bit 4 of weight `i`'s code.

K-quants (256 weights per super-block, split into sub-blocks with their own small scales):

| type | bytes | fields (in order)                                     | subs    | weight in sub-block `s`           |
|------|-------|-------------------------------------------------------|---------|-----------------------------------|
| Q2_K | 84    | scales:u8[16], qs:u8[64], d:f16, dmin:f16             | 16 × 16 | `(d * sc[s]) * q - (dmin * m[s])` |
| Q3_K | 110   | hmask:u8[32], qs:u8[64], scales:u8[12], d:f16         | 16 × 16 | `(d * (sc[s] - 32)) * q`          |
| Q4_K | 144   | d:f16, dmin:f16, scales:u8[12], qs:u8[128]            | 8 × 32  | `(d * sc[s]) * q - (dmin * m[s])` |
| Q5_K | 176   | d:f16, dmin:f16, scales:u8[12], qh:u8[32], qs:u8[128] | 8 × 32  | `(d * sc[s]) * q - (dmin * m[s])` |
| Q6_K | 210   | ql:u8[128], qh:u8[64], scales:i8[16], d:f16           | 16 × 16 | `(d * scales[s]) * (q - 32)`      |

- Q2_K: `scales[s]` = sc (low nibble) | m (high nibble). The block is two halves of 128
  weights; weight `128h + 32k + l` is bits `2k..2k+1` of `qs[32h + l]`.
- Q3_K: 2 low bits of `q` as in Q2_K; weight `32k + l` takes bit `k` of `hmask[l]`, and
  `q = low - 4` when that bit is 0 (`q = low` when it is 1). The 16 6-bit scales: low
  nibbles from `scales[0..7]` (low nibble -> sc[j], high nibble -> sc[j+8]); bits 4..5 of
  sc[i] are bits `2(i // 4)..` of `scales[8 + i % 4]`.
- Q4_K / Q5_K: 8 6-bit scales and mins in 12 bytes: for j < 4, `sc[j] = b[j] & 63`,
  `m[j] = b[j+4] & 63`; `sc[j+4] = (b[j+8] & 15) | ((b[j] >> 6) << 4)`,
  `m[j+4] = (b[j+8] >> 4) | ((b[j+4] >> 6) << 4)`. Weight `64c + 32n + l` is nibble `n` of
  `qs[32c + l]`; Q5_K adds bit `s` of `qh[l]` as bit 4 (s = sub-block index).
- Q6_K: halves of 128; weight `128h + 64n + l` (l < 64) has its 4 low bits in nibble `n`
  of `ql[64h + l]`; weight `128h + 32k + l` (l < 32) has its 2 high bits in bits `2k..2k+1`
  of `qh[32h + l]`.

Plain types: F32 (4 bytes), F16 (2), BF16 (2: the top 16 bits of an f32), and the
integer types I8/I16/I32/I64 and F64 (converted to f32 on dequantization).

The float arithmetic below is done in float32 in the same order as ggml's reference
(e.g. `(d * sc) * q - (dmin * m)`: two products then a difference), so results are
bit-identical to llama.cpp's `dequantize_row_*` and to `gguf.quants.dequantize`.

Quantizers (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K) follow `quantize_row_*_ref` in ggml-quants.c:

- Q8_0: `d = max|x| / 127`, `q = roundf(x / d)` (round half away from zero, via `x * (1/d)`).
- Q4_0: `d = x[argmax |x|] / -8` (signed; the first index on ties), `q = min(15, trunc(x * (1/d) + 8.5))`.
- Q4_1: `d = (max x - min x) / 15`, `m = min x`, `q = min(15, trunc((x - m) * (1/d) + 0.5))` (m in float32).
- Q5_0: `d = x[argmax |x|] / -16`, `q = min(31, trunc(x * (1/d) + 16.5))`.
- Q4_K: each 32-weight sub-block is fitted as `x ≈ s * q - m` (`make_qkx2_quants`, q in 0..15, m >= 0) under
  weights `w = sqrt(Σx²/32) + |x|`: with `lo = min(min x, 0)`, start from `q = nearest(15 (x - lo) / (max x - lo))`,
  `s = (max x - lo) / 15`; then for k = 0..20 code `q = clamp(nearest((14 + k/10) (x - lo) / (max x - lo)), 0, 15)`,
  solve the weighted least squares for (s, lo) (`lo > 0`: `lo = 0`, `s = Σwqx / Σwq²`) and keep it, as the new
  `lo` too, when `Σw (s q + lo - x)²` is lower. The super-block stores `d = f16(max s / 63)` and 6-bit
  `sc = min(63, nearest(63 s / max s))` (likewise `dmin` and `m` from the mins `-lo`), and each weight is coded
  again with them: `q = clamp(nearest((x + dmin * m) / (d * sc)), 0, 15)` (where `d * sc = 0` the fit's q stay).
  `nearest` is ggml's `nearest_int` (round half to even, from the bits of `v + 1.5·2^23`); sums run in C's order.
- F16: IEEE round-to-nearest-even; BF16: round-to-nearest-even with NaN kept quiet.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

QK = 32  # weights per legacy block
QK_K = 256  # weights per K-quant super-block


class GGMLType(IntEnum):
    """ggml tensor types (ids as stored in GGUF tensor infos; 4 and 5 are retired)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41

    @property
    def block_size(self) -> int:
        """Weights per block."""
        return BLOCK_SIZES[self][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return BLOCK_SIZES[self][1]

    @classmethod
    def parse(cls, value: GGMLType | str | int) -> GGMLType:
        """`GGMLType.Q4_0`, `"q4_0"`, `"Q4_0"` or `2` -> GGMLType.Q4_0."""
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"unknown ggml type {value!r}; known: {', '.join(t.name for t in cls)}") from None
        return cls(value)


# (weights per block, bytes per block), as ggml's type traits.
BLOCK_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1), GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 40),
    GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144), GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210), GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66), GGMLType.IQ2_XS: (256, 74), GGMLType.IQ3_XXS: (256, 98), GGMLType.IQ1_S: (256, 50),
    GGMLType.IQ4_NL: (32, 18), GGMLType.IQ3_S: (256, 110), GGMLType.IQ2_S: (256, 82), GGMLType.IQ4_XS: (256, 136),
    GGMLType.IQ1_M: (256, 56), GGMLType.TQ1_0: (256, 54), GGMLType.TQ2_0: (256, 66),
    GGMLType.MXFP4: (32, 17), GGMLType.NVFP4: (64, 36), GGMLType.Q1_0: (128, 18),
}  # fmt: skip

# Block layouts as numpy structured dtypes: `blocks.view(LAYOUT)["d"]` is the scale of every block.
_F16 = "<f2"
LAYOUTS: dict[GGMLType, np.dtype] = {
    GGMLType.Q4_0: np.dtype([("d", _F16), ("qs", "u1", 16)]),
    GGMLType.Q4_1: np.dtype([("d", _F16), ("m", _F16), ("qs", "u1", 16)]),
    GGMLType.Q5_0: np.dtype([("d", _F16), ("qh", "u1", 4), ("qs", "u1", 16)]),
    GGMLType.Q5_1: np.dtype([("d", _F16), ("m", _F16), ("qh", "u1", 4), ("qs", "u1", 16)]),
    GGMLType.Q8_0: np.dtype([("d", _F16), ("qs", "i1", 32)]),
    GGMLType.Q2_K: np.dtype([("scales", "u1", 16), ("qs", "u1", 64), ("d", _F16), ("dmin", _F16)]),
    GGMLType.Q3_K: np.dtype([("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", _F16)]),
    GGMLType.Q4_K: np.dtype([("d", _F16), ("dmin", _F16), ("scales", "u1", 12), ("qs", "u1", 128)]),
    GGMLType.Q5_K: np.dtype([("d", _F16), ("dmin", _F16), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)]),
    GGMLType.Q6_K: np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", _F16)]),
}
for _t, _dt in LAYOUTS.items():
    assert _dt.itemsize == BLOCK_SIZES[_t][1], _t

# Element types of the plain (block size 1) formats.
PLAIN_DTYPES: dict[GGMLType, np.dtype] = {
    GGMLType.F32: np.dtype("<f4"), GGMLType.F16: np.dtype("<f2"), GGMLType.BF16: np.dtype("<u2"),
    GGMLType.F64: np.dtype("<f8"), GGMLType.I8: np.dtype("i1"), GGMLType.I16: np.dtype("<i2"),
    GGMLType.I32: np.dtype("<i4"), GGMLType.I64: np.dtype("<i8"),
}  # fmt: skip

_F32 = np.float32
_SHIFT_2BIT = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
_SHIFT_1BIT = np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
_TARGET_CHUNK = 1 << 18  # weights per chunk (1 MiB of float32 output): bounds the temporaries


def _scale(field: np.ndarray) -> np.ndarray:
    """f16 field of every block -> float32 column (n, 1)."""
    return field.astype(_F32)[:, None]


# ---------------------------------------------------------------------------------------------
# Dequantization: each `_deq_*` takes a structured array of n blocks and fills out[n, block_size].
# ---------------------------------------------------------------------------------------------


def _nibbles_into(out: np.ndarray, qs: np.ndarray) -> None:
    """out[:, :16] = low nibbles, out[:, 16:] = high nibbles (as float32)."""
    out[:, :16] = qs & 0x0F
    out[:, 16:] = qs >> 4


def _deq_q4_0(b: np.ndarray, out: np.ndarray) -> None:
    _nibbles_into(out, b["qs"])
    out -= 8
    out *= _scale(b["d"])


def _deq_q4_1(b: np.ndarray, out: np.ndarray) -> None:
    _nibbles_into(out, b["qs"])
    out *= _scale(b["d"])
    out += _scale(b["m"])


def _q5_codes(b: np.ndarray) -> np.ndarray:
    """5-bit codes (n, 32) uint8: nibble from qs, bit 4 from the u32 qh."""
    qs = b["qs"]
    high = np.unpackbits(b["qh"], axis=1, bitorder="little") << 4  # bit i of qh -> weight i
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1) | high


def _deq_q5_0(b: np.ndarray, out: np.ndarray) -> None:
    out[:] = _q5_codes(b)
    out -= 16
    out *= _scale(b["d"])


def _deq_q5_1(b: np.ndarray, out: np.ndarray) -> None:
    out[:] = _q5_codes(b)
    out *= _scale(b["d"])
    out += _scale(b["m"])


def _deq_q8_0(b: np.ndarray, out: np.ndarray) -> None:
    out[:] = b["qs"]
    out *= _scale(b["d"])


def _two_bit_codes(qs: np.ndarray) -> np.ndarray:
    """qs (n, 64) -> 2-bit codes (n, 256): weight 128h + 32k + l = bits 2k.. of qs[32h + l]."""
    n = qs.shape[0]
    return ((qs.reshape(n, 2, 1, 32) >> _SHIFT_2BIT) & 3).reshape(n, QK_K)


def _deq_q2_k(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    sc = b["scales"]
    dl = _scale(b["d"]) * (sc & 0x0F).astype(_F32)  # (n, 16)
    ml = _scale(b["dmin"]) * (sc >> 4).astype(_F32)
    o = out.reshape(n, 16, 16)
    o[:] = _two_bit_codes(b["qs"]).reshape(n, 16, 16)
    o *= dl[:, :, None]
    o -= ml[:, :, None]


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """12 bytes -> 16 signed 6-bit scales (sc - 32) as float32."""
    n = s.shape[0]
    low = np.concatenate([s[:, :8] & 0x0F, s[:, :8] >> 4], axis=1)  # (n, 16)
    high = ((s[:, None, 8:12] >> _SHIFT_2BIT[0]) & 3).reshape(n, 16)  # sc[i] high bits: byte 8 + i%4, shift 2(i//4)
    return ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(_F32)


def _deq_q3_k(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    dl = _scale(b["d"]) * _q3_k_scales(b["scales"])  # (n, 16)
    low = _two_bit_codes(b["qs"]).view(np.int8)
    hbit = ((b["hmask"].reshape(n, 1, 1, 32) >> _SHIFT_1BIT) & 1).reshape(n, QK_K)  # weight 32k + l: bit k of hmask[l]
    q = low - ((hbit ^ 1) << 2).view(np.int8)
    o = out.reshape(n, 16, 16)
    o[:] = q.reshape(n, 16, 16)
    o *= dl[:, :, None]


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 6-bit scales and 8 6-bit mins (uint8)."""
    lo_s, lo_m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo_s & 63, (hi & 0x0F) | ((lo_s >> 6) << 4)], axis=1)
    mn = np.concatenate([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return sc, mn


def _four_bit_k_codes(qs: np.ndarray) -> np.ndarray:
    """qs (n, 128) -> codes (n, 8, 32): sub-block 2c + n_ = nibble n_ of qs[32c:32c+32]."""
    n = qs.shape[0]
    q = qs.reshape(n, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(n, 8, 32)


def _deq_k_affine(b: np.ndarray, out: np.ndarray, codes: np.ndarray) -> None:
    n = b.shape[0]
    sc, mn = _k_scales_mins(b["scales"])
    dl = _scale(b["d"]) * sc.astype(_F32)  # (n, 8)
    ml = _scale(b["dmin"]) * mn.astype(_F32)
    o = out.reshape(n, 8, 32)
    o[:] = codes
    o *= dl[:, :, None]
    o -= ml[:, :, None]


def _deq_q4_k(b: np.ndarray, out: np.ndarray) -> None:
    _deq_k_affine(b, out, _four_bit_k_codes(b["qs"]))


def _deq_q5_k(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    high = ((b["qh"].reshape(n, 1, 32) >> _SHIFT_1BIT[0]) & 1) << 4  # (n, 8, 32): sub-block s takes bit s of qh[l]
    _deq_k_affine(b, out, _four_bit_k_codes(b["qs"]) | high)


def _deq_q6_k(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    ql = b["ql"].reshape(n, 2, 1, 64)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, QK_K)  # 128h + 64n + l
    high = (b["qh"].reshape(n, 2, 1, 32) >> _SHIFT_2BIT) & 3  # 128h + 32k + l
    q = (low | (high.reshape(n, QK_K) << 4)).view(np.int8) - np.int8(32)
    dl = _scale(b["d"]) * b["scales"].astype(_F32)  # (n, 16)
    o = out.reshape(n, 16, 16)
    o[:] = q.reshape(n, 16, 16)
    o *= dl[:, :, None]


_DEQUANT = {
    GGMLType.Q4_0: _deq_q4_0, GGMLType.Q4_1: _deq_q4_1, GGMLType.Q5_0: _deq_q5_0, GGMLType.Q5_1: _deq_q5_1,
    GGMLType.Q8_0: _deq_q8_0, GGMLType.Q2_K: _deq_q2_k, GGMLType.Q3_K: _deq_q3_k, GGMLType.Q4_K: _deq_q4_k,
    GGMLType.Q5_K: _deq_q5_k, GGMLType.Q6_K: _deq_q6_k,
}  # fmt: skip

DEQUANTIZABLE = frozenset(_DEQUANT) | frozenset(PLAIN_DTYPES)


def _bytes_to_elements(shape: tuple[int, ...], qtype: GGMLType) -> tuple[int, ...]:
    bs, ts = BLOCK_SIZES[qtype]
    if not shape or shape[-1] % ts:
        raise ValueError(f"{qtype.name}: row of {shape[-1] if shape else 0} bytes is not a multiple of {ts}")
    return (*shape[:-1], shape[-1] // ts * bs)


def dequantize(data: np.ndarray, qtype: GGMLType | str, out: np.ndarray | None = None) -> np.ndarray:
    """Stored bytes (..., row_bytes) -> float32 weights (..., row_elements).

    `data` may be uint8 bytes of any shape whose last axis holds whole blocks, or (for the
    plain types) already-typed values, as `GGUFFile.raw` returns them. `out`, a C-contiguous
    float32 array with as many elements, receives the result (for block types this skips the
    allocation: fresh pages cost about as much as the dequantization itself).
    """
    qtype = GGMLType.parse(qtype)
    if qtype not in DEQUANTIZABLE:
        raise NotImplementedError(f"dequantization of {qtype.name} is not implemented")
    if qtype in PLAIN_DTYPES:
        dt = PLAIN_DTYPES[qtype]
        vals = data if data.dtype == dt else np.ascontiguousarray(data).view(np.uint8).view(dt)
        res = (vals.astype(np.uint32) << 16).view(_F32) if qtype == GGMLType.BF16 else vals.astype(_F32)
        if out is None:
            return res
        _check_out(out, res.size)[:] = res.reshape(-1)
        return out
    raw = np.ascontiguousarray(data).view(np.uint8)
    out_shape = _bytes_to_elements(raw.shape, qtype)
    bs = BLOCK_SIZES[qtype][0]
    blocks = raw.reshape(-1).view(LAYOUTS[qtype])
    if out is None:
        res = np.empty((blocks.shape[0], bs), dtype=_F32)
    else:
        res = _check_out(out, blocks.shape[0] * bs).reshape(-1, bs)
    step = max(1, _TARGET_CHUNK // bs)
    fn = _DEQUANT[qtype]
    with np.errstate(over="ignore", invalid="ignore"):  # random or corrupt scales may be inf/nan
        for start in range(0, blocks.shape[0], step):
            fn(blocks[start : start + step], res[start : start + step])
    return res.reshape(out_shape) if out is None else out


def _check_out(out: np.ndarray, size: int) -> np.ndarray:
    """A flat view of `out` after checking it can hold `size` float32 results in place."""
    if out.dtype != _F32 or not out.flags.c_contiguous or out.size != size:
        raise ValueError(f"out must be a C-contiguous float32 array of {size} elements")
    return out.reshape(-1)


# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C `roundf` (ties away from zero), exactly: sign(x) * (floor|x| + floor(2 * frac|x|)).

    `trunc(x + 0.5)` would be wrong: 0.49999997 + 0.5 rounds to 1.0 in float32.
    """
    a = np.abs(x)
    whole = np.floor(a)
    return np.sign(x) * (whole + np.floor(2 * (a - whole)))


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    return d.astype(np.float16)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d, and 0 where d == 0 (a block of zeros)."""
    safe = np.where(d == 0, _F32(1), d)
    return np.where(d == 0, _F32(0), _F32(1) / safe)


def _q_q8_0(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[0], dtype=LAYOUTS[GGMLType.Q8_0])
    d = np.abs(x).max(axis=1, keepdims=True) / _F32(127)
    out["qs"] = _round_half_away(x * _inverse(d)).astype(np.int8)
    out["d"] = _f16_bytes(d[:, 0])
    return out


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """The signed value of max |x| per block, (n, 1); the first index on ties."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)


def _q_q4_0(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[0], dtype=LAYOUTS[GGMLType.Q4_0])
    d = _signed_absmax(x) / _F32(-8)
    q = np.minimum(np.trunc(x * _inverse(d) + _F32(8.5)).astype(np.uint8), 15)
    out["qs"] = q[:, :16] | (q[:, 16:] << 4)
    out["d"] = _f16_bytes(d[:, 0])
    return out


def _q_q5_0(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[0], dtype=LAYOUTS[GGMLType.Q5_0])
    d = _signed_absmax(x) / _F32(-16)
    q = np.minimum(np.trunc(x * _inverse(d) + _F32(16.5)).astype(np.uint8), 31)
    out["qs"] = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    out["qh"] = np.packbits(q >> 4, axis=1, bitorder="little")  # bit i of the u32 = bit 4 of weight i
    out["d"] = _f16_bytes(d[:, 0])
    return out


def _q_q4_1(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[0], dtype=LAYOUTS[GGMLType.Q4_1])
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (hi - lo) / _F32(15)
    q = np.minimum(np.trunc((x - lo) * _inverse(d) + _F32(0.5)).astype(np.uint8), 15)
    out["qs"] = q[:, :16] | (q[:, 16:] << 4)
    out["d"], out["m"] = _f16_bytes(d[:, 0]), _f16_bytes(lo[:, 0])
    return out


# Q4_K: ggml's `make_qkx2_quants` and `quantize_row_q4_K_ref`. The sub-blocks lie in columns, (32, n): weight i of
# every sub-block is one contiguous row, so a C loop over i (its float32 sums, in their order) is a loop over rows.


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int`: the low 23 bits of the float32 v + 1.5·2^23, less 2^22 (round half to even for
    |v| < 2^22; what C computes for any other v, inf and nan included)."""
    return ((v + _F32(12582912)).view(np.int32) & 0x007FFFFF) - 0x00400000


def _ordered_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over the rows, first to last, as the C loop adds (np.sum may pair terms up, which rounds differently)."""
    total = terms[0].copy()
    for row in terms[1:]:
        total += row
    return total


def _affine_codes(iscale: np.ndarray, x: np.ndarray, lo: np.ndarray, nmax: int) -> np.ndarray:
    """clamp(nearest_int(iscale · (x - lo)), 0, nmax) as float32."""
    return np.clip(_nearest_int(iscale * (x - lo)), 0, nmax).astype(_F32)


def _weighted_error(w: np.ndarray, x: np.ndarray, scale: np.ndarray, lo: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """sum_i w_i (scale · q_i + lo - x_i)^2."""
    diff = scale * codes + lo - x
    return _ordered_sum(w * (diff * diff))


def _make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-blocks x, weights w (32, n) -> scale (n,), min (n,) and codes (32, n) with x ≈ scale · q - min.

    A trial fit replaces the best only when its error compares lower, so a nan scale or min is never kept."""
    lo, hi = np.minimum(x.min(axis=0), 0), x.max(axis=0)
    flat = hi == lo  # all weights equal lo: codes 0, scale 0
    sum_w, sum_x = _ordered_sum(w), _ordered_sum(w * x)
    iscale = _F32(nmax) / (hi - lo)
    scale = np.where(flat, _F32(0), _F32(1) / iscale)
    codes = np.where(flat, _F32(0), _affine_codes(iscale, x, lo, nmax))
    best = _weighted_error(w, x, scale, lo, codes)
    for step in range(nstep + 1):
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / (hi - lo)  # lo: the best fit so far
        trial = _affine_codes(iscale, x, lo, nmax)
        wq = w * trial
        sum_q, sum_q2, sum_xq = _ordered_sum(wq), _ordered_sum(wq * trial), _ordered_sum(wq * x)
        det = sum_w * sum_q2 - sum_q * sum_q
        trial_scale = (sum_w * sum_xq - sum_x * sum_q) / det
        trial_lo = (sum_q2 * sum_x - sum_q * sum_xq) / det
        positive = trial_lo > 0
        trial_scale = np.where(positive, sum_xq / sum_q2, trial_scale)
        trial_lo = np.where(positive, _F32(0), trial_lo)
        error = _weighted_error(w, x, trial_scale, trial_lo, trial)
        better = ~flat & (det > 0) & (error < best)
        codes, best = np.where(better, trial, codes), np.where(better, error, best)
        scale, lo = np.where(better, trial_scale, scale), np.where(better, trial_lo, lo)
    return scale, -lo, codes


def _six_bit(values: np.ndarray, top: np.ndarray) -> np.ndarray:
    """min(63, (uint8) nearest_int(63 / top · v)) per sub-block; 0 where top <= 0."""
    inv = np.where(top > 0, _F32(63) / top, _F32(0))[:, None]
    return np.minimum(_nearest_int(inv * values) & 0xFF, 63).astype(np.uint8)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 6-bit scales and mins (n, 8) -> 12 bytes: the inverse of `_k_scales_mins`."""
    low_sc = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    low_mn = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    return np.concatenate([low_sc, low_mn, (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], axis=1)


def _q_q4_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    out = np.empty(n, dtype=LAYOUTS[GGMLType.Q4_K])
    subs = np.ascontiguousarray(x.reshape(n * 8, 32).T)  # (32, 8n), sub-block 8b + s of super-block b
    av_x = np.sqrt(_ordered_sum(subs * subs) / _F32(32))
    scales, mins, codes = _make_qkx2_quants(subs, av_x + np.abs(subs), 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = np.maximum(scales.max(axis=1), 0), np.maximum(mins.max(axis=1), 0)
    sc, mn = _six_bit(scales, max_scale), _six_bit(mins, max_min)
    out["d"], out["dmin"] = _f16_bytes(max_scale / _F32(63)), _f16_bytes(max_min / _F32(63))
    out["scales"] = _pack_k_scales(sc, mn)
    sub_d = (_scale(out["d"]) * sc.astype(_F32)).reshape(-1)  # the stored scales, as the dequantization forms them
    sub_m = (_scale(out["dmin"]) * mn.astype(_F32)).reshape(-1)
    requantized = np.clip(_nearest_int((subs + sub_m) / sub_d), 0, 15).astype(_F32)
    codes = np.where(sub_d != 0, requantized, codes).astype(np.uint8)  # a zero scale keeps the fit's codes
    q = codes.T.reshape(n, 4, 2, 32)
    out["qs"] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return out


def _q_bf16(x: np.ndarray) -> np.ndarray:
    bits = x.view(np.uint32)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits.astype(np.uint64) + (0x7FFF + ((bits >> 16) & 1))) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16)


_QUANT = {
    GGMLType.Q8_0: _q_q8_0, GGMLType.Q4_0: _q_q4_0, GGMLType.Q4_1: _q_q4_1, GGMLType.Q5_0: _q_q5_0,
    GGMLType.Q4_K: _q_q4_k,
}  # fmt: skip
QUANTIZABLE = frozenset(_QUANT) | frozenset(PLAIN_DTYPES)


def quantize(x: np.ndarray, qtype: GGMLType | str) -> np.ndarray:
    """float weights (..., row) -> stored bytes (..., row_bytes) as uint8.

    The row length must be a multiple of the block size. Block formats need finite input.
    """
    qtype = GGMLType.parse(qtype)
    if qtype not in QUANTIZABLE:
        raise NotImplementedError(f"quantization to {qtype.name} is not implemented")
    x = np.asarray(x)
    shape = x.shape if x.ndim else (1,)
    if qtype in PLAIN_DTYPES:
        if qtype == GGMLType.BF16:
            vals = _q_bf16(np.ascontiguousarray(x, dtype=_F32))
        else:
            vals = np.ascontiguousarray(x, dtype=PLAIN_DTYPES[qtype])
            if qtype in (GGMLType.I8, GGMLType.I16, GGMLType.I32, GGMLType.I64) and not np.array_equal(vals, x):
                raise ValueError(f"values are not representable as {qtype.name}")
        return vals.reshape(shape).view(np.uint8).reshape(*shape[:-1], -1)
    bs, ts = BLOCK_SIZES[qtype]
    if shape[-1] % bs:
        raise ValueError(f"{qtype.name}: row length {shape[-1]} is not a multiple of the block size {bs}")
    flat = np.ascontiguousarray(x, dtype=_F32).reshape(-1, bs)
    if not np.isfinite(flat).all():
        raise ValueError(f"{qtype.name}: cannot quantize non-finite values")
    fn = _QUANT[qtype]
    out = np.empty(flat.shape[0], dtype=LAYOUTS[qtype])
    step = max(1, _TARGET_CHUNK // bs)
    # 1/d overflows for subnormal scales, and a zero range divides by zero: the results are ggml's
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for start in range(0, flat.shape[0], step):
            out[start : start + step] = fn(flat[start : start + step])
    return out.view(np.uint8).reshape(*shape[:-1], shape[-1] // bs * ts)


# ---------------------------------------------------------------------------------------------
# Affine blocks: the codes and per-group scale and offset a block format stores (w = s · q + m), for layers that
# keep the weights quantized (quant/weight_only.py). Each product is formed as `_deq_*` forms it, so s · q + m in
# float32 is the dequantization above, bit for bit.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AffineBlocks:
    """Rows of a block-quantized tensor as w[r, i] = scale[r, i // group_size] · codes[r, i] + offset[...]:
    codes (rows, cols) int8 (4-bit types: -8..7 when `signed`, else 0..15), or for 4-bit types with `packed`
    (rows, cols / 2) uint8 bytes in `quant.primitives.pack_int4`'s order (the first of each pair in the high nibble,
    a signed code as its two's-complement nibble); scale and offset (rows, cols / group_size) float32 (offset None:
    none)."""

    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None
    group_size: int
    bits: int
    signed: bool
    packed: bool = False


def _nibble_codes(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _paired_nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes (..., 16) whose low nibbles are codes 0..15 of a run of 32 and whose high nibbles are codes 16..31 (the
    Q4_0 / Q4_1 block, a Q4_K sub-block pair) -> those codes packed two per byte in order, the first of a pair in
    the high nibble (..., 16): bytes 0..7 from the low nibbles, 8..15 from the high ones."""
    even, odd = qs[..., 0::2], qs[..., 1::2]
    return np.concatenate([(even << 4) | (odd & 0x0F), (even & 0xF0) | (odd >> 4)], axis=-1)


def affine_blocks(data: np.ndarray, qtype: GGMLType | str, *, packed: bool = False) -> AffineBlocks:
    """The codes, scales and offsets of stored bytes (rows, row_bytes) of a Q8_0, Q5_0, Q4_0, Q4_1, Q4_K or Q6_K
    tensor; with `packed`, the 4-bit types' codes two per byte (`AffineBlocks`), straight from the blocks' nibbles."""
    qtype = GGMLType.parse(qtype)
    if qtype not in AFFINE:
        raise NotImplementedError(f"{qtype.name} is not kept quantized; supported: {', '.join(t.name for t in AFFINE)}")
    raw = np.ascontiguousarray(data).view(np.uint8)
    rows = raw.shape[0] if raw.ndim > 1 else 1
    b = raw.reshape(-1).view(LAYOUTS[qtype])
    packed = packed and qtype in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K)
    if qtype == GGMLType.Q8_0:
        codes, scale, offset, group, bits, signed = b["qs"], _scale(b["d"]), None, QK, 8, True
    elif qtype == GGMLType.Q4_0:  # code - 8: as a nibble, the code with its top bit flipped
        if packed:
            codes = _paired_nibbles(b["qs"]) ^ np.uint8(0x88)
        else:
            codes = _nibble_codes(b["qs"]).view(np.int8) - np.int8(8)
        scale, offset, group, bits, signed = _scale(b["d"]), None, QK, 4, True
    elif qtype == GGMLType.Q4_1:
        codes = _paired_nibbles(b["qs"]) if packed else _nibble_codes(b["qs"])
        scale, offset, group, bits, signed = _scale(b["d"]), _scale(b["m"]), QK, 4, False
    elif qtype == GGMLType.Q5_0:  # 5-bit codes held in 8 (Q4_K's fallback for rows that are not 256-multiples)
        codes, scale, offset = _q5_codes(b).view(np.int8) - np.int8(16), _scale(b["d"]), None
        group, bits, signed = QK, 8, True
    elif qtype == GGMLType.Q4_K:
        sc, mn = _k_scales_mins(b["scales"])
        codes = _paired_nibbles(b["qs"].reshape(-1, 4, 32)) if packed else _four_bit_k_codes(b["qs"])
        group, bits, signed = 32, 4, False
        scale, offset = _scale(b["d"]) * sc.astype(_F32), -(_scale(b["dmin"]) * mn.astype(_F32))
    else:  # Q6_K
        n = b.shape[0]
        ql = b["ql"].reshape(n, 2, 1, 64)
        low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, QK_K)
        high = ((b["qh"].reshape(n, 2, 1, 32) >> _SHIFT_2BIT) & 3).reshape(n, QK_K)
        codes = (low | (high << 4)).view(np.int8) - np.int8(32)
        scale, offset, group, bits, signed = _scale(b["d"]) * b["scales"].astype(_F32), None, 16, 8, True
    shaped = [None if t is None else np.ascontiguousarray(t).reshape(rows, -1) for t in (codes, scale, offset)]
    codes = shaped[0] if packed else shaped[0].astype(np.int8, copy=False)
    return AffineBlocks(codes, shaped[1], shaped[2], group, bits, signed, packed)


AFFINE = frozenset({GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K, GGMLType.Q6_K})
