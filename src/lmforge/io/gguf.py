"""GGUF files (the llama.cpp model format): a memory-mapped reader and an atomic writer.

Layout (all integers little-endian; GGUF versions 2 and 3 share it):

| field                | type                                                             |
|----------------------|------------------------------------------------------------------|
| magic                | 4 bytes `GGUF`                                                   |
| version              | u32: 2 or 3 (version 1 used u32 counts; not supported)           |
| n_tensors            | u64                                                              |
| n_kv                 | u64                                                              |
| metadata × n_kv      | key: string, value type: u32, value                              |
| tensor info × n      | name: string, n_dims: u32, ne: u64[n_dims], ggml type: u32, offset: u64 |
| padding              | zeros up to a multiple of `general.alignment` (default 32)       |
| data                 | each tensor at `offset` (a multiple of the alignment) from here  |

A string is a u64 byte length then UTF-8 bytes (no terminator); `ne[0]` is the fastest-varying dim.

Metadata value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool (1 byte), 8 string,
9 array (item type: u32, count: u64, items), 10 u64, 11 i64, 12 f64. Arrays may nest.

A tensor's ggml dims `ne` are reversed to get its PyTorch shape: `ne = [576, 49152]` is a
(49152, 576) matrix. The block formats and their dequantization live in `gguf_quants`.

The reader trusts nothing: every count, length, dimension and offset is checked against the
file size before anything is allocated or read, and any inconsistency is a `GGUFError` naming
the file and the field. Tensor data is memory-mapped copy-on-write: it is read only when a
tensor is used, and writing to a returned array or tensor never reaches the file.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import mmap
import operator
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.io.gguf_quants import (
    BLOCK_SIZES,
    DEQUANTIZABLE,
    PLAIN_DTYPES,
    QUANTIZABLE,
    GGMLType,
    dequantize,
    quantize,
)
from lmforge.utils.atomic import atomic_path
from lmforge.utils.errors import LmforgeError

__all__ = [
    "GGMLType",
    "GGUFError",
    "GGUFFile",
    "GGUFValue",
    "GGUFValueType",
    "TensorInfo",
    "write_gguf",
]

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME - 1: the longest tensor name llama.cpp accepts
MAX_ARRAY_NESTING = 8
INT64_MAX = 2**63 - 1


class GGUFError(LmforgeError):
    """A GGUF file is malformed; the message names the file and the offending field."""


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


V = GGUFValueType
# scalar value type -> numpy dtype (its itemsize is the stored size)
_SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    V.UINT8: np.dtype("u1"), V.INT8: np.dtype("i1"), V.UINT16: np.dtype("<u2"), V.INT16: np.dtype("<i2"),
    V.UINT32: np.dtype("<u4"), V.INT32: np.dtype("<i4"), V.FLOAT32: np.dtype("<f4"), V.BOOL: np.dtype("u1"),
    V.UINT64: np.dtype("<u8"), V.INT64: np.dtype("<i8"), V.FLOAT64: np.dtype("<f8"),
}  # fmt: skip
_STRUCT = dict(zip(_SCALAR_DTYPES, ["<B", "<b", "<H", "<h", "<I", "<i", "<f", "<B", "<Q", "<q", "<d"], strict=True))
assert all(struct.calcsize(_STRUCT[t]) == dt.itemsize for t, dt in _SCALAR_DTYPES.items())
_U64 = struct.Struct("<Q")
_INT_TYPES = {t for t, dt in _SCALAR_DTYPES.items() if dt.kind in "iu" and t != V.BOOL}
# smallest encoding of one item: a scalar's size, a string's length prefix, an array's type + count
_MIN_SIZE = {**{t: dt.itemsize for t, dt in _SCALAR_DTYPES.items()}, V.STRING: 8, V.ARRAY: 12}


@dataclass(frozen=True)
class GGUFValue:
    """A metadata value with an explicit GGUF type, e.g. `GGUFValue(7, GGUFValueType.UINT64)`.

    For arrays `type` is ARRAY and `item_type` the element type (inferred when None); items of
    an array of arrays may themselves be GGUFValues.
    """

    value: Any
    type: GGUFValueType
    item_type: GGUFValueType | None = None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order: ggml's ne reversed
    ggml_type: GGMLType
    offset: int  # from the start of the data section
    n_bytes: int
    file_offset: int  # from the start of the file

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def type_name(self) -> str:
        return self.ggml_type.name


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every failure names the field."""

    def __init__(self, buf: Any, size: int, path: str) -> None:
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}: {msg}")

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        if n > self.remaining:
            raise self.fail(what, f"needs {n} bytes at offset {self.pos} but the file ends at {self.size} (truncated?)")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, vtype: GGUFValueType, what: str) -> Any:
        start = self.take(_SCALAR_DTYPES[vtype].itemsize, what)
        (v,) = struct.unpack_from(_STRUCT[vtype], self.buf, start)
        return bool(v) if vtype == V.BOOL else v

    def u32(self, what: str) -> int:
        return self.scalar(V.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(V.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        if n > self.remaining:
            left = f"{self.remaining} bytes left of {self.size}"
            raise self.fail(what, f"string length {n} exceeds the file size ({left})")
        start = self.take(n, what)
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(what, f"string is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def _strings(self, count: int, what: str) -> list[str]:
        """`count` strings: the loop of `string` inlined (vocabularies hold ~1e5 of them); on any
        problem, `string` re-reads the offending item to raise its error."""
        buf, pos, end, out = self.buf, self.pos, self.size, []
        for i in range(count):
            n = _U64.unpack_from(buf, pos)[0] if end - pos >= 8 else end
            if n > end - pos - 8:
                self.pos = pos
                self.string(f"{what}[{i}]")
            try:
                out.append(str(buf[pos + 8 : pos + 8 + n], "utf-8"))
            except UnicodeDecodeError:
                self.pos = pos
                self.string(f"{what}[{i}]")
            pos += 8 + n
        self.pos = pos
        return out

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(what, f"unknown metadata value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> tuple[Any, Any]:
        """(python value, type spec): the spec is the GGUFValueType, or for arrays
        (ARRAY, item_type, [item specs] for arrays of arrays else None)."""
        if vtype in _SCALAR_DTYPES:
            return self.scalar(vtype, what), vtype
        if vtype == V.STRING:
            return self.string(what), vtype
        item_type = self.value_type(f"{what}: array item type")
        count = self.u64(f"{what}: array count")
        if count * _MIN_SIZE[item_type] > self.remaining:
            raise self.fail(
                what,
                f"array count {count} of {item_type.name.lower()} exceeds the file size "
                f"({self.remaining} bytes left of {self.size})",
            )
        if item_type in _SCALAR_DTYPES:
            dt = _SCALAR_DTYPES[item_type]
            start = self.take(count * dt.itemsize, what)
            items = np.frombuffer(self.buf, dtype=dt, count=count, offset=start) if count else np.empty(0, dt)
            return (items != 0 if item_type == V.BOOL else items).tolist(), (V.ARRAY, item_type, None)
        if item_type == V.STRING:
            return self._strings(count, what), (V.ARRAY, item_type, None)
        if depth + 1 >= MAX_ARRAY_NESTING:
            raise self.fail(what, f"arrays nested deeper than {MAX_ARRAY_NESTING} levels")
        pairs = [self.value(V.ARRAY, f"{what}[{i}]", depth + 1) for i in range(count)]
        return [v for v, _ in pairs], (V.ARRAY, item_type, [s for _, s in pairs])


def _spec_name(spec: Any) -> str:
    if isinstance(spec, GGUFValueType):
        return spec.name.lower()
    _, item_type, children = spec
    inner = _spec_name(children[0]) if children else item_type.name.lower()
    return f"array[{inner}]"


def _typed(value: Any, spec: Any) -> GGUFValue:
    if isinstance(spec, GGUFValueType):
        return GGUFValue(value, spec)
    _, item_type, children = spec
    if children is not None:
        value = [_typed(v, s) for v, s in zip(value, children, strict=True)]
    return GGUFValue(value, V.ARRAY, item_type)


class GGUFFile:
    """A parsed GGUF file whose tensor data stays memory-mapped until used.

    >>> f = GGUFFile("model.gguf")
    >>> f.metadata["general.architecture"], f.tensors["token_embd.weight"].shape
    >>> w = f.tensor("blk.0.attn_q.weight")            # dequantized, float32, PyTorch shape
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        name = str(path)
        with open(self.path, "rb") as fh:
            size = fh.seek(0, 2)
            if size == 0:
                raise GGUFError(f"{name}: header: the file is empty")
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        self.file_size = size
        try:
            self._parse(_Cursor(self._map, size, name))
        except BaseException:
            self.close()
            raise

    def _parse(self, c: _Cursor) -> None:
        start = c.take(4, "header: magic")
        magic = bytes(c.buf[start : start + 4])
        if magic != MAGIC:
            raise c.fail("header: magic", f"expected b'GGUF', found {magic!r} (not a GGUF file)")
        version = c.u32("header: version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in SUPPORTED_VERSIONS:
                raise c.fail("header: version", f"big-endian GGUF files are not supported (version {swapped})")
            raise c.fail("header: version", f"unsupported GGUF version {version} (supported: 2, 3)")
        self.version = version
        n_tensors = c.u64("header: n_tensors")
        n_kv = c.u64("header: n_kv")
        # every metadata entry takes >= 13 bytes (key length, type, 1-byte value); every tensor info >= 24
        if n_kv * 13 > c.remaining:
            raise c.fail("header: n_kv", f"{n_kv} metadata entries cannot fit in {c.remaining} bytes")
        if n_tensors * 24 > c.remaining:
            raise c.fail("header: n_tensors", f"{n_tensors} tensor infos cannot fit in {c.remaining} bytes")

        self.metadata: dict[str, Any] = {}
        self._specs: dict[str, Any] = {}
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}")
            what = f"metadata key #{i} ({key!r})"
            if key in self.metadata:
                raise c.fail(what, "duplicate key")
            vtype = c.value_type(f"{what}: value type")
            self.metadata[key], self._specs[key] = c.value(vtype, what)

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        spec = self._specs.get("general.alignment", V.UINT32)
        if (
            not isinstance(spec, GGUFValueType)
            or spec not in _INT_TYPES
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise c.fail("metadata 'general.alignment'", f"{alignment!r} is not a positive power of two")
        self.alignment = alignment

        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            tname = c.string(f"tensor info #{i}: name")
            what = f"tensor info #{i} ({tname!r})"
            if tname in names:
                raise c.fail(what, "duplicate tensor name")
            names.add(tname)
            n_dims = c.u32(f"{what}: n_dims")
            if n_dims > MAX_DIMS:
                raise c.fail(f"{what}: n_dims", f"{n_dims} dimensions (ggml allows at most {MAX_DIMS})")
            ne = [c.u64(f"{what}: dim {j}") for j in range(n_dims)]
            if any(n > INT64_MAX for n in ne) or math.prod(ne) > INT64_MAX:
                raise c.fail(f"{what}: dims", f"{ne} overflow int64")
            raw_type = c.u32(f"{what}: ggml type")
            try:
                gtype = GGMLType(raw_type)
            except ValueError:
                raise c.fail(f"{what}: ggml type", f"unknown ggml type {raw_type}") from None
            offset = c.u64(f"{what}: data offset")
            block, type_size = BLOCK_SIZES[gtype]
            row = ne[0] if ne else 1
            if row % block:
                msg = f"row length {row} is not a multiple of the {gtype.name} block size {block}"
                raise c.fail(f"{what}: dims", msg)
            if offset % alignment:
                raise c.fail(f"{what}: data offset", f"{offset} is not a multiple of the alignment {alignment}")
            n_bytes = math.prod(ne) // block * type_size
            infos.append((tname, tuple(reversed(ne)), gtype, offset, n_bytes, what))

        self.data_offset = -(-c.pos // alignment) * alignment
        data_size = max(0, self.file_size - self.data_offset)
        self.tensors: dict[str, TensorInfo] = {}
        for tname, shape, gtype, offset, n_bytes, what in infos:
            if offset + n_bytes > data_size:
                raise c.fail(
                    f"{what}: data",
                    f"bytes [{offset}, {offset + n_bytes}) of the data section extend past the end of the file "
                    f"(data section holds {data_size} bytes)",
                )
            self.tensors[tname] = TensorInfo(tname, shape, gtype, offset, n_bytes, self.data_offset + offset)
        placed = sorted((t for t in self.tensors.values() if t.n_bytes), key=lambda t: t.offset)
        for a, b in itertools.pairwise(placed):
            if a.offset + a.n_bytes > b.offset:
                raise c.fail(
                    f"tensor {b.name!r}: data offset",
                    f"bytes [{b.offset}, {b.offset + b.n_bytes}) overlap tensor {a.name!r} "
                    f"[{a.offset}, {a.offset + a.n_bytes})",
                )

    # -- metadata ------------------------------------------------------------------------------

    @property
    def metadata_types(self) -> dict[str, str]:
        """Key -> stored type, spelled like 'uint32', 'string', 'array[string]'."""
        return {k: _spec_name(s) for k, s in self._specs.items()}

    def typed_metadata(self) -> dict[str, GGUFValue]:
        """Metadata with its stored types, ready for `write_gguf` to reproduce exactly."""
        return {k: _typed(self.metadata[k], s) for k, s in self._specs.items()}

    # -- tensors -------------------------------------------------------------------------------

    def raw(self, name: str) -> np.ndarray:
        """A tensor's data as stored (a view of the map): typed values in the tensor's shape for
        F32/F16/F64/I8..I64, else uint8 bytes shaped (*shape[:-1], bytes per row), as
        `gguf.GGUFReader` gives them."""
        info = self.tensors[name]
        dt = PLAIN_DTYPES.get(info.ggml_type)
        if dt is not None and info.ggml_type != GGMLType.BF16:
            count, shape = info.n_elements, info.shape
        else:
            dt = np.dtype(np.uint8)
            count = info.n_bytes
            block, type_size = BLOCK_SIZES[info.ggml_type]
            row = info.shape[-1] if info.shape else 1
            shape = (*info.shape[:-1], row // block * type_size)
        if count == 0:
            return np.empty(shape, dtype=dt)
        return np.frombuffer(self._map, dtype=dt, count=count, offset=info.file_offset).reshape(shape)

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor dequantized to `dtype` in its PyTorch shape. Plain types already in `dtype`
        (F32 -> float32, F16 -> float16, ...) are zero-copy views of the map."""
        info = self.tensors[name]
        gtype = info.ggml_type
        if gtype not in DEQUANTIZABLE:
            raise GGUFError(f"{self.path}: tensor {name!r}: dequantization of {gtype.name} is not supported")
        if gtype in PLAIN_DTYPES:
            native = _TORCH_DTYPES[gtype]
            if info.n_elements == 0:
                return torch.empty(info.shape, dtype=dtype)
            if info.file_offset % native.itemsize == 0:
                t = torch.frombuffer(self._map, dtype=native, count=info.n_elements, offset=info.file_offset)
            else:  # only with alignments below the item size: copy to an aligned buffer
                t = torch.from_numpy(self.raw(name).copy()).view(-1).view(native)
            return t.view(info.shape).to(dtype)
        return torch.from_numpy(dequantize(self.raw(name), gtype)).reshape(info.shape).to(dtype)

    def close(self) -> None:
        """Unmap the file (a no-op while arrays or tensors returned by it are still alive)."""
        with contextlib.suppress(BufferError):  # views exported to numpy/torch keep it open until collected
            self._map.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        n_kv, n_t = len(self.metadata), len(self.tensors)
        return f"GGUFFile({str(self.path)!r}, version={self.version}, {n_kv} keys, {n_t} tensors)"


_TORCH_DTYPES = {
    GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16,
    GGMLType.F64: torch.float64, GGMLType.I8: torch.int8, GGMLType.I16: torch.int16,
    GGMLType.I32: torch.int32, GGMLType.I64: torch.int64,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

_INT_ORDER = (V.INT32, V.UINT32, V.INT64, V.UINT64)  # inferred for Python ints, first that fits
_NP_KIND_TYPES = {np.dtype(dt).newbyteorder("<"): t for t, dt in _SCALAR_DTYPES.items() if t != V.BOOL}


def _int_range(t: GGUFValueType) -> tuple[int, int]:
    info = np.iinfo(_SCALAR_DTYPES[t])
    return int(info.min), int(info.max)


def _int_type_for(lo: int, hi: int, what: str) -> GGUFValueType:
    for t in _INT_ORDER:
        tmin, tmax = _int_range(t)
        if tmin <= lo and hi <= tmax:
            return t
    raise ValueError(f"{what}: integer {hi if hi > 0 else lo} does not fit in 64 bits")


def _np_type(dtype: np.dtype, what: str) -> GGUFValueType:
    if dtype.kind == "b":
        return V.BOOL
    if dtype.kind == "U":
        return V.STRING
    if dtype == np.float16:
        return V.FLOAT32
    t = _NP_KIND_TYPES.get(dtype.newbyteorder("<"))
    if t is None:
        raise ValueError(f"{what}: numpy dtype {dtype} has no GGUF type")
    return t


def _infer(value: Any, what: str) -> GGUFValue:
    """Python/numpy value -> GGUFValue: bool -> BOOL, int -> INT32/UINT32/INT64/UINT64 (first
    that fits), float -> FLOAT32, str -> STRING, list/tuple/1-D array -> ARRAY."""
    if isinstance(value, GGUFValue):
        return value
    if isinstance(value, bool | np.bool_):
        return GGUFValue(bool(value), V.BOOL)
    if isinstance(value, np.generic):
        return GGUFValue(value.item(), _np_type(value.dtype, what))
    if isinstance(value, int):
        return GGUFValue(value, _int_type_for(value, value, what))
    if isinstance(value, float):
        return GGUFValue(value, V.FLOAT32)
    if isinstance(value, str):
        return GGUFValue(value, V.STRING)
    if isinstance(value, list | tuple | np.ndarray):
        return GGUFValue(value, V.ARRAY, _infer_item_type(value, what))
    raise ValueError(f"{what}: cannot store a {type(value).__name__} in GGUF metadata")


def _infer_item_type(items: Any, what: str) -> GGUFValueType:
    if isinstance(items, np.ndarray):
        if items.ndim != 1:
            raise ValueError(f"{what}: only 1-D arrays can be stored as metadata, got shape {items.shape}")
        return _np_type(items.dtype, what)
    if not items:
        return V.INT32
    kinds = set()
    for v in items:
        if isinstance(v, bool | np.bool_):
            kinds.add("bool")
        elif isinstance(v, int | np.integer):
            kinds.add("int")
        elif isinstance(v, float | np.floating):
            kinds.add("float")
        elif isinstance(v, str):
            kinds.add("str")
        elif isinstance(v, list | tuple | np.ndarray) or (isinstance(v, GGUFValue) and v.type == V.ARRAY):
            kinds.add("array")
        else:
            raise ValueError(f"{what}: cannot store a {type(v).__name__} in a GGUF array")
    if kinds == {"int"}:
        return _int_type_for(int(min(items)), int(max(items)), what)
    if kinds <= {"int", "float"}:
        return V.FLOAT32
    if len(kinds) > 1:
        raise ValueError(f"{what}: array mixes {sorted(kinds)}; use GGUFValue to choose a type")
    return {"bool": V.BOOL, "str": V.STRING, "array": V.ARRAY}[kinds.pop()]


def _encode_string(s: Any, what: str) -> bytes:
    if not isinstance(s, str):
        raise ValueError(f"{what}: expected a str, got {type(s).__name__}")
    try:
        b = s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what}: {e}") from None
    return struct.pack("<Q", len(b)) + b


def _scalar_array(items: Any, t: GGUFValueType, what: str) -> bytes:
    dt = _SCALAR_DTYPES[t]
    if t in _INT_TYPES:
        arr = items if isinstance(items, np.ndarray) and items.dtype.kind in "iu" else None
        if arr is None:
            try:
                ints = [operator.index(v) for v in items]
            except TypeError as e:
                raise ValueError(f"{what}: {t.name} array holds a non-integer ({e})") from None
            lo, hi = (min(ints), max(ints)) if ints else (0, 0)
        else:
            lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
            ints = arr
        tmin, tmax = _int_range(t)
        if lo < tmin or hi > tmax:
            raise ValueError(f"{what}: value {lo if lo < tmin else hi} out of range for {t.name}")
        return np.asarray(ints).astype(dt).tobytes() if len(ints) else b""
    if t == V.BOOL:
        return np.asarray([bool(v) for v in items], dtype=dt).tobytes()
    try:
        return np.asarray(items, dtype=dt).tobytes()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: {t.name} array: {e}") from None


def _encode_value(v: GGUFValue, what: str, depth: int = 0) -> bytes:
    """The bytes of a value (without its leading type tag)."""
    t = GGUFValueType(v.type)
    if t == V.STRING:
        return _encode_string(v.value, what)
    if t == V.ARRAY:
        items = v.value
        if not isinstance(items, list | tuple | np.ndarray):
            raise ValueError(f"{what}: ARRAY value must be a list, tuple or 1-D array")
        item_type = GGUFValueType(v.item_type) if v.item_type is not None else _infer_item_type(items, what)
        head = struct.pack("<IQ", item_type, len(items))
        if item_type == V.STRING:
            return head + b"".join(_encode_string(s, f"{what}[{i}]") for i, s in enumerate(items))
        if item_type == V.ARRAY:
            if depth + 1 >= MAX_ARRAY_NESTING:
                raise ValueError(f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING} levels")
            parts = []
            for i, s in enumerate(items):
                sub = s if isinstance(s, GGUFValue) else GGUFValue(s, V.ARRAY)
                if sub.type != V.ARRAY:
                    raise ValueError(f"{what}[{i}]: expected an array")
                parts.append(_encode_value(sub, f"{what}[{i}]", depth + 1))
            return head + b"".join(parts)
        return head + _scalar_array(items, item_type, what)
    return _scalar_array([v.value], t, what)


def _tensor_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def write_gguf(
    path: str | Path,
    metadata: Mapping[str, Any],
    tensors: Mapping[str, tuple[np.ndarray | torch.Tensor, GGMLType | str]],
    *,
    version: int = 3,
    alignment: int = DEFAULT_ALIGNMENT,
) -> None:
    """Write a GGUF file atomically.

    `metadata` values are typed by `_infer` (bool, int, float -> f32, str, lists) unless given
    as `GGUFValue`. `tensors` maps a name to (weights in PyTorch shape, ggml type); the weights
    are converted with `gguf_quants.quantize` (F32, F16, BF16, Q8_0, Q4_0, I8..I64, F64).
    """
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"GGUF version must be one of {SUPPORTED_VERSIONS}, got {version}")
    if alignment <= 0 or alignment & (alignment - 1) or alignment >= 2**32:
        raise ValueError(f"alignment must be a power of two below 2**32, got {alignment}")
    meta = dict(metadata)
    if "general.alignment" in meta:
        given = meta["general.alignment"]
        given = given.value if isinstance(given, GGUFValue) else given
        if given != alignment:
            raise ValueError(f"metadata general.alignment={given!r} disagrees with alignment={alignment}")
    elif alignment != DEFAULT_ALIGNMENT:
        meta["general.alignment"] = GGUFValue(alignment, V.UINT32)

    kv = []
    for key, value in meta.items():
        if not isinstance(key, str):
            raise ValueError(f"metadata key {key!r} is not a str")
        what = f"metadata {key!r}"
        typed = _infer(value, what)
        kv.append(_encode_string(key, what) + struct.pack("<I", typed.type) + _encode_value(typed, what))

    plan = []  # (array, ggml type, n_bytes) in file order
    infos = []
    offset = 0
    for name, (data, qtype) in tensors.items():
        gtype = GGMLType.parse(qtype)
        if gtype not in QUANTIZABLE:
            raise ValueError(f"tensor {name!r}: writing {gtype.name} is not supported")
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise ValueError(f"tensor {name!r}: name longer than {MAX_NAME_BYTES} bytes")
        arr = _tensor_numpy(data)
        if arr.ndim > MAX_DIMS:
            raise ValueError(f"tensor {name!r}: {arr.ndim} dims (GGUF allows at most {MAX_DIMS})")
        block, type_size = BLOCK_SIZES[gtype]
        if arr.ndim and arr.shape[-1] % block:
            raise ValueError(f"tensor {name!r}: last dim {arr.shape[-1]} is not a multiple of {gtype.name}'s {block}")
        ne = tuple(reversed(arr.shape))
        n_bytes = arr.size // block * type_size
        plan.append((arr, gtype, n_bytes))
        infos.append(
            _encode_string(name, f"tensor {name!r}") + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, gtype, offset)
        )
        offset += -(-n_bytes // alignment) * alignment

    header = b"".join([MAGIC, struct.pack("<IQQ", version, len(plan), len(kv)), *kv, *infos])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        f.write(b"\0" * (-len(header) % alignment))
        for arr, gtype, n_bytes in plan:
            data = quantize(arr, gtype) if arr.size else np.empty(0, np.uint8)
            assert data.nbytes == n_bytes, (data.nbytes, n_bytes)
            f.write(np.ascontiguousarray(data).data)
            f.write(b"\0" * (-n_bytes % alignment))
