"""Token shards: a corpus encoded once, stored as flat arrays that training memory-maps.

Layout of an output directory:
    shard_00000.npy, shard_00001.npy, ...   1-D arrays of token ids (uint16 when every id < 65536,
                                             else uint32), at most `shard_tokens` each; `np.load(path,
                                             mmap_mode="r")` maps one without reading it
    manifest.json                            {"format": "lmforge-shards/1", "dtype", "vocab_size",
                                             "eot_id", "total_tokens", "shards": [{"file", "tokens"}],
                                             "inputs": [{"file", "tokens"}], "tokenizer"}

Each input file is one document, followed by the end-of-text token when the tokenizer has one, so
loaders can respect document boundaries. Files are split into pieces at line boundaries and the
pieces are encoded in parallel on all cores; results are written in input order, so the output is
identical whatever the number of workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.io.atomic import atomic_path, atomic_write

PIECE_BYTES = 4 << 20
EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>")


def _pieces(path: Path, piece_bytes: int) -> Iterator[tuple[str, int, int]]:
    """(file, start, end) byte ranges that end at a newline (or the end of the file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(min(start + piece_bytes, size))
            f.readline()
            end = min(f.tell(), size)
            yield str(path), start, end
            start = end


_worker_tokenizer: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_piece(piece: tuple[str, int, int]) -> np.ndarray:
    path, start, end = piece
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte offset {start + e.start})") from None
    return np.asarray(_worker_tokenizer.encode_ordinary(text), dtype=np.uint32)


def eot_id(tokenizer: Any) -> int | None:
    """The end-of-text special token's id, if the tokenizer has one."""
    specials = getattr(tokenizer, "special_tokens", {}) or {}
    return next((specials[n] for n in EOT_NAMES if n in specials), None)


def write_shards(
    tokenizer: Any,
    inputs: Sequence[str | Path],
    out: str | Path,
    shard_tokens: int = 1 << 26,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode `inputs` into token shards under `out`; returns the manifest."""
    from tqdm import tqdm

    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    eot = eot_id(tokenizer)
    pieces = [piece for p in paths for piece in _pieces(p, PIECE_BYTES)]
    shards: list[dict[str, Any]] = []
    per_input: dict[str, int] = {str(p): 0 for p in paths}
    buffer: list[np.ndarray] = []
    buffered = 0

    def flush(final: bool) -> None:
        nonlocal buffer, buffered
        data = np.concatenate(buffer) if buffer else np.zeros(0, dtype)
        while len(data) >= shard_tokens or (final and len(data)):
            chunk, data = data[:shard_tokens], data[shard_tokens:]
            name = f"shard_{len(shards):05d}.npy"
            with atomic_path(out / name) as tmp, open(tmp, "wb") as f:
                np.save(f, chunk.astype(dtype))
            shards.append({"file": name, "tokens": len(chunk)})
        buffer, buffered = ([data] if len(data) else []), len(data)

    n_workers = workers or os.cpu_count() or 1
    bar = tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True, disable=not progress)
    with ProcessPoolExecutor(n_workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        for (path, start, end), ids in zip(pieces, pool.map(_encode_piece, pieces), strict=True):
            last_piece = end == Path(path).stat().st_size
            if last_piece and eot is not None:
                ids = np.append(ids, np.uint32(eot))
            buffer.append(ids)
            buffered += len(ids)
            per_input[path] += len(ids)
            bar.update(end - start)
            if buffered >= shard_tokens:
                flush(final=False)
    flush(final=True)
    bar.close()
    manifest = {
        "format": "lmforge-shards/1",
        "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": eot,
        "total_tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
        "inputs": [{"file": f, "tokens": n} for f, n in per_input.items()],
    }
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
