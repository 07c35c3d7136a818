"""Tokenizer files against their reference readers: tiktoken, Hugging Face `tokenizers`, GPT-2 vocab.json/merges.txt.

Oracles: a tokenizer trained by `tokenizers` and loaded by lmforge must encode like `tokenizers`; a tokenizer written
by lmforge must encode identically when read back by `tokenizers.Tokenizer.from_file`, by `tiktoken.Encoding`
(through `tiktoken.load.load_tiktoken_bpe`) and by `tokenizers`' `BPE.from_file`.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken
import tokenizers
from tiktoken.load import load_tiktoken_bpe
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.tokenizer import CL100K_PATTERN, GPT2_PATTERN, LLAMA3_PATTERN, Tokenizer
from lmforge.tokenizer.formats import (
    bytes_to_unicode,
    load_hf_tokenizer,
    load_tokenizer,
    load_vocab_merges,
    save_hf_tokenizer,
    save_tiktoken,
    save_tokenizer,
    save_vocab_merges,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"
assert DATA.is_dir(), f"{DATA} not found: the tests need the shared Shakespeare data"

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAIN_FILES = ["hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt"]  # tempest and the sonnets are held out
HELD_OUT = (DATA / "tempest_gut.txt").read_text(encoding="utf-8")

ADVERSARIAL = [
    "",
    " ",
    "    ",
    "\n",
    "\n\n\n",
    "  \n  \n ",
    "\t",
    "\t\tindented\tcode\t\t",
    "a\r\nb\r\n\r\nc\r",
    "\r\r\n\n\r",
    "hello  world   again    ",
    " leading and trailing ",
    "👨\u200d👩\u200d👧\u200d👦 family, 🏳️\u200d🌈 flag, 👍🏽 thumbs 🤦🏼\u200d♂️",
    "日本語のテキストです。中文文本，繁體。한국어 텍스트",
    "e\u0301 a\u0300\u0316 Z\u0351\u034a\u0364\u0315alg\u0310o \u0301\u0301leading marks",
    "1234567890 3.14159 2024-01-01 1,000,000 ٣٤٥ ½",
    "don't I'LL we've they'RE you'd 's 'S",
    "x" * 10000,
    " " * 3000,
    "ab" * 2000,
    "<|endoftext|>",
    "<|endoftext|><|endoftext|>",
    "a<|endoftext|>b <|endoftext|> c",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endof",
    "<|im_start",
    "<|<|endoftext|>|>",
    "<|endoftext|",
    "\x00\x01\x1f\x7f \u00a0\u00ad\u2028\u3000 \x0b\x0c\x1c\x85",
    "Mixed: café naïve Ærøskøbing — “quotes” ‘single’ … ∑ ∞ \ufeff",
]
LONE_SURROGATES = ["\ud800", "a\udfffb", "x \udc80 y"]  # tiktoken only: Python strings that `tokenizers` refuses


def corpus(max_chars: int = 200_000) -> list[str]:
    return [(DATA / f).read_text(encoding="utf-8")[:max_chars] for f in TRAIN_FILES]


def samples() -> list[str]:
    return [HELD_OUT, *ADVERSARIAL]


def assert_same_ids(ours, theirs, texts) -> None:
    for text in texts:
        a, b = ours(text), theirs(text)
        assert a == b, f"ids differ on {text[:60]!r}: {a[:20]} vs {b[:20]}"


def hf_encode(hf):
    return lambda text: hf.encode(text, add_special_tokens=False).ids


def lm_encode(tok):
    return lambda text: tok.encode(text, allowed_special="all")


# ----------------------------------------------------------------------------------------------------------------
# Reference tokenizers built in the test
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_bytelevel():
    """A GPT-2 style ByteLevel BPE trained by `tokenizers` (vocab 1000, specials at ids 0..2)."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(corpus(), trainer)
    return hf


def _llama3_pre_tokenizer():
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


@pytest.fixture(scope="module")
def hf_llama3():
    """Llama-3 style: Split(regex) + ByteLevel(use_regex=False), ignore_merges=True, specials after the vocab, and one
    vocab token ("Ġzzzq") that no merge makes, so that only ignore_merges produces it."""
    trained = tokenizers.Tokenizer(models.BPE())
    trained.pre_tokenizer = _llama3_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trained.train_from_iterator(corpus(), trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab["Ġzzzq"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    hf.pre_tokenizer = _llama3_pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|begin_of_text|>", "<|eot_id|>", "<|endoftext|>"])
    return hf


def naive_bpe(text: str, n_merges: int, pattern: str, specials: dict[str, int]) -> Tokenizer:
    """A hand-built tokenizer: textbook BPE (full recount every merge), ids 0..255 = bytes, 256 + k = merge k."""
    words = Counter(tuple(p.encode("utf-8")) for p in regex.findall(pattern, text))
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], vocab[p[0]], vocab[p[1]]))
        assert vocab[best[0]] + vocab[best[1]] not in vocab.values()  # two merges making the same bytes: not here
        new = 256 + len(merges)
        vocab[new] = vocab[best[0]] + vocab[best[1]]
        merges.append(best)
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = count
        words = merged
    return Tokenizer(vocab, merges, pattern, specials)


@pytest.fixture(scope="module")
def handbuilt():
    text = (DATA / "lear_gut.txt").read_text(encoding="utf-8")[:40_000]
    specials = {s: 256 + 300 + i for i, s in enumerate(SPECIALS)}
    return naive_bpe(text, 300, CL100K_PATTERN, specials)


# ----------------------------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------------------------


def test_byte_level_alphabet_matches_tokenizers():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"


def test_import_tokenizers_bytelevel(tmp_path, hf_bytelevel):
    hf_bytelevel.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.pattern == GPT2_PATTERN
    assert tok.special_tokens == {s: hf_bytelevel.token_to_id(s) for s in SPECIALS}
    assert tok.vocab_size == hf_bytelevel.get_vocab_size() == 1000
    assert_same_ids(lm_encode(tok), hf_encode(hf_bytelevel), samples())
    ids = hf_encode(hf_bytelevel)(HELD_OUT[:3000])
    assert tok.decode(ids) == hf_bytelevel.decode(ids) == HELD_OUT[:3000]


def test_import_llama3_style_ignore_merges(tmp_path, hf_llama3):
    hf_llama3.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.pattern == LLAMA3_PATTERN and tok.ignore_merges
    texts = [*samples(), "a zzzq b zzzq", " zzzq"]
    assert_same_ids(lm_encode(tok), hf_encode(hf_llama3), texts)
    # The test can fail: the unmerged vocab token is produced only because ignore_merges is honoured.
    zzzq = hf_llama3.token_to_id("Ġzzzq")
    assert tok.encode(" zzzq") == [zzzq]
    plain = Tokenizer(tok.vocab, tok.merges, tok.pattern, tok.special_tokens, ignore_merges=False)
    assert zzzq not in plain.encode(" zzzq")


def test_import_string_merges(tmp_path, hf_bytelevel):
    """Older tokenizer.json files write merges as "a b" strings instead of [a, b] pairs."""
    data = json.loads(hf_bytelevel.to_str())
    data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert_same_ids(lm_encode(tok), hf_encode(hf_bytelevel), [HELD_OUT[:20000], *ADVERSARIAL])


def test_import_tiktoken_rank_file(tmp_path, hf_bytelevel):
    """A rank file written here by hand (base64 + rank per line) loads like tiktoken reads it; merges recovered."""
    table = {ch: b for b, ch in bytes_to_unicode().items()}
    ranks = {}
    for text, tid in hf_bytelevel.get_vocab(with_added_tokens=False).items():
        if text in SPECIALS:
            continue
        ranks[bytes(table[c] for c in text)] = tid
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    path = tmp_path / "test.tiktoken"
    path.write_text("\n".join(lines) + "\n")
    specials = {"<|endoftext|>": 1000}
    tok = load_tokenizer(path, pattern=GPT2_PATTERN, special_tokens=specials)
    enc = tiktoken.Encoding(
        "test", pat_str=GPT2_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(path)), special_tokens=specials
    )
    assert len(tok.merges) == len(ranks) - 256
    assert_same_ids(lm_encode(tok), lambda t: enc.encode(t, allowed_special="all"), [*samples(), *LONE_SURROGATES])
    # ... and like `tokenizers` on the same vocabulary
    assert_same_ids(tok.encode_ordinary, hf_encode(hf_bytelevel), [HELD_OUT, "don't  stop\r\n"])


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lmforge_trained():
    """The real pipeline: lmforge's own trainer (GPT-2 regex, specials after the merges)."""
    from lmforge.tokenizer import train_bpe

    return train_bpe(texts=corpus(60_000), vocab_size=800, special_tokens=SPECIALS, progress=False, workers=1)


@pytest.mark.parametrize("which", ["handbuilt", "lmforge_trained", "hf_bytelevel", "hf_llama3"])
def test_export_tokenizer_json_and_tiktoken(tmp_path, which, request):
    source = request.getfixturevalue(which)
    if isinstance(source, Tokenizer):
        tok = source
    else:
        source.save(str(tmp_path / "src.json"))
        tok = load_tokenizer(tmp_path / "src.json")
    out = tmp_path / "out"
    save_tokenizer(tok, out)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer.tiktoken", "tokenizer_config.json"]

    hf = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert_same_ids(lm_encode(tok), hf_encode(hf), samples())
    assert hf.decode(tok.encode(HELD_OUT[:2000])) == HELD_OUT[:2000]

    enc = tiktoken.Encoding(
        "exported",
        pat_str=tok.pattern,
        mergeable_ranks=load_tiktoken_bpe(str(out / "tokenizer.tiktoken")),
        special_tokens=tok.special_tokens,
    )
    assert_same_ids(lm_encode(tok), lambda t: enc.encode(t, allowed_special="all"), [*samples(), *LONE_SURROGATES])

    again = load_tokenizer(out)  # and lmforge reads back what it wrote
    assert again.vocab == tok.vocab and list(again.merges) == list(tok.merges)
    assert again.pattern == tok.pattern and again.special_tokens == tok.special_tokens
    assert again.ignore_merges == tok.ignore_merges
    from_ranks = load_tokenizer(out / "tokenizer.tiktoken", pattern=tok.pattern, special_tokens=tok.special_tokens)
    assert from_ranks.vocab == tok.vocab and list(from_ranks.merges) == list(tok.merges)


def test_export_vocab_merges(tmp_path, handbuilt, hf_bytelevel):
    gpt2_style = Tokenizer(handbuilt.vocab, handbuilt.merges, GPT2_PATTERN, handbuilt.special_tokens)
    hf_bytelevel.save(str(tmp_path / "src.json"))
    for tok in (gpt2_style, load_tokenizer(tmp_path / "src.json")):
        out = tmp_path / f"vm{len(tok.vocab)}"
        save_vocab_merges(tok, out)
        assert (out / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
        hf = tokenizers.Tokenizer(models.BPE.from_file(str(out / "vocab.json"), str(out / "merges.txt")))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.add_special_tokens(list(tok.special_tokens))
        assert_same_ids(lm_encode(tok), hf_encode(hf), samples())


def test_import_vocab_merges_written_by_tokenizers(tmp_path, hf_bytelevel):
    hf_bytelevel.model.save(str(tmp_path))  # vocab.json + merges.txt, as GPT-2 ships them
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "model_max_length": 64}))
    tok = load_tokenizer(tmp_path)
    assert tok.special_tokens == {"<|endoftext|>": hf_bytelevel.token_to_id("<|endoftext|>")}
    assert tok.eos_token == "<|endoftext|>" and tok.model_max_length == 64
    assert_same_ids(tok.encode_ordinary, hf_encode(hf_bytelevel), [HELD_OUT, *ADVERSARIAL[:20]])
    assert tok.encode("a<|endoftext|>", allowed_special="all") == hf_encode(hf_bytelevel)("a<|endoftext|>")
    assert load_vocab_merges(tmp_path).vocab == tok.vocab


def test_tokenizer_config_round_trip(tmp_path, handbuilt):
    tok = Tokenizer(handbuilt.vocab, handbuilt.merges, handbuilt.pattern, handbuilt.special_tokens)
    tok.chat_template, tok.bos_token, tok.eos_token = "{{ messages[0]['content'] }}", None, "<|endoftext|>"
    tok.pad_token, tok.unk_token, tok.model_max_length = "<|endoftext|>", None, 2048
    tok.eot_token = "<|im_end|>"  # lmforge's key (GGUF has it): generation stops at the end of a chat turn too
    save_hf_tokenizer(tok, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tok.chat_template and config["model_max_length"] == 2048
    assert config["added_tokens_decoder"][str(tok.special_tokens["<|im_end|>"])]["special"] is True
    again = load_hf_tokenizer(tmp_path)
    for name in ("chat_template", "bos_token", "eos_token", "eot_token", "pad_token", "unk_token", "model_max_length"):
        assert getattr(again, name) == getattr(tok, name), name
    (tmp_path / "chat_template.jinja").write_text("{{ 'from jinja file' }}")  # transformers' newer layout wins
    assert load_tokenizer(tmp_path).chat_template == "{{ 'from jinja file' }}"


def test_tiktoken_needs_ranks_in_merge_order(tmp_path):
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[300], vocab[256] = b"ab", b"abc"  # "abc" (merge 1) has a lower id than "ab" (merge 0)
    tok = Tokenizer(vocab, [(97, 98), (300, 99)], GPT2_PATTERN)
    with pytest.raises(ValueError, match="merge order"):
        save_tiktoken(tok, tmp_path / "x.tiktoken")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_tokenizer(tok, tmp_path / "dir")
    assert any("tokenizer.tiktoken not written" in str(w.message) for w in caught)
    assert (tmp_path / "dir" / "tokenizer.json").exists() and not (tmp_path / "dir" / "tokenizer.tiktoken").exists()
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "dir" / "tokenizer.json"))  # tokenizer.json has no such limit
    assert hf_encode(hf)("abcab abc") == tok.encode("abcab abc") == [256, 300, 32, 256]


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def _unigram():
    return tokenizers.Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], 0, False))


def _wordpiece():
    return tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))


def _wordlevel():
    return tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))


@pytest.mark.parametrize(
    ("make", "kind"), [(_unigram, "Unigram"), (_wordpiece, "WordPiece"), (_wordlevel, "WordLevel")]
)
def test_other_model_types_fail_naming_the_type(tmp_path, make, kind):
    make().save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=f"model type {kind} is not supported"):
        load_tokenizer(tmp_path)


def test_unsupported_normalizer_and_pre_tokenizer(tmp_path, hf_bytelevel):
    from tokenizers import normalizers

    path = tmp_path / "tokenizer.json"
    hf = tokenizers.Tokenizer.from_str(hf_bytelevel.to_str())
    hf.normalizer = normalizers.NFKC()
    hf.save(str(path))
    with pytest.raises(ValueError, match="normalizer type NFKC"):
        load_tokenizer(path)
    hf = tokenizers.Tokenizer.from_str(hf_bytelevel.to_str())
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(path))
    with pytest.raises(ValueError, match="pre-tokenizer type Whitespace"):
        load_tokenizer(path)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    hf.save(str(path))
    with pytest.raises(ValueError, match="add_prefix_space"):
        load_tokenizer(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    with pytest.raises(TypeError, match=r"only apply to \.tiktoken"):
        load_tokenizer(tmp_path / "tokenizer.json", pattern=GPT2_PATTERN)
    with pytest.raises(FileNotFoundError, match=r"nope\.tiktoken"):
        load_tokenizer(tmp_path / "nope.tiktoken")
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid JSON file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a tokenizer\.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"bad\.tiktoken:2: not a tiktoken rank line"):
        load_tokenizer(bad)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"merges\.txt"):
        load_tokenizer(gpt2)
    (gpt2 / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"merges\.txt:2"):
        load_tokenizer(gpt2)


def test_writes_are_atomic(tmp_path, handbuilt, monkeypatch):
    save_tokenizer(handbuilt, tmp_path)
    before = (tmp_path / "tokenizer.json").read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    other = Tokenizer(handbuilt.vocab, handbuilt.merges[:10], handbuilt.pattern, handbuilt.special_tokens)
    with pytest.raises(OSError, match="disk full"):
        save_tokenizer(other, tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tokenizer.json",
        "tokenizer.tiktoken",
        "tokenizer_config.json",
    ]
