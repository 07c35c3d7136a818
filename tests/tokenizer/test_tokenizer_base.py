"""The declared tokenizer interface (lmforge.tokenizer.base) and the import layout of lmforge.tokenizer.

Both tokenizer kinds are checked through `BaseTokenizer` alone, each against its reference library: the byte-level
`Tokenizer` against tiktoken built from its vocabulary, the `SentencePieceTokenizer` against the sentencepiece model
it was read from. The shared code must be defined once (in base.py), and the tokenizer modules must not import
each other in a cycle (as ``../shared/tools/layers.py`` counts imports).
"""

from __future__ import annotations

import importlib.util
import inspect
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import sentencepiece as spm
import tiktoken
import tokenizers

import lmforge.tokenizer.base as base
import lmforge.tokenizer.bpe as bpe
import lmforge.tokenizer.formats as formats
import lmforge.tokenizer.spm as lm_spm
import lmforge.tokenizer.writers as writers
from lmforge.tokenizer import BaseTokenizer, IncrementalDecoder, Tokenizer, train_bpe

SHARED = Path(__file__).resolve().parents[3] / "shared"
DATA = SHARED / "data" / "shakespeare"
LAYERS_TOOL = SHARED / "tools" / "layers.py"
assert DATA.is_dir(), f"{DATA} not found: the tests need the shared Shakespeare data"
assert LAYERS_TOOL.is_file(), f"{LAYERS_TOOL} not found: the import-cycle test reads lmforge with it"

CORPUS = (DATA / "hamlet_gut.txt").read_text(encoding="utf-8")[:60_000]
SPECIALS = ["<|im_start|>", "<|im_end|>"]
TEXTS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "naïve café — 日本",  # multi-byte characters: byte tokens / byte-fallback pieces
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# What BaseTokenizer's module docstring says every tokenizer provides.
METHODS = ("encode", "encode_ordinary", "encode_batch", "decode", "decode_bytes", "token_to_bytes", "token_to_id",
           "id_to_token", "get_vocab", "apply_chat_template")  # fmt: skip
METADATA = ("bos_token", "eos_token", "eot_token", "pad_token", "unk_token", "chat_template", "model_max_length",
            "source")  # fmt: skip
# Written once in base.py and inherited unchanged by both kinds.
SHARED_CODE = ("_specials", "_check", "encode_batch", "apply_chat_template")


@dataclass
class Case:
    """A tokenizer and its reference library's answers: ids of plain text, text of ids, each id's token."""

    tok: BaseTokenizer
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    token: Callable[[int], bytes | str]  # the token in the tokenizer's own spelling
    token_bytes: Callable[[int], bytes]
    n_vocab: int


def byte_level_case() -> Case:
    tok = train_bpe([CORPUS], vocab_size=400, special_tokens=[*SPECIALS, "<|endoftext|>"], progress=False, workers=1)
    specials = {i: s for s, i in tok.special_tokens.items()}
    ranks = {token: i for i, token in tok.vocab.items()}
    enc = tiktoken.Encoding("test", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens=tok.special_tokens)
    token = lambda i: specials.get(i) or enc.decode_single_token_bytes(i)
    return Case(tok, enc.encode_ordinary, enc.decode, token, enc.decode_single_token_bytes, enc.n_vocab)


def sentencepiece_case() -> Case:
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=400, byte_fallback=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        user_defined_symbols=SPECIALS, minloglevel=2, num_threads=1,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()

    def kind(i: int) -> int:  # GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
        flags = (sp.is_unknown(i), sp.is_control(i), sp.id_to_piece(i) in SPECIALS, False, sp.is_byte(i))
        return 2 + flags.index(True) if any(flags) else 1

    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }
    tok = lm_spm.sentencepiece_from_gguf(meta, "test.gguf")

    def token_bytes(i: int) -> bytes:
        piece = sp.id_to_piece(i)
        return bytes([int(piece[3:5], 16)]) if sp.is_byte(i) else piece.replace("\u2581", " ").encode("utf-8")

    return Case(tok, sp.encode, sp.decode, sp.id_to_piece, token_bytes, n)


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def case(request) -> Case:
    return {"byte_level": byte_level_case, "sentencepiece": sentencepiece_case}[request.param]()


def test_both_kinds_implement_the_interface(case):
    tok = case.tok
    assert isinstance(tok, BaseTokenizer)
    assert not type(tok).__abstractmethods__
    assert all(callable(getattr(tok, name)) for name in METHODS)
    assert all(hasattr(tok, name) for name in METADATA)
    assert isinstance(tok.add_bos_token, bool) and isinstance(tok.special_tokens, dict)


def test_encoding_matches_the_reference(case):
    tok, want = case.tok, [case.encode(t) for t in TEXTS]
    assert [tok.encode(t) for t in TEXTS] == want
    assert [tok.encode_ordinary(t) for t in TEXTS] == want
    assert tok.encode_batch(TEXTS) == want
    assert tok.encode_batch(TEXTS, workers=2) == want  # worker processes: the tokenizer is pickled


def test_decoding_matches_the_reference(case):
    tok = case.tok
    for text in TEXTS:
        ids = case.encode(text)
        assert tok.decode(ids) == case.decode(ids)
        assert tok.decode_bytes(ids) == b"".join(map(case.token_bytes, ids))
        stream = IncrementalDecoder(tok)
        pieces = [stream.add(i) for i in ids]
        assert "".join(pieces) + stream.flush() == tok.decode_bytes(ids).decode("utf-8")
        assert "\ufffd" not in "".join(pieces)  # a character split across tokens is held back, not replaced


def test_vocabulary_lookups_match_the_reference(case):
    tok = case.tok
    assert tok.vocab_size == case.n_vocab
    ids = range(tok.vocab_size)
    assert [tok.id_to_token(i) for i in ids] == [case.token(i) for i in ids]
    assert [tok.token_to_bytes(i) for i in ids] == [case.token_bytes(i) for i in ids]
    assert [tok.token_to_id(case.token(i)) for i in ids] == list(ids)
    assert tok.get_vocab() == {case.token(i): i for i in ids}


def test_special_tokens_follow_tiktoken_rules(case):
    tok, special = case.tok, "<|im_end|>"
    sid = tok.special_tokens[special]
    assert case.token(sid) == special
    text = "To be" + special
    with pytest.raises(ValueError, match="disallowed special token '<\\|im_end\\|>'"):
        tok.encode(text)
    assert tok.encode(text, allowed_special="all") == tok.encode(text, allowed_special={special})
    assert tok.encode(text, allowed_special="all") == [*case.encode("To be"), sid]
    assert tok.encode(text, disallowed_special=()) == tok.encode_ordinary(text) != tok.encode(text, "all")


def test_chat_template(case):
    tok = case.tok
    messages = [{"role": "user", "content": "To be"}, {"role": "assistant", "content": "or not"}]
    want = "<|im_start|>user\nTo be<|im_end|>\n<|im_start|>assistant\nor not<|im_end|>\n<|im_start|>assistant\n"
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, chat_template=CHATML)
    assert text == want
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, chat_template=CHATML)
    assert ids == tok.encode(want, allowed_special="all")
    assert ids.count(tok.special_tokens["<|im_start|>"]) == 3


def test_shared_code_is_defined_once_in_base():
    """Both kinds inherit the shared methods from BaseTokenizer: none is defined again, or borrowed, in a class."""
    for cls in (Tokenizer, lm_spm.SentencePieceTokenizer):
        assert issubclass(cls, BaseTokenizer)
        for name in SHARED_CODE:
            assert name not in vars(cls), f"{cls.__name__}.{name} is defined again instead of inherited"
            assert inspect.getattr_static(cls, name) is inspect.getattr_static(BaseTokenizer, name)
    assert Tokenizer.decode is BaseTokenizer.decode  # SentencePiece overrides it: it drops the prefix space


def _function(value):
    """The plain function behind a class attribute (method, static/class method, property), else None."""
    value = getattr(value, "__func__", None) or getattr(value, "fget", None) or value
    return value if inspect.isfunction(value) else None


CLASSES = [
    BaseTokenizer, IncrementalDecoder, Tokenizer, lm_spm.SentencePieceTokenizer, lm_spm.SentencePieceIncrementalDecoder
]  # fmt: skip


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_no_class_borrows_another_class_methods(cls):
    """Every function in a class body was written in that body (``apply_chat_template = Tokenizer.apply_chat_template``
    would hold a function whose qualified name is another class's)."""
    for name, value in vars(cls).items():
        if (func := _function(value)) is not None:
            assert func.__qualname__.split(".")[0] == cls.__name__, f"{cls.__name__}.{name} is {func.__qualname__}"


def test_public_names_stay_where_they_were():
    assert bpe.IncrementalDecoder is base.IncrementalDecoder is IncrementalDecoder
    for name in writers.__all__:
        if name != "ByteLevelBPE":
            assert getattr(formats, name) is getattr(writers, name), name


def test_save_writes_files_tokenizers_reads(tmp_path):
    """`Tokenizer.save` (through writers.py, which does not import bpe.py) still writes a tokenizer.json that the
    `tokenizers` library encodes like the tokenizer itself."""
    case = byte_level_case()
    case.tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writers.SAVED_FILES)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert [hf.encode(t).ids for t in TEXTS] == [case.encode(t) for t in TEXTS]


def test_tokenizer_modules_import_no_cycle():
    """The import graph of lmforge (lazy imports and ``from lmforge.tokenizer import x`` counted, as the layers tool
    counts them) has no cycle through a tokenizer module."""
    spec = importlib.util.spec_from_file_location("layers_tool", LAYERS_TOOL)
    layers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layers)
    root = Path(base.__file__).resolve().parents[1]
    files = {layers.module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph = {m: layers.imports_of(p, m, set(files)) for m, p in files.items()}
    assert "lmforge.tokenizer.formats" in graph["lmforge.tokenizer.gguf_vocab"]  # the graph sees imports
    cycles = [c for c in layers.cycles(graph) if any(m.startswith("lmforge.tokenizer") for m in c)]
    assert cycles == []
