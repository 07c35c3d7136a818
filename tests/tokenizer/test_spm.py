"""SentencePiece-style ("llama") GGUF vocabularies against transformers' GGUF tokenizer and SentencePiece.

The vocabulary is a real SentencePiece BPE model (byte fallback, digits split, whitespace-only pieces, as
Llama's), trained here on a few Shakespeare plays and written to a GGUF file; another play is held out.
"""

from __future__ import annotations

import io
import itertools
import pickle
import random
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import lmforge
from lmforge.config import ModelConfig
from lmforge.infer.generate import encode_prompt
from lmforge.io.gguf import GGUFValue, GGUFValueType, write_gguf
from lmforge.io.gguf_export import save_gguf
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.bpe import IncrementalDecoder
from lmforge.tokenizer.gguf_vocab import tokenizer_from_gguf
from lmforge.tokenizer.spm import SentencePieceIncrementalDecoder, SentencePieceTokenizer

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"
TRAIN = ("hamlet_gut.txt", "macbeth_gut.txt", "sonnets_gut.txt")
HELD_OUT = "tempest_gut.txt"
SPECIALS = ["<|im_start|>", "<|im_end|>"]
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ADVERSARIAL = [
    "", " ", "  ", "x", " x", "  x", "   leading and trailing   ", "a  b   c    d", "trailing ", "\n", " \n ",
    "tabs\tand\r\nCRLF\r\n", "line one\nline two\n\n  indented",
    "emoji 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽", "日本語のテキスト、中文字符。",
    "e\u0301 n\u0303 Å", "digits 0123456789 3.14159 2024-01-01", "x  1  22   333", "a" * 3000, "▁ literal ▁▁ bars",
    "<s>Hello</s>", "Hello<s> world</s>", "<unk> x <unk>", "<|im_start|>user\nhi<|im_end|>\n", "<|im_sta", "<0x41>",
    "it's we'll they're -- O, 'tis", "HAMLET. To be, or not to be, that is the question:",
]  # fmt: skip


def train_model(vocab_size: int = 2000):
    """A SentencePiece BPE model like Llama's tokenizer.model, trained on the TRAIN plays."""
    lines = [line for name in TRAIN for line in (DATA / name).read_text().splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", user_defined_symbols=SPECIALS, minloglevel=2, num_threads=1,
    )  # fmt: skip
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def gguf_metadata(sp, **overrides) -> dict:
    """What llama.cpp's convert_hf_to_gguf.py writes for a SentencePiece model (None in overrides: drop a key)."""
    n = sp.get_piece_size()

    def kind(i: int) -> int:
        flags = (sp.is_unknown(i), sp.is_control(i), sp.id_to_piece(i) in SPECIALS, sp.is_unused(i), sp.is_byte(i))
        return 2 + flags.index(True) if any(flags) else 1

    meta = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": GGUFValue([sp.get_score(i) for i in range(n)], GGUFValueType.ARRAY),
        "tokenizer.ggml.token_type": GGUFValue([kind(i) for i in range(n)], GGUFValueType.ARRAY, GGUFValueType.INT32),
        "tokenizer.ggml.bos_token_id": GGUFValue(sp.bos_id(), GGUFValueType.UINT32),
        "tokenizer.ggml.eos_token_id": GGUFValue(sp.eos_id(), GGUFValueType.UINT32),
        "tokenizer.ggml.unknown_token_id": GGUFValue(sp.unk_id(), GGUFValueType.UINT32),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": True,
        "tokenizer.chat_template": CHATML,
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def plain(meta: dict) -> dict:
    """Metadata as GGUFFile reads it back: values without their GGUFValue wrappers."""
    return {k: v.value if isinstance(v, GGUFValue) else v for k, v in meta.items()}


@pytest.fixture(scope="module")
def sp():
    return train_model()


@pytest.fixture(scope="module")
def files(sp, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spm")
    variants = {
        "main": {},
        "no_bos": {"tokenizer.ggml.add_bos_token": False},
        "no_prefix": {"tokenizer.ggml.add_space_prefix": False},
    }
    for name, overrides in variants.items():
        write_gguf(root / f"{name}.gguf", gguf_metadata(sp, **overrides), {})
    return {name: root / f"{name}.gguf" for name in variants}


@pytest.fixture(scope="module")
def tok(files) -> SentencePieceTokenizer:
    return lmforge.load_tokenizer(files["main"])


@pytest.fixture(scope="module")
def hf(files):
    import transformers

    path = files["main"]
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def held_out() -> list[str]:
    return (DATA / HELD_OUT).read_text().splitlines()[:3000]


def test_load_tokenizer_reads_the_metadata(tok, sp):
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == sp.get_piece_size() == 2000
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", None)
    assert tok.add_bos_token and tok.add_space_prefix and tok.chat_template == CHATML
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4}
    assert tok.token_to_id("▁the") == sp.piece_to_id("▁the") and tok.id_to_token(tok.token_to_id("▁the")) == "▁the"
    the, newline = tok.token_to_id("▁the"), tok.token_to_id("<0x0A>")
    assert tok.token_to_id(b" the") == the and tok.token_to_bytes(the) == b" the"
    assert tok.token_to_id(b"\n") == newline and tok.token_to_bytes(newline) == b"\n"
    assert tok.get_vocab()["<0xFF>"] == sp.piece_to_id("<0xFF>")


def test_matches_transformers_on_held_out_text(tok, hf, held_out):
    text = "\n".join(held_out)
    ids = tok.encode(text, allowed_special="all")
    assert len(ids) > 20_000 and ids == hf.encode(text, add_special_tokens=False)
    want = hf(held_out, add_special_tokens=False)["input_ids"]  # line by line: each gets its prefix space
    assert [tok.encode(line) for line in held_out] == want
    assert tok.decode(ids) == hf.decode(ids) == text


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_matches_transformers_on_adversarial_text(tok, hf, text):
    ids = tok.encode(text, allowed_special="all")
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids)
    # transformers' round trip loses a leading space: " x" -> "▁x" (no second "▁") -> "x"; a literal "▁" is a space
    text = text.replace("▁", " ")
    assert tok.decode(ids) == (text[1:] if text.startswith(" ") else text)


def test_matches_sentencepiece(tok, sp, held_out):
    """SentencePiece itself always adds "▁", so text that starts with a space differs (see the module docstring)."""
    lines = [line for line in held_out + ADVERSARIAL if not line.startswith((" ", "▁", "<|"))]  # sp adds "▁"
    lines = [line for line in lines if not any(s in line for s in ("<s>", "</s>", "<unk>"))]  # plain text for sp
    assert len(lines) > 2000
    assert [tok.encode(line, allowed_special="all") for line in lines] == sp.encode(lines)


def test_special_tokens_follow_tiktoken_rules(tok):
    with pytest.raises(ValueError, match="disallowed special token '<s>'"):
        tok.encode("a<s>b")
    assert tok.encode("a<s>b", disallowed_special=()) == tok.encode_ordinary("a<s>b")
    assert tok.encode("a<s>b", allowed_special={"<s>"}) == [*tok.encode("a"), 1, tok.token_to_id("b")]  # no "▁b"
    assert 1 not in tok.encode_ordinary("<s>") and tok.decode(tok.encode_ordinary("<s>")) == "<s>"
    assert tok.encode("lone \ud800 surrogate") == tok.encode("lone \ufffd surrogate")  # as tiktoken fixes it


def test_streaming_adds_up_to_decode(tok, held_out):
    text = "\n".join(held_out[:200]) + " 👨‍👩‍👧‍👦 日本語 é"
    ids = tok.encode(text)
    stream = SentencePieceIncrementalDecoder(tok)
    for _ in range(2):  # the decoder is reusable after flush
        assert "".join(stream.add(i) for i in ids) + stream.flush() == tok.decode(ids) == text
    plain = IncrementalDecoder(tok)  # the continuation of a prompt keeps its leading space
    assert "".join(plain.add(i) for i in ids) + plain.flush() == tok.decode_bytes(ids).decode() == " " + text


def test_add_bos_token(files, tok, hf, sp):
    import transformers

    text = "Full fathom five thy father lies"
    assert encode_prompt(tok, text) == hf.encode(text) == [1, *tok.encode(text)]
    path = files["no_bos"]
    no_bos = lmforge.load_tokenizer(path)
    assert not no_bos.add_bos_token
    assert encode_prompt(no_bos, text) == tok.encode(text)
    assert transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).encode(text) == tok.encode(text)
    default = plain(gguf_metadata(sp, **{"tokenizer.ggml.add_bos_token": None}))
    assert tokenizer_from_gguf(default, "test").add_bos_token  # llama.cpp's default for a 'llama' vocabulary


def test_without_space_prefix(files, hf, held_out):
    """transformers ignores add_space_prefix = false; its tokenizer with the prefix turned off is the reference."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers

    ref = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    ref.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = lmforge.load_tokenizer(files["no_prefix"])
    assert not tok.add_space_prefix
    for text in [*ADVERSARIAL, *held_out[:500], "\n".join(held_out)]:
        ids = tok.encode(text, allowed_special="all")
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False) == text.replace("▁", " ")


def test_chat_template_matches_transformers(tok, hf):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]  # fmt: skip
    for gen in (False, True):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == text
        want = hf.apply_chat_template(messages, add_generation_prompt=gen, return_dict=True)["input_ids"]
        assert tok.apply_chat_template(messages, add_generation_prompt=gen) == want
    chat = tok.apply_chat_template(messages[:3], return_assistant_mask=True)
    assert tok.decode([i for i, m in zip(chat.input_ids, chat.assistant_mask, strict=True) if m]) == "Hello.<|im_end|>"
    # a template that starts with plain text: its first token carries the prefix "▁" the text lacks
    plain = "{% for m in messages %}{{ m['role'] }}: {% generation %}{{ m['content'] }}{% endgeneration %}\n"
    plain += "{% endfor %}"
    chat = tok.apply_chat_template(messages[:3], return_assistant_mask=True, chat_template=plain)
    masked = [i for i, m in zip(chat.input_ids, chat.assistant_mask, strict=True) if m]
    assert tok.decode(masked) == "Be brief. Hi! Hello."  # the three contents, each token starting with "▁"


def test_metadata_errors(sp):
    meta = plain(gguf_metadata(sp))
    with pytest.raises(ValueError, match=r"f\.gguf: tokenizer\.ggml\.scores has 1999 entries for 2000 tokens"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.scores": meta["tokenizer.ggml.scores"][:-1]}, "f.gguf")
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.scores is missing"):
        tokenizer_from_gguf({k: v for k, v in meta.items() if k != "tokenizer.ggml.scores"}, "f.gguf")
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.token_type has 3 entries"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.token_type": [1, 1, 1]}, "f.gguf")
    with pytest.warns(UserWarning, match=r"tokenizer\.ggml\.padding_token_id=5000"):
        assert tokenizer_from_gguf({**meta, "tokenizer.ggml.padding_token_id": 5000}, "f.gguf").pad_token is None


def test_pickle_and_batches(tok, held_out):
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("\n".join(held_out[:300])) == tok.encode("\n".join(held_out[:300]))
    assert tok.encode_batch(held_out[:50]) == [tok.encode(t) for t in held_out[:50]]


def test_highest_score_merges_first():
    """A hand-computed case: "bc" outscores "ab", so "abc" is "a" + "bc" although "ab" is further left."""
    tok = SentencePieceTokenizer(["a", "b", "c", "ab", "bc"], [-9, -9, -9, -2, -1], add_space_prefix=False)
    assert tok.encode("abc") == [0, 4] and tok.encode("abcabc") == [0, 4, 0, 4]
    tok = SentencePieceTokenizer(["a", "b", "c", "bc", "ab"], [-9, -9, -9, -1, -1], add_space_prefix=False)
    assert tok.encode("abc") == [0, 3]  # a tie: transformers' rank takes the piece listed first (llama.cpp: "ab")


def test_unknown_character_without_byte_pieces():
    """sentencepiece's rule: one unknown piece per run of unknown characters (transformers drops them)."""
    tok = SentencePieceTokenizer(["<unk>", "▁", "a", "▁a"], [0, -1, -2, -0.5], [2, 1, 1, 1])
    assert tok.encode("xxa") == [1, 0, 2] and tok.encode("a x") == [3, 1, 0] and tok.encode("ax😀y") == [3, 0]
    with pytest.raises(ValueError, match="has no piece, no byte pieces"):
        SentencePieceTokenizer(["▁", "a"], [0, -1]).encode("x")


def naive_spm(text: str, pieces: list[str], scores: list[float]) -> list[int]:
    """llama.cpp's rule spelled out: merge the adjacent pair that forms the best-scoring piece, leftmost first."""
    if not text:
        return []
    score = dict(zip(pieces, scores, strict=True))
    symbols = list("▁" + text.replace(" ", "▁") if not text.startswith(" ") else text.replace(" ", "▁"))
    while True:
        found = [(score[s + t], -i) for i, (s, t) in enumerate(itertools.pairwise(symbols)) if s + t in score]
        if not found:
            return [pieces.index(s) for s in symbols]
        i = -max(found)[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]


def transformers_bpe(pieces: list[str], scores: list[float]):
    """What transformers' GGUF loader builds for a 'llama' vocabulary (LlamaTokenizer's pipeline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers.tokenization_utils_base import generate_merges

    vocab = {p: i for i, p in enumerate(pieces)}
    merges = generate_merges(vocab, dict(zip(pieces, scores, strict=True)))
    ref = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    ref.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return ref


def test_random_vocabularies_with_pieces_across_spaces():
    """Pieces with "▁" anywhere (the per-segment cache must not cut there), scores unique or tied: against
    transformers' merges and, where the scores are unique, llama.cpp's rule spelled out."""
    rng = random.Random(0)
    alphabet = "ab▁c"
    for trial in range(30):
        pieces = list(alphabet) + sorted({"".join(rng.choices(alphabet, k=rng.randint(2, 5))) for _ in range(40)})
        rng.shuffle(pieces)
        unique = trial % 2 == 0
        n = len(pieces)
        scores = [-float(i) for i in (rng.sample(range(n), n) if unique else rng.choices(range(4), k=n))]
        tok, ref = SentencePieceTokenizer(pieces, scores), transformers_bpe(pieces, scores)
        for _ in range(20):
            text = "".join(rng.choices("ab c", k=rng.randint(0, 30)))
            ids = tok.encode(text)
            assert ids == ref.encode(text, add_special_tokens=False).ids, (pieces, scores, text)
            assert not unique or ids == naive_spm(text, pieces, scores), (pieces, scores, text)


def test_gguf_export_writes_the_vocabulary_back(tok, tmp_path):
    """A model exported with this tokenizer: transformers and lmforge read the same ids from the new file."""
    import transformers

    cfg = ModelConfig(vocab_size=tok.vocab_size + 16, d_model=64, n_layers=1, n_heads=4, d_ff=96, max_seq_len=64)
    save_gguf(Transformer(cfg), tok, tmp_path / "m.gguf", "q8_0")
    back = lmforge.load_tokenizer(tmp_path / "m.gguf")
    assert isinstance(back, SentencePieceTokenizer) and back.pieces[: len(tok.pieces)] == tok.pieces
    assert (back.scores[: len(tok.pieces)], back.bos_token, back.chat_template) == (tok.scores, "<s>", CHATML)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = (DATA / HELD_OUT).read_text()[:20_000]
    assert back.encode(text) == tok.encode(text) == ref.encode(text, add_special_tokens=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert model.config.vocab_size == cfg.vocab_size and torch.isfinite(model.lm_head.weight).all()
