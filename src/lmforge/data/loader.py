"""Pre-training data: memory-mapped token shards, a train/validation split, and packed batch loaders.

Corpus. `TokenDataset(directory)` opens a `write_shards` output (see `lmforge.data.shards`) and maps every
shard with `np.load(mmap_mode="r")`: pages are read when a batch touches them, never whole shards. The shards,
concatenated, are one stream x_0 .. x_{N-1}. Documents are the manifest's "inputs" (one per encoded file) in
order, so document j is x[o_j : o_{j+1}] with o_j = n_0 + ... + n_{j-1}, n_i = inputs[i]["tokens"]. Those
counts define the boundaries, not eot positions: they exist whether or not the tokenizer has an end-of-text
token; when it has one (`eot_id`), opening checks that every document ends with it.

Split. `dataset.split(val_fraction=f)` assigns whole documents, in stream order, by error diffusion: with
T_j = n_0 + ... + n_j and V_{j-1} the validation tokens before document j,

    document j -> validation  iff  V_{j-1} + n_j / 2 < f T_j

(take it when that brings V closer to f T_j than leaving it out). By induction |V_j - f T_j| <= max_i n_i / 2
at every prefix, so validation holds about a fraction f of the tokens, spread over the corpus rather than
its tail, and appending documents never moves earlier ones. When that puts no document on one side (a single
document, or a few large ones) the stream is cut by tokens instead: train = x[:c], val = x[c:], with
c = N - max(1, round(f N)); the document holding c is split in two. Either way each token is in exactly
one split; f = 0 gives everything to train and an empty validation split.

Rows. A split is its own stream: its documents concatenated in stream order. A row is a window w of T + 1
consecutive tokens of it; input_ids = w[:-1], targets = w[1:]. Documents are packed (GPT-2 / nanoGPT): a
window may hold the end of one document and the start of the next. Boundary policy:

  * the target w[t+1] is ignored (-100, `IGNORE_INDEX`) when it starts a document and w[t] is not the eot
    token, i.e. when two documents touch with no separator (a tokenizer without an eot id, or the token cut
    of a split). After an eot the next document's first token is an ordinary target: the eot is the
    separator the model conditions on, and predicting the eot teaches it to end documents;
  * doc_ids (B, T) number the documents of a row from 0, and position_ids (B, T) count from the later of
    the row start and the token's document start. A model that masks attention to doc_ids[q] == doc_ids[k]
    and takes position_ids sees each document alone (the eot, last token of its document, still predicts
    the next document's first token); one that ignores both trains exactly like nanoGPT on packed rows.

Random windows (`RandomWindowLoader`, training). Row i of the global batch at step s starts at

    u(s, i) = h(seed, s, i) mod (n - T),   h(a, b, c) = m(m(m(a) ^ b) ^ c),   m = splitmix64,

uniform over the n - T windows of the split's n tokens. It is a pure function of (seed, step, row): a
resumed run, another process or another world size sees exactly the same global batches.

Sequential rows (`SequentialLoader`, validation / epochs). Row k of an epoch starts at k T, so consecutive
rows share one token and every target position 1 .. n-1 appears exactly once per epoch: R = ceil((n-1)/T)
rows, S = ceil(R / B) steps per epoch; step s holds rows (s mod S) B + i. Positions past the end are padding
(eot, or 0, with target -100). Row k is computed from k directly, so any step is random access.

Data parallel. `batch_size` B is the global batch; rank r of W gets rows [r B/W, (r+1) B/W), so the ranks'
batches concatenated in rank order equal the one-process batch. Every batch is a dict of (B/W, T) int64
tensors: input_ids, targets, position_ids, doc_ids.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100
DTYPES = ("uint16", "uint32")


def _field(manifest: dict, name: str, where: Path) -> Any:
    if name not in manifest:
        raise ValueError(f"{where}: missing field {name!r}")
    return manifest[name]


def _load_shard(path: Path, tokens: int, dtype: str) -> np.memmap:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard listed in manifest.json is missing")
    try:
        array = np.load(path, mmap_mode="r")
    except Exception as e:  # truncated or not an .npy file
        raise ValueError(f"{path}: not a readable .npy shard ({e})") from e
    if array.ndim != 1 or array.dtype != np.dtype(dtype):
        raise ValueError(f"{path}: expected a 1-D {dtype} array (manifest 'dtype'), got {array.ndim}-D {array.dtype}")
    if len(array) != tokens:
        raise ValueError(f"{path}: {len(array)} tokens, manifest.json says {tokens}")
    return array


class TokenDataset:
    """The shards of a `write_shards` directory as one memory-mapped token stream with document boundaries."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        where = self.directory / "manifest.json"
        if not where.is_file():
            raise FileNotFoundError(f"{where}: no such file (write shards with `lmforge tokenizer encode`)")
        try:
            manifest = json.loads(where.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(manifest, dict):
            raise ValueError(f"{where}: expected a JSON object")
        self.manifest = manifest
        dtype = _field(manifest, "dtype", where)
        if dtype not in DTYPES:
            raise ValueError(f"{where}: field 'dtype' is {dtype!r}, expected one of {DTYPES}")
        self.eot_id: int | None = manifest.get("eot_id")
        self.vocab_size: int | None = manifest.get("vocab_size")
        try:
            shards = [(str(s["file"]), int(s["tokens"])) for s in _field(manifest, "shards", where)]
            docs = [int(d["tokens"]) for d in _field(manifest, "inputs", where)]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: 'shards' and 'inputs' must be lists of {{'file', 'tokens'}} ({e})") from e
        self.shards = [_load_shard(self.directory / name, tokens, dtype) for name, tokens in shards]
        self.shard_offsets = np.cumsum([0, *(len(s) for s in self.shards)], dtype=np.int64)
        self.n_tokens = int(self.shard_offsets[-1])
        if manifest.get("total_tokens", self.n_tokens) != self.n_tokens:
            raise ValueError(f"{where}: 'total_tokens' is {manifest['total_tokens']}, the shards hold {self.n_tokens}")
        if sum(docs) != self.n_tokens:
            raise ValueError(f"{where}: 'inputs' count {sum(docs)} tokens, the shards hold {self.n_tokens}")
        self.doc_offsets = np.cumsum([0, *docs], dtype=np.int64)  # document j = stream[o_j : o_{j+1}]
        ends = self.doc_offsets[1:][np.array(docs) > 0] - 1
        if self.eot_id is not None and len(ends) and not (self.take(ends) == self.eot_id).all():
            raise ValueError(f"{where}: some document of 'inputs' does not end with eot_id {self.eot_id}")

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Tokens at the given stream positions (any shape), as int64; reads only the pages they touch."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n_tokens):
            raise IndexError(f"stream positions must lie in [0, {self.n_tokens})")
        shard = np.searchsorted(self.shard_offsets, positions, side="right") - 1
        out = np.empty(positions.shape, dtype=np.int64)
        for s in np.unique(shard):
            at = shard == s
            out[at] = self.shards[s][positions[at] - self.shard_offsets[s]]
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        """Stream tokens [start, stop) as int64."""
        return self.take(np.arange(start, stop))

    def document(self, j: int) -> np.ndarray:
        """Tokens of document j (the encoding of input file j, then eot when the tokenizer has one)."""
        return self.read(int(self.doc_offsets[j]), int(self.doc_offsets[j + 1]))

    def split(self, val_fraction: float = 0.1) -> tuple[Split, Split]:
        """(train, validation): whole documents by error diffusion, or a token cut (see the module docstring)."""
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        starts, sizes = self.doc_offsets[:-1], np.diff(self.doc_offsets)
        to_val = np.zeros(len(sizes), dtype=bool)
        val_tokens, total = 0, 0
        for j, n in enumerate(sizes.tolist()):
            total += n
            if val_tokens + n / 2 < val_fraction * total:
                to_val[j], val_tokens = True, val_tokens + n
        if val_fraction > 0 and (not to_val.any() or to_val.all()):
            if self.n_tokens < 2:
                raise ValueError(f"{self.directory}: {self.n_tokens} tokens cannot be split")
            cut = self.n_tokens - max(1, round(val_fraction * self.n_tokens))
            j = int(np.searchsorted(self.doc_offsets, cut, side="right")) - 1  # the document holding the cut
            starts = np.concatenate([starts[:j], [starts[j], cut], starts[j + 1 :]])
            sizes = np.concatenate([sizes[:j], [cut - starts[j], self.doc_offsets[j + 1] - cut], sizes[j + 1 :]])
            to_val = np.arange(len(sizes)) > j
        return Split(self, starts[~to_val], sizes[~to_val], "train"), Split(self, starts[to_val], sizes[to_val], "val")

    def whole(self) -> Split:
        """The whole corpus as one split."""
        return Split(self, self.doc_offsets[:-1], np.diff(self.doc_offsets), "all")


class Split:
    """Some documents of a `TokenDataset`, concatenated in stream order: positions 0 .. n-1 of their own."""

    def __init__(self, dataset: TokenDataset, starts: np.ndarray, sizes: np.ndarray, name: str) -> None:
        keep = np.asarray(sizes) > 0
        self.dataset, self.name = dataset, name
        self.stream_starts = np.asarray(starts, dtype=np.int64)[keep]  # stream offset of each document
        self.doc_bounds = np.cumsum([0, *np.asarray(sizes)[keep]], dtype=np.int64)  # split offsets, then n
        self.n_tokens = int(self.doc_bounds[-1])

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def spans(self) -> list[tuple[int, int]]:
        """The stream ranges [start, stop) this split holds, one per document (piece)."""
        ends = self.stream_starts + np.diff(self.doc_bounds)
        return list(zip(self.stream_starts.tolist(), ends.tolist(), strict=True))

    def doc_index(self, positions: np.ndarray) -> np.ndarray:
        """Index of the document holding each split position; len(docs) for positions >= n."""
        return np.searchsorted(self.doc_bounds, positions, side="right") - 1

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Tokens at split positions (any shape, each in [0, n)), as int64."""
        d = self.doc_index(positions)
        return self.dataset.take(self.stream_starts[d] + positions - self.doc_bounds[d])

    def windows(self, row_starts: np.ndarray, seq_len: int) -> dict[str, torch.Tensor]:
        """Rows of seq_len + 1 tokens from each start, under the boundary policy; positions >= n are padding."""
        window = np.asarray(row_starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1)
        real = window < self.n_tokens
        eot = self.dataset.eot_id
        tokens = np.where(real, self.take(np.minimum(window, self.n_tokens - 1)), 0 if eot is None else eot)
        doc = self.doc_index(window)  # padding is one more "document", len(docs)
        inputs, targets = tokens[:, :-1], tokens[:, 1:].copy()
        unseparated = doc[:, 1:] != doc[:, :-1]  # target starts a document...
        if eot is not None:
            unseparated &= inputs != eot  # ...and no eot precedes it
        targets[unseparated | ~real[:, 1:]] = IGNORE_INDEX
        first = np.maximum(self.doc_bounds[doc[:, :-1]], window[:, :1])  # later of row start and document start
        return {
            "input_ids": torch.from_numpy(inputs.copy()),
            "targets": torch.from_numpy(targets),
            "position_ids": torch.from_numpy(window[:, :-1] - first),
            "doc_ids": torch.from_numpy(doc[:, :-1] - doc[:, :1]),
        }


class _Loader:
    """Batches as a pure function of the step: `batch(step)` and `batches(start, stop)` share it."""

    def __init__(self, split: Split, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must split evenly over world_size {world_size} (rank {rank})")
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        per_rank = batch_size // world_size
        self.global_rows = np.arange(rank * per_rank, (rank + 1) * per_rank, dtype=np.int64)  # this rank's global rows

    def row_starts(self, step: int) -> np.ndarray:
        raise NotImplementedError

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's slice of the global batch at `step`: (batch_size / world_size, seq_len) int64 tensors."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.split.windows(self.row_starts(step), self.seq_len)

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """batch(start), batch(start + 1), ... up to `stop` (forever when None)."""
        steps = itertools.count(start) if stop is None else range(start, stop)
        return (self.batch(s) for s in steps)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele et al.'s SplitMix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def window_hash(seed: int, step: int, rows: np.ndarray) -> np.ndarray:
    """h(seed, step, row) = m(m(m(seed) ^ step) ^ row) as uint64, m = splitmix64."""
    key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64)) ^ np.uint64(step & _MASK64)
    return _splitmix64(_splitmix64(key) ^ np.asarray(rows, dtype=np.uint64))


class RandomWindowLoader(_Loader):
    """Windows at uniform random starts, a pure function of (seed, step, row): for training."""

    def __init__(
        self, split: Split, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__(split, batch_size, seq_len, rank, world_size)
        if len(split) < seq_len + 1:
            raise ValueError(f"{split.name} split has {len(split)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.seed = seed

    def row_starts(self, step: int) -> np.ndarray:
        n_windows = np.uint64(len(self.split) - self.seq_len)
        return (window_hash(self.seed, step, self.global_rows) % n_windows).astype(np.int64)


class SequentialLoader(_Loader):
    """Rows in stream order, each target once per epoch, the last batch padded: for validation and epochs."""

    def __init__(self, split: Split, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(split, batch_size, seq_len, rank, world_size)
        if len(split) < 2:
            raise ValueError(f"{split.name} split has {len(split)} tokens, at least 2 are needed")
        self.rows_per_epoch = -(-(len(split) - 1) // seq_len)
        self.steps_per_epoch = -(-self.rows_per_epoch // batch_size)

    def row_starts(self, step: int) -> np.ndarray:
        return ((step % self.steps_per_epoch) * self.batch_size + self.global_rows) * self.seq_len
