"""Token shards: a corpus encoded once, stored as flat arrays that training memory-maps.

Layout of an output directory:
    shard_00000.npy, shard_00001.npy, ...   1-D arrays of token ids (uint16 when every id < 65536,
                                             else uint32), at most `shard_tokens` each; `np.load(path,
                                             mmap_mode="r")` maps one without reading it
    manifest.json                            {"format": "lmforge-shards/1", "dtype", "vocab_size",
                                             "eot_id", "total_tokens", "shards": [{"file", "tokens"}],
                                             "inputs": [{"file", "tokens"}]}

Each input file is one document, followed by the end-of-text token when the tokenizer has one, so
loaders can respect document boundaries. Files are cut into work units of about `unit_chars`
characters at word ends (where pre-tokenization cannot change, see `lmforge.tokenizer.pretokenize`),
so the ids equal `encode_ordinary(file text)` exactly; units are encoded in parallel with a bounded
number in flight, and written in input order, so the output does not depend on the worker count.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.tokenizer.pretokenize import iter_pieces, read_chunks
from lmforge.utils.atomic import atomic_path, atomic_write
from lmforge.utils.errors import LmforgeError
from lmforge.utils.pool import cpu_count, pool_context

UNIT_CHARS = 1 << 22
EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>")


def text_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files named by `paths`, a directory standing for its *.txt files (sorted); FileNotFoundError naming a
    path that does not exist, LmforgeError when no file is found."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.txt")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    if not files:
        named = ", ".join(map(str, paths)) or "no paths"
        raise LmforgeError(f"no input text files in {named} (a directory gives its *.txt files)")
    return files


def _units(path: Path, unit_chars: int) -> Iterator[tuple[str, bool]]:
    """(text, is_last) work units of one file, cut at word ends."""
    batch: list[str] = []
    size = 0
    for piece, _ in iter_pieces(read_chunks(path), None):
        batch.append(piece)
        size += len(piece)
        if size >= unit_chars:
            yield "".join(batch), False
            batch, size = [], 0
    yield "".join(batch), True


_worker_tokenizer: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode(text: str) -> np.ndarray:
    return np.asarray(_worker_tokenizer.encode_ordinary(text), dtype=np.uint32)


def eot_id(tokenizer: Any) -> int | None:
    """The end-of-text special token's id, if the tokenizer has one."""
    specials = getattr(tokenizer, "special_tokens", {}) or {}
    return next((specials[n] for n in EOT_NAMES if n in specials), None)


class _ShardWriter:
    def __init__(self, out: Path, shard_tokens: int, dtype: type) -> None:
        self.out, self.shard_tokens, self.dtype = out, shard_tokens, dtype
        self.shards: list[dict[str, Any]] = []
        self.buffer: list[np.ndarray] = []
        self.buffered = 0

    def add(self, ids: np.ndarray) -> None:
        self.buffer.append(ids)
        self.buffered += len(ids)
        if self.buffered >= self.shard_tokens:
            self.flush(final=False)

    def flush(self, final: bool) -> None:
        data = np.concatenate(self.buffer) if self.buffer else np.zeros(0, self.dtype)
        while len(data) >= self.shard_tokens or (final and len(data)):
            chunk, data = data[: self.shard_tokens], data[self.shard_tokens :]
            name = f"shard_{len(self.shards):05d}.npy"
            with atomic_path(self.out / name) as tmp, open(tmp, "wb") as f:
                np.save(f, chunk.astype(self.dtype))
            self.shards.append({"file": name, "tokens": len(chunk)})
        self.buffer, self.buffered = ([data] if len(data) else []), len(data)


def write_shards(
    tokenizer: Any,
    inputs: Sequence[str | Path],
    out: str | Path,
    shard_tokens: int = 1 << 26,
    workers: int | None = None,
    progress: bool = True,
    unit_chars: int = UNIT_CHARS,
) -> dict[str, Any]:
    """Encode `inputs` into token shards under `out`; returns the manifest."""
    from tqdm import tqdm

    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, shard_tokens, np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    eot = eot_id(tokenizer)
    per_input = [{"file": str(p), "tokens": 0} for p in paths]
    n_workers = workers or cpu_count()
    bar = tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True, disable=not progress)
    pending: deque[tuple[int, int, bool, Future]] = deque()

    def finish_one() -> None:
        index, n_bytes, is_last, future = pending.popleft()
        ids = future.result()
        if is_last and eot is not None:
            ids = np.append(ids, np.uint32(eot))
        writer.add(ids)
        per_input[index]["tokens"] += len(ids)
        bar.update(n_bytes)

    workers_of = {"mp_context": pool_context(), "initializer": _init_worker, "initargs": (tokenizer,)}
    with ProcessPoolExecutor(n_workers, **workers_of) as pool:
        for index, path in enumerate(paths):
            for text, is_last in _units(path, unit_chars):
                pending.append((index, len(text.encode("utf-8")), is_last, pool.submit(_encode, text)))
                while len(pending) > 2 * n_workers:  # bounded memory: a few units in flight
                    finish_one()
        while pending:
            finish_one()
    writer.flush(final=True)
    bar.close()
    manifest = {
        "format": "lmforge-shards/1",
        "dtype": np.dtype(writer.dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": eot,
        "total_tokens": sum(s["tokens"] for s in writer.shards),
        "shards": writer.shards,
        "inputs": per_input,
    }
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
