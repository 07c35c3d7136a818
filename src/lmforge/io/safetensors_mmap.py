"""Zero-copy, memory-mapped reading of `.safetensors` files.

Layout: 8 bytes little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
then the raw little-endian tensor bytes (offsets relative to the end of the header).

The header is validated in full when the file is opened, as strictly as the `safetensors` library
does (and a little more): the header is at most 100 MB and a JSON object without duplicate names;
each entry has a known dtype, a shape of non-negative integers, and two data offsets with
`end - begin == prod(shape) * itemsize`; sorted by offset, the entries tile the data region exactly
(the first begins at 0, each begins where the previous ended, the last ends at the end of the file),
so no tensor overlaps another or reads header bytes. `__metadata__` maps strings to strings.
A file shorter than its header or data region says so ("truncated").
Stricter than `safetensors`: duplicate tensor names (it keeps the last one) are refused.

Tensors returned here are views of a private (copy-on-write) memory map: nothing
is read until used, and loading a checkpoint costs no second copy of the weights.
No pickle is involved anywhere.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path
from typing import Any

import torch

from lmforge.utils.errors import LmforgeError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000  # the cap `safetensors` itself applies


class SafetensorsError(LmforgeError):
    """A safetensors file is malformed; the message names the file and the tensor or field."""


def _is_count(x: Any) -> bool:
    """A non-negative JSON integer (JSON true/false are bools in Python, not counts)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: refuse a name given twice (which entry would win is the parser's accident)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise SafetensorsError(f"duplicate name {key!r}")
        out[key] = value
    return out


def _parse_header(raw: bytes, where: str) -> dict[str, Any]:
    """The header JSON as a dict; a SafetensorsError naming the file when it is not one JSON object."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_object)
    except SafetensorsError as e:
        raise SafetensorsError(f"{where}: header: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SafetensorsError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{where}: header must be a JSON object, got a {type(header).__name__}")
    return header


def _check_metadata(metadata: Any, where: str) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{where}: __metadata__ must map strings to strings, got {metadata!r:.100}")
    return metadata


def _check_entry(name: str, info: Any, where: str) -> tuple[int, int]:
    """One tensor entry's (begin, end), after checking its dtype, shape and offsets agree."""
    what = f"{where}: tensor {name!r}"
    if not isinstance(info, dict):
        raise SafetensorsError(f"{what}: entry must be an object with dtype, shape, data_offsets, got {info!r:.100}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise SafetensorsError(f"{what}: entry has no {key!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(f"{what}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise SafetensorsError(f"{what}: shape must be a list of non-negative integers, got {shape!r:.100}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise SafetensorsError(f"{what}: data_offsets must be two non-negative integers, got {offsets!r:.100}")
    begin, end = offsets
    if begin > end:
        raise SafetensorsError(f"{what}: data_offsets [{begin}, {end}] end before they begin")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise SafetensorsError(
            f"{what}: data_offsets [{begin}, {end}] hold {end - begin} bytes; shape {shape} of {dtype} needs {nbytes}"
        )
    return begin, end


def _check_layout(spans: dict[str, tuple[int, int]], data_size: int, where: str) -> None:
    """Sorted by offset, the tensors must tile [0, data_size) with no gap and no overlap."""
    pos, prev = 0, None
    for name, (begin, end) in sorted(spans.items(), key=lambda kv: kv[1]):
        if begin != pos:
            after = f"tensor {prev!r} ends at {pos}" if prev is not None else "the data region begins at 0"
            problem = "overlaps" if begin < pos else "leaves a gap after"
            raise SafetensorsError(
                f"{where}: tensor {name!r}: data_offsets [{begin}, {end}] {problem} the previous data ({after})"
            )
        pos, prev = end, name
    if pos > data_size:
        raise SafetensorsError(
            f"{where}: truncated: tensor {prev!r} ends at byte {pos} of the data region, the file holds {data_size}"
        )
    if pos < data_size:
        raise SafetensorsError(f"{where}: {data_size - pos} bytes after the last tensor (data ends at {pos})")


class SafetensorsFile:
    """A safetensors file, header validated at open, tensors memory-mapped until used."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        where = str(self.path)
        with open(self.path, "rb") as f:
            size = self.path.stat().st_size
            if size < 8:
                raise SafetensorsError(f"{where}: truncated: {size} bytes, not even the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise SafetensorsError(f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if n > size - 8:
                raise SafetensorsError(f"{where}: truncated: header length {n} exceeds the file size {size}")
            header = _parse_header(f.read(n), where)
            self.metadata = _check_metadata(header.pop("__metadata__", None), where)
            spans = {name: _check_entry(name, info, where) for name, info in header.items()}
            _check_layout(spans, size - 8 - n, where)
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
        self._start = 8 + n
        self._infos = header
        self._size = size

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def keys(self) -> list[str]:
        return list(self._infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the header (nothing is read)."""
        return {name: tuple(info["shape"]) for name, info in self._infos.items()}

    def _info(self, name: str) -> dict[str, Any]:
        if name not in self._infos:
            raise SafetensorsError(f"{self.path}: no tensor named {name!r}")
        return self._infos[name]

    def get(self, name: str) -> torch.Tensor:
        info = self._info(name)
        dtype, shape = DTYPES[info["dtype"]], info["shape"]
        count = math.prod(shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._start + info["data_offsets"][0])
        return flat.view(shape)
