"""Write a checkpoint one tensor at a time, holding none of it in memory.

Every output tensor's name, dtype and shape are known before the first one is merged, so the shards are planned up
front (consecutive tensors up to `shard_bytes` each: model-0000i-of-0000n.safetensors, or model.safetensors alone)
and each shard's safetensors header is written when the shard is opened:

    8 bytes little-endian N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}
    (space-padded to a multiple of 8, as the `safetensors` library pads it), then the tensors' raw bytes

after which each tensor's bytes are appended as it arrives (`add`). More than one shard gets
model.safetensors.index.json. The files are written into a directory that `atomic_directory` swaps in whole.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from typing import BinaryIO

import torch

from lmforge.io.hf import INDEX
from lmforge.io.safetensors_mmap import DTYPES
from lmforge.utils.atomic import atomic_write

CODES = {dtype: code for code, dtype in DTYPES.items()}
Spec = tuple[str, torch.dtype, tuple[int, ...]]  # name, dtype, shape


def shard_plan(sizes: Sequence[tuple[str, int]], shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into consecutive shards of at most `shard_bytes` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _nbytes(spec: Spec) -> int:
    return math.prod(spec[2]) * spec[1].itemsize


class ShardWriter:
    """Takes the tensors of `specs` in that order (`add`), streaming each into its shard file in `directory`."""

    def __init__(self, directory: os.PathLike, specs: Sequence[Spec], shard_bytes: int) -> None:
        self.directory = directory
        self.specs = {spec[0]: spec for spec in specs}
        self.shards = shard_plan([(s[0], _nbytes(s)) for s in specs], shard_bytes)
        n = len(self.shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)] if n > 1 else ["model.safetensors"]
        self._order = iter([(i, name) for i, names in enumerate(self.shards) for name in names])
        self._file: BinaryIO | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        shard, expected = next(self._order)
        _, dtype, shape = self.specs[expected]
        assert (name, tensor.dtype, tuple(tensor.shape)) == (expected, dtype, shape), f"unplanned tensor {name!r}"
        if self._file is None:
            self._file = self._open(shard)
        self._file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        if name == self.shards[shard][-1]:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _open(self, shard: int) -> BinaryIO:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in self.shards[shard]:
            _, dtype, shape = spec = self.specs[name]
            end = offset + _nbytes(spec)
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        f = open(os.path.join(self.directory, self.files[shard]), "wb")  # noqa: SIM115 (closed by `add` or `close`)
        f.write(struct.pack("<Q", len(raw)) + raw)
        return f

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:  # a merge that failed part-way: its directory is discarded
            self._file.close()

    def finish(self) -> None:
        """Write the index (for more than one shard) once every tensor is in."""
        assert next(self._order, None) is None and self._file is None, "not every planned tensor was written"
        if len(self.files) > 1:
            weight_map = {name: f for names, f in zip(self.shards, self.files, strict=True) for name in names}
            total = sum(_nbytes(s) for s in self.specs.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write(os.path.join(self.directory, INDEX), json.dumps(index, indent=2))
