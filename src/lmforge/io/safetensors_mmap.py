"""Zero-copy, memory-mapped reading of `.safetensors` files.

Layout: 8 bytes little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the raw little-endian tensor bytes (offsets relative to the end of the header).

Tensors returned here are views of a private (copy-on-write) memory map: nothing
is read until used, and loading a checkpoint costs no second copy of the weights.
No pickle is involved anywhere.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from lmforge.utils.errors import LmforgeError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class SafetensorsError(LmforgeError):
    pass


class SafetensorsFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = self.path.stat().st_size
            if size < 8:
                raise SafetensorsError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise SafetensorsError(f"{self.path}: header length {n} exceeds the file size {size}")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from None
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._infos = header
        self._size = size

    def keys(self) -> list[str]:
        return list(self._infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._infos[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = info["shape"]
        count = 1
        for s in shape:
            count *= s
        if end - begin != count * dtype.itemsize or self._start + end > self._size:
            raise SafetensorsError(f"{self.path}: tensor {name!r} data {begin}..{end} does not match shape {shape}")
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._start + begin)
        return flat.view(shape)
