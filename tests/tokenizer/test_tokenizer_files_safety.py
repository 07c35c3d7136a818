"""Tokenizer files from strangers: Split pre-tokenizers exactly as `tokenizers`, and one clear error per bad field.

Oracles: the `tokenizers` library (its ``Split`` pre-tokenizer on the same pattern, behavior and invert, and a
`tokenizers.Tokenizer` built from the same tokenizer.json), and hand-written expectations for each refused field: a
`TokenizerFileError` (a `LmforgeError`) whose message names the file and the file's own key.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import re
from pathlib import Path

import pytest
import tokenizers
from tokenizers import Regex
from tokenizers import pre_tokenizers as hf_pre

import lmforge
from lmforge.tokenizer import GPT2_PATTERN, LLAMA3_PATTERN, Tokenizer, train_bpe
from lmforge.tokenizer.formats import (
    TokenizerFileError,
    bytes_to_unicode,
    hf_tokenizer_json,
    load_hf_tokenizer,
    load_tiktoken,
    load_tokenizer,
    load_vocab_merges,
    save_vocab_merges,
)
from lmforge.tokenizer.gguf_vocab import tokenizer_from_gguf
from lmforge.tokenizer.pretokenize import SPLIT_BEHAVIORS, SplitRule
from lmforge.utils.errors import LmforgeError

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"
HF_BEHAVIOR = {
    "Removed": "removed",
    "Isolated": "isolated",
    "MergedWithPrevious": "merged_with_previous",
    "MergedWithNext": "merged_with_next",
    "Contiguous": "contiguous",
}
# Patterns with gaps, empty matches (x*, lookarounds, the empty regex), anchors (Oniguruma's ^ $ are per line),
# capture groups, and the built-in ones that match every character.
PATTERNS = [
    r"\d", r"\d+", r"x*", "", r"(?=b)", r"x*|y", r"x*|yz|z", r"\s", r"\p{L}+", r"^a", r"a$", r"\s+$", r"^\s*",
    r"(a)(b)?", r"[^\s]+", "😀", r"\X", GPT2_PATTERN, LLAMA3_PATTERN,
]  # fmt: skip
ADVERSARIAL = [
    "", " ", "   ", "\n", "\n\n a\n", "abc", "xxyz", "ab12c3de4", "12", "a1", "1a", "no digits at all",
    "😀", "👨\u200d👩\u200d👧 family 🏳️\u200d🌈", "e\u0301 a\u0300\u0316 combining", "日本語 テキスト",
    "\r\n\r\n", "\t\tx\t", "a b  c   ", "zzzz", "xyxyx", "\x00\x01\x7f", "café 2024-01-01",
]  # fmt: skip


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abxyz 12\n\t😀é\u0301\u200d"
    return ["".join(rng.choices(alphabet, k=rng.randint(0, 14))) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Split rules against tokenizers' Split
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize("behavior", SPLIT_BEHAVIORS)
def test_split_rule_equals_tokenizers_split(behavior, invert):
    texts = ADVERSARIAL + random_texts(120)
    for pattern in PATTERNS:
        ours = SplitRule(pattern, behavior, invert, line_anchors=True)
        ref = hf_pre.Split(Regex(pattern), HF_BEHAVIOR[behavior], invert=invert)
        for text in texts:
            expected = [piece for piece, _ in ref.pre_tokenize_str(text)]
            assert ours.split(text) == expected, (pattern, behavior, invert, text)


@pytest.mark.parametrize("literal", ["1", "ab", " ", "a.b", "(", "$", "x*"])
def test_split_rule_with_a_string_pattern(literal):
    """pattern {"String": s} is the literal s (regex characters escaped), as in tokenizers."""
    texts = [*ADVERSARIAL, "a.b(ab)$x*1 a.bx", "((x**$$"]
    for behavior in SPLIT_BEHAVIORS:
        split = {"type": "Split", "pattern": {"String": literal}, "behavior": behavior, "invert": False}
        ref = hf_pre.Split(literal, HF_BEHAVIOR[behavior])
        tok = tokenizer_json_with({"type": "Sequence", "pretokenizers": [split, BYTE_LEVEL]})
        ours = load_json(tok).split_rule
        for text in texts:
            assert ours.split(text) == [p for p, _ in ref.pre_tokenize_str(text)], (literal, behavior, text)


def test_every_character_is_kept_by_every_rule_but_removed():
    for pattern in PATTERNS:
        for behavior in SPLIT_BEHAVIORS:
            for invert in (False, True):
                rule = SplitRule(pattern, behavior, invert)
                for text in ADVERSARIAL:
                    pieces = rule.split(text)
                    assert "" not in pieces
                    if behavior != "Removed":
                        assert "".join(pieces) == text, (pattern, behavior, invert, text)


# ----------------------------------------------------------------------------------------------------------------
# Whole tokenizers: ids equal to tokenizers.Tokenizer on the same tokenizer.json
# ----------------------------------------------------------------------------------------------------------------

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    text = (DATA / "hamlet_gut.txt").read_text(encoding="utf-8")[:30_000]
    return train_bpe(texts=[text], vocab_size=500, special_tokens=["<|endoftext|>"], progress=False, workers=1)


def tokenizer_json_with(pre_tokenizer: dict, base: Tokenizer | None = None) -> dict:
    """A tokenizer.json (of `base`, else a 256-byte vocabulary with two merges) with this pre-tokenizer."""
    if base is None:
        vocab = {i: bytes([i]) for i in range(256)} | {256: b"ab", 257: b"abc"}
        base = Tokenizer(vocab, [(97, 98), (256, 99)], GPT2_PATTERN, {"<|endoftext|>": 258})
    data = hf_tokenizer_json(base)
    data["pre_tokenizer"] = pre_tokenizer
    return data


def load_json(data: dict, tmp: Path | None = None) -> Tokenizer:
    from lmforge.tokenizer.formats import tokenizer_from_hf

    return tokenizer_from_hf(copy.deepcopy(data))


@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize("behavior", SPLIT_BEHAVIORS)
@pytest.mark.parametrize("pattern", [r"\p{L}+", r" ?\d", LLAMA3_PATTERN, r"x*"])
def test_ids_equal_tokenizers(trained, tmp_path, pattern, behavior, invert):
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": behavior, "invert": invert}
    data = tokenizer_json_with({"type": "Sequence", "pretokenizers": [split, BYTE_LEVEL]}, trained)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    ours, ref = load_hf_tokenizer(path), tokenizers.Tokenizer.from_file(str(path))
    held_out = (DATA / "tempest_gut.txt").read_text(encoding="utf-8")[:3000]
    for text in [held_out, *ADVERSARIAL, "a<|endoftext|>b 12<|endoftext|>"]:
        expected = ref.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, allowed_special="all") == expected, (pattern, behavior, invert, text[:40])
    # streaming agrees with encode for every rule (other behaviors are cut only at special tokens)
    text = held_out + "<|endoftext|>" + held_out[:500]
    chunks = [text[i : i + 7] for i in range(0, len(text), 7)]
    assert list(ours.encode_iterable(chunks, allowed_special="all")) == ours.encode(text, allowed_special="all")
    # the file round-trips: lmforge writes the same rule back, and tokenizers reads it the same
    again = json.loads(json.dumps(hf_tokenizer_json(ours)))
    assert again["pre_tokenizer"]["pretokenizers"][0] == split
    assert load_json(again).split_rule == ours.split_rule


def test_default_gpt2_rule_is_written_as_tokenizers_bytelevel(trained):
    assert hf_tokenizer_json(trained)["pre_tokenizer"]["use_regex"] is True
    assert load_json(hf_tokenizer_json(trained)).split_rule == SplitRule(GPT2_PATTERN)


def test_training_with_a_split_rule_counts_its_pieces():
    """A rule with gaps: training sees the gaps too (the old findall dropped them), so "!!" gets merged."""
    rule = SplitRule(r"\p{L}+", "Isolated")
    tok = train_bpe(texts=["ab!! ab!! ab!!"], vocab_size=258, pattern=rule, progress=False, workers=1)
    assert tok.split_rule == rule and {tok.vocab[i] for i in (256, 257)} == {b"ab", b"!!"}
    ref = tokenizers.Tokenizer.from_str(json.dumps(hf_tokenizer_json(tok)))
    assert tok.encode("ab!! x") == ref.encode("ab!! x", add_special_tokens=False).ids


def test_pickle_keeps_the_rule():
    import pickle

    tok = load_json(tokenizer_json_with({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\d"}, "behavior": "MergedWithNext", "invert": True}, BYTE_LEVEL]}))
    again = pickle.loads(pickle.dumps(tok))
    assert again.split_rule == tok.split_rule and again.encode("ab1c2") == tok.encode("ab1c2")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# tokenizer.json: each bad field refused, naming the file and the key
# ----------------------------------------------------------------------------------------------------------------


def _set(path: str, value):
    """A mutation of the tokenizer.json object: set the value at a dotted path (list indices as numbers)."""

    def mutate(data: dict) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value

    return mutate


def _split(**fields):
    split = {"type": "Split", "pattern": {"Regex": r"\d"}, "behavior": "Isolated", "invert": False} | fields
    return _set("pre_tokenizer", {"type": "Sequence", "pretokenizers": [split, BYTE_LEVEL]})


BAD_TOKENIZER_JSON = {
    "regex that does not compile": (_split(pattern={"Regex": "(a"}), r"pre_tokenizer\.pretokenizers\[0\]\.pattern\.Regex: .*does not compile"),  # noqa: E501
    "pattern of the wrong type": (_split(pattern="\\d"), r"pre_tokenizer\.pretokenizers\[0\]\.pattern: expected"),
    "unknown behavior": (_split(behavior="Merged"), r"pre_tokenizer\.pretokenizers\[0\]\.behavior: 'Merged' is not"),
    "invert not a bool": (_split(invert="yes"), r"pre_tokenizer\.pretokenizers\[0\]\.invert: expected true or false"),
    "pretokenizers not a list": (_set("pre_tokenizer", {"type": "Sequence", "pretokenizers": 3}), r"pre_tokenizer\.pretokenizers: expected a list"),  # noqa: E501
    "id is a bool": (_set("model.vocab.a", True), r"model\.vocab\['a'\]: expected a non-negative integer token id, got True"),  # noqa: E501
    "id is a float": (_set("model.vocab.a", 97.0), r"model\.vocab\['a'\]: expected a non-negative integer"),
    "id is a string": (_set("model.vocab.a", "97"), r"model\.vocab\['a'\]: expected a non-negative integer"),
    "negative id": (_set("model.vocab.a", -1), r"model\.vocab\['a'\]: expected a non-negative integer"),
    "id given twice": (_set("model.vocab.a", 98), r"model\.vocab\['(a|b)'\]: id 98 is also the id of"),
    "id far beyond the vocabulary": (_set("model.vocab.a", 10**12), r"model\.vocab: token id 1000000000000 is beyond the vocabulary"),  # noqa: E501
    "vocab a list": (_set("model.vocab", [["a", 1]]), r"model\.vocab: expected a JSON dict, got list"),
    "token outside the byte alphabet": (_set("model.vocab.a b", 300), r"model\.vocab\['a b'\]: token 'a b' is not in the byte-level alphabet"),  # noqa: E501
    "merges not a list": (_set("model.merges", "a b"), r"model\.merges: expected a JSON list"),
    "merge of three tokens": (_set("model.merges.0", ["a", "b", "c"]), r"model\.merges\[0\]: \['a', 'b', 'c'\] is not a pair"),  # noqa: E501
    "merge string of three": (_set("model.merges.0", "a b c"), r"model\.merges\[0\]: 'a b c' is not a pair"),
    "merge of a number": (_set("model.merges.0", 7), r"model\.merges\[0\]: 7 is not a pair"),
    "merge with an unknown result": (_set("model.merges.1", ["b", "c"]), r"model\.merges\[1\]: \['b', 'c'\] uses or makes a token that is not in the vocab"),  # noqa: E501
    "added_tokens not a list": (_set("added_tokens", {"id": 1}), r"added_tokens: expected a JSON list"),
    "added token not an object": (_set("added_tokens.0", "<|endoftext|>"), r"added_tokens\[0\]: expected an object"),
    "added token id a string": (_set("added_tokens.0.id", "258"), r"added_tokens\[0\]\.id: expected a non-negative integer"),  # noqa: E501
    "added token without content": (_set("added_tokens.0.content", ""), r"added_tokens\[0\]\.content: expected a non-empty string"),  # noqa: E501
    "added token on a vocab token's id": (_set("added_tokens.0.id", 97), r"model\.vocab\['a'\]: id 97 is the id of added token '<\|endoftext\|>'"),  # noqa: E501
    "ignore_merges not a bool": (_set("model.ignore_merges", "no"), r"model\.ignore_merges: expected true or false"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENIZER_JSON))
def test_bad_tokenizer_json_is_refused_naming_the_key(tmp_path, case):
    mutate, message = BAD_TOKENIZER_JSON[case]
    data = tokenizer_json_with({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True})
    mutate(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=rf"tokenizer\.json: {message}") as info:
        load_tokenizer(tmp_path)
    assert isinstance(info.value, LmforgeError) and "\n" not in str(info.value)


def test_two_added_tokens_with_one_id_and_a_token_listed_twice(tmp_path):
    data = tokenizer_json_with(BYTE_LEVEL | {"use_regex": True})
    data["added_tokens"].append({"id": 258, "content": "<|other|>"})
    with pytest.raises(TokenizerFileError, match=r"added_tokens\[1\]: id 258 is already the id of added token"):
        load_json(data)
    data["added_tokens"][1] = {"id": 259, "content": "<|endoftext|>"}
    with pytest.raises(TokenizerFileError, match=r"added_tokens\[1\]: '<\|endoftext\|>' is already added with id 258"):
        load_json(data)
    text = json.dumps(tokenizer_json_with(BYTE_LEVEL | {"use_regex": True})).replace('"a": 97', '"a": 97, "a": 300')
    (tmp_path / "tokenizer.json").write_text(text, encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json: not a valid JSON file .*key 'a' appears twice"):
        load_tokenizer(tmp_path)


def test_a_vocabulary_without_some_byte_tokens_loads_and_names_the_byte_it_cannot_encode():
    """Real vocabularies lack a few bytes (SmolLM2: 21); tokenizers drops such a byte, lmforge refuses the text."""
    data = tokenizer_json_with(BYTE_LEVEL | {"use_regex": True})
    del data["model"]["vocab"][bytes_to_unicode()[4]]
    tok = load_json(data)
    assert tok.encode("abc") == [257]
    with pytest.raises(LmforgeError, match=r"byte 0x04"):
        tok.encode("a\x04")


@pytest.mark.parametrize("byte", [0x0A, 0x20, ord("e"), 0x7E])
def test_a_vocabulary_without_a_byte_of_plain_text_is_refused_at_load(tmp_path, byte):
    data = tokenizer_json_with(BYTE_LEVEL | {"use_regex": True})
    del data["model"]["vocab"][bytes_to_unicode()[byte]]
    data["model"]["merges"] = [m for m in data["model"]["merges"] if bytes_to_unicode()[byte] not in m]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerFileError, match=rf"tokenizer.json: model.vocab: no token for the byte {byte:#04x}"):
        lmforge.load_tokenizer(tmp_path)


def test_the_byte_error_names_the_file_the_tokenizer_came_from(tmp_path):
    data = tokenizer_json_with(BYTE_LEVEL | {"use_regex": True})
    del data["model"]["vocab"][bytes_to_unicode()[4]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    tok = lmforge.load_tokenizer(tmp_path)
    with pytest.raises(LmforgeError, match=rf"^{re.escape(str(tmp_path))}: cannot encode b'\\x04': byte 0x04"):
        tok.encode("\x04")


# ----------------------------------------------------------------------------------------------------------------
# tokenizer_config.json
# ----------------------------------------------------------------------------------------------------------------

BAD_CONFIG = {
    "chat_template": (7, r"chat_template: expected a string or a list"),
    "bos_token": (3, r"bos_token: expected a string or \{\"content\": str\}"),
    "eos_token": ({"content": 5}, r"eos_token: expected a string"),
    "add_bos_token": ("yes", r"add_bos_token: expected true or false"),
    "model_max_length": ("big", r"model_max_length: expected a positive number"),
}


@pytest.mark.parametrize("key", sorted(BAD_CONFIG))
def test_bad_tokenizer_config_fields(tmp_path, key):
    value, message = BAD_CONFIG[key]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json_with(BYTE_LEVEL | {"use_regex": True})))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({key: value}))
    with pytest.raises(TokenizerFileError, match=rf"tokenizer_config\.json: {message}"):
        load_tokenizer(tmp_path)


def test_tokenizer_config_template_list_and_limits(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json_with(BYTE_LEVEL | {"use_regex": True})))
    config = {"chat_template": [{"name": "tool", "template": "T"}, {"name": "default", "template": "D"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"model_max_length": 1e30}))
    tok = load_tokenizer(tmp_path)
    assert (tok.chat_template, tok.model_max_length) == ("D", None)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": [{"name": "x"}]}')
    with pytest.raises(TokenizerFileError, match=r"chat_template\[0\]: expected \{\"name\": str, \"template\": str\}"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": NaN}')
    with pytest.raises(TokenizerFileError, match=r"model_max_length: expected a positive number, got nan"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# .tiktoken and vocab.json + merges.txt
# ----------------------------------------------------------------------------------------------------------------


def _rank_lines(extra: str = "", skip: int | None = None) -> str:
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256) if b != skip]
    return "".join(lines) + extra


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_rank_lines("YWI= -1\n"), r":257: not a tiktoken rank line"),
        (_rank_lines("YWI= 2_56\n"), r":257: not a tiktoken rank line"),
        (_rank_lines("YWI= 5\n"), r":257: rank 5 appears twice \(also on line 6\)"),
        (_rank_lines("YQ== 300\n"), r":257: token b'a' appears twice"),
        (_rank_lines(" 300\n"), r":257: not a tiktoken rank line"),
        (_rank_lines("YWI= 99999999999\n"), r": token id 99999999999 is beyond the vocabulary"),
        (_rank_lines(skip=10), r": no rank for the single byte 0x0a"),
    ],
)
def test_bad_tiktoken_files(tmp_path, text, message):
    path = tmp_path / "bad.tiktoken"
    path.write_text(text)
    with pytest.raises(TokenizerFileError, match=rf"bad\.tiktoken{message}"):
        load_tiktoken(path)


def test_good_tiktoken_file(tmp_path):
    path = tmp_path / "ok.tiktoken"
    path.write_text(_rank_lines(f"{base64.b64encode(b'ab').decode()} 256\n"))
    assert load_tiktoken(path).encode("abab") == [256, 256]


def test_bad_vocab_json_and_merges_txt(tmp_path, trained):
    save_vocab_merges(trained, tmp_path)
    assert load_vocab_merges(tmp_path).encode("to be or not") == trained.encode("to be or not")
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    (tmp_path / "merges.txt").write_text("\n".join([*merges[:3], "zz q", *merges[3:]]) + "\n")
    with pytest.raises(TokenizerFileError, match=r"merges\.txt:4: 'zz q' uses or makes a token"):
        load_vocab_merges(tmp_path)
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n")
    for bad, message in [
        ({**vocab, "a": vocab["b"]}, r"vocab\.json\['(a|b)'\]: id \d+ is also the id of"),
        ({**vocab, "a": None}, r"vocab\.json\['a'\]: expected a non-negative integer token id, got None"),
        (list(vocab), r"vocab\.json: expected a JSON object"),
    ]:
        (tmp_path / "vocab.json").write_text(json.dumps(bad))
        with pytest.raises(TokenizerFileError, match=message):
            load_vocab_merges(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"x": {"content": "<s>"}}}')
    with pytest.raises(TokenizerFileError, match=r"tokenizer_config\.json: added_tokens_decoder\['x'\]: the key"):
        load_vocab_merges(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# GGUF vocabularies
# ----------------------------------------------------------------------------------------------------------------


def gguf_meta() -> dict:
    """A byte-level GGUF vocabulary: 256 bytes, "ab", an unused pad outside the alphabet, a control token; one merge."""
    table = bytes_to_unicode()
    tokens = [table[b] for b in range(256)] + ["ab", "[PAD 257]", "<|endoftext|>"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 257 + [5, 3],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.eos_token_id": 258,
    }


BAD_GGUF = {
    "tokenizer.ggml.tokens": (7, r"tokenizer\.ggml\.tokens: expected an array of a string, got int"),
    "tokenizer.ggml.token_type": ([1] * 3, r"tokenizer\.ggml\.token_type has 3 entries for 259 tokens"),
    "tokenizer.ggml.merges": ([5], r"tokenizer\.ggml\.merges\[0\]: expected a string, got 5"),
    "tokenizer.ggml.pre": ("mystery", r"tokenizer\.ggml\.pre='mystery' is not a pre-tokenizer lmforge knows"),
    "tokenizer.ggml.bos_token_id": ("1", r"tokenizer\.ggml\.bos_token_id: expected an integer token id"),
    "tokenizer.ggml.add_bos_token": (1, r"tokenizer\.ggml\.add_bos_token: expected a bool"),
    "tokenizer.chat_template": (["x"], r"tokenizer\.chat_template: expected a string"),
}


@pytest.mark.parametrize("key", sorted(BAD_GGUF))
def test_bad_gguf_vocabulary_keys(key):
    value, message = BAD_GGUF[key]
    with pytest.raises(TokenizerFileError, match=rf"m\.gguf: {message}"):
        tokenizer_from_gguf(gguf_meta() | {key: value}, "m.gguf")


def test_gguf_vocabulary_checks():
    tok = tokenizer_from_gguf(gguf_meta(), "m.gguf")
    assert tok.encode("abab") == [256, 256] and tok.eos_token == "<|endoftext|>" and 257 not in tok.vocab
    meta = gguf_meta()
    meta["tokenizer.ggml.tokens"][257] = "a"
    with pytest.raises(TokenizerFileError, match=r"m\.gguf: tokenizer\.ggml\.tokens\[257\]: token 'a' repeats .*97"):
        tokenizer_from_gguf(meta, "m.gguf")
    meta = gguf_meta()
    meta["tokenizer.ggml.tokens"][3] = 3
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.ggml\.tokens\[3\]: expected a string, got 3"):
        tokenizer_from_gguf(meta, "m.gguf")
    meta = gguf_meta() | {"tokenizer.ggml.merges": ["a c"]}
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.ggml\.merges\[0\]: 'a c' uses or makes a token"):
        tokenizer_from_gguf(meta, "m.gguf")
    meta = gguf_meta() | {"tokenizer.ggml.token_type": [1] * 258 + [True]}
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.ggml\.token_type\[258\]: expected an integer"):
        tokenizer_from_gguf(meta, "m.gguf")
    with pytest.warns(UserWarning, match=r"tokenizer\.ggml\.eos_token_id=999 is not a token id"):
        assert tokenizer_from_gguf(gguf_meta() | {"tokenizer.ggml.eos_token_id": 999}, "m.gguf").eos_token is None


def test_sentencepiece_gguf_checks():
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<unk>", "▁", "a", "▁a"],
        "tokenizer.ggml.scores": [0.0, -1.0, -2.0, -0.5],
        "tokenizer.ggml.token_type": [2, 1, 1, 1],
    }
    assert tokenizer_from_gguf(meta, "s.gguf").encode("a a") == [3, 3]
    for key, value, message in [
        ("tokenizer.ggml.scores", [0.0, float("nan"), 0.0, 0.0], r"tokenizer\.ggml\.scores\[1\]: expected a number"),
        ("tokenizer.ggml.scores", [0.0, True, 0.0, 0.0], r"tokenizer\.ggml\.scores\[1\]: expected a number"),
        ("tokenizer.ggml.scores", "0", r"tokenizer\.ggml\.scores: expected an array"),
        ("tokenizer.ggml.tokens", ["<unk>", "a", "a", "▁a"], r"tokenizer\.ggml\.tokens\[2\]: token 'a' repeats"),
        ("tokenizer.ggml.add_space_prefix", "no", r"tokenizer\.ggml\.add_space_prefix: expected a bool"),
    ]:
        with pytest.raises(TokenizerFileError, match=rf"s\.gguf: {message}"):
            tokenizer_from_gguf(meta | {key: value}, "s.gguf")
