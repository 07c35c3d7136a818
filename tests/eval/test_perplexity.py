"""llama.cpp's perplexity (eval/perplexity.py, `lmforge eval ppl`) against a reference written here from a tiny random
transformers Llama's logits with llama.cpp's rule (tools/perplexity/perplexity.cpp, `perplexity()`)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import lmforge
from hf_reference import VOCAB, hf_and_lmforge
from lmforge.cli import app
from lmforge.config import ModelConfig
from lmforge.eval.perplexity import (
    PerplexityInputError,
    chunk_bos,
    perplexity,
    text_perplexity,
    token_nll,
    tokenize,
)
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_bpe

runner = CliRunner()
TEXT = " ".join(
    f"{w} the {x} of {y}, and {z} it was." for w in ("When", "If", "So") for x in ("night", "storm", "king", "sea")
    for y in ("Rome", "love", "time") for z in ("thus", "still", "yet")
)  # fmt: skip


def reference(hf, ids: list[int], n_ctx: int, bos: int | None, max_chunks: int | None = None) -> dict:
    """llama.cpp's rule, token by token: chunk c = ids[c·n_ctx : (c+1)·n_ctx] with its first id set to bos; the
    logits at positions n_ctx//2 … n_ctx-2 score the next ids; PPL = exp(mean nll), ± = PPL·sqrt(var/(M-1))."""
    n_chunk = len(ids) // n_ctx if max_chunks is None else min(max_chunks, len(ids) // n_ctx)
    first, nll = n_ctx // 2, []
    for c in range(n_chunk):
        chunk = list(ids[c * n_ctx : (c + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([chunk])).logits[0].double(), dim=-1)
        nll += [-logp[j, chunk[j + 1]].item() for j in range(first, n_ctx - 1)]
    mean = sum(nll) / len(nll)
    var = sum(v * v for v in nll) / len(nll) - mean * mean
    ppl = math.exp(mean)
    return {"ppl": ppl, "nll": mean, "stderr": ppl * math.sqrt(var / (len(nll) - 1)), "tokens_scored": len(nll),
            "chunks": n_chunk, "n_ctx": n_ctx}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random transformers Llama (context 128) and lmforge's load of its saved directory."""
    return hf_and_lmforge("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def ids():
    """5 whole chunks of 32 tokens and a tail of 11 that is never scored."""
    return torch.randint(0, VOCAB, (5 * 32 + 11,), generator=torch.Generator().manual_seed(1)).tolist()


def check_equal(result, want: dict, rel: float = 1e-5) -> None:
    assert (result.tokens_scored, result.chunks, result.n_ctx) == (want["tokens_scored"], want["chunks"], want["n_ctx"])
    assert result.ppl == pytest.approx(want["ppl"], rel=rel)
    assert result.nll == pytest.approx(want["nll"], rel=rel)
    assert result.stderr == pytest.approx(want["stderr"], rel=10 * rel)


@pytest.mark.parametrize(("n_ctx", "bos"), [(32, None), (32, 3), (33, 3)])
def test_matches_transformers_with_llama_cpps_rule(models, ids, n_ctx, bos):
    hf, model = models
    result = perplexity(model, ids, n_ctx=n_ctx, bos_id=bos)
    check_equal(result, reference(hf, ids, n_ctx, bos))
    assert result.tokens_scored == result.chunks * (n_ctx - n_ctx // 2 - 1)


def test_bos_replaces_the_first_token_of_every_chunk(models, ids):
    hf, model = models
    with_bos, without = perplexity(model, ids, n_ctx=32, bos_id=3), perplexity(model, ids, n_ctx=32)
    assert abs(with_bos.ppl - without.ppl) > 1e-3 * without.ppl  # the replacement changes what the model sees
    check_equal(with_bos, reference(hf, ids, 32, 3))
    kept = [3 if i % 32 == 0 else t for i, t in enumerate(ids)]  # bos already first: the same figure
    assert perplexity(model, kept, n_ctx=32).ppl == pytest.approx(with_bos.ppl, rel=1e-12)


def test_batch_size_does_not_change_the_figure(models, ids):
    _, model = models
    one, three = (perplexity(model, ids, n_ctx=32, bos_id=3, batch_size=b) for b in (1, 3))  # batches of 3 and 2
    assert one.bits_per_byte is None  # ids without a tokenizer: no bytes to count
    assert dataclasses.astuple(three)[:6] == pytest.approx(dataclasses.astuple(one)[:6], rel=1e-6)


def test_chunk_cap(models, ids):
    hf, model = models
    check_equal(perplexity(model, ids, n_ctx=32, max_chunks=2), reference(hf, ids, 32, None, max_chunks=2))
    assert perplexity(model, ids, n_ctx=32, max_chunks=99).chunks == 5


def test_token_nll_is_llama_cpps_log_softmax():
    logits = torch.randn(4, 7, 50) * 5
    targets = torch.randint(0, 50, (4, 7))
    want = -torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    got = token_nll(logits, targets)
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_ctx": 86}, "n_ctx=86: the text has only 171 tokens; perplexity with a context of 86 needs at least "
                        "2 × n_ctx = 172"),
        ({"n_ctx": 256}, "n_ctx=256: larger than the model's max_seq_len (128)"),
        ({"n_ctx": 2}, "n_ctx=2: must be at least 3"),
        ({"n_ctx": 32, "batch_size": 0}, "batch_size=0: must be at least 1"),
        ({"n_ctx": 32, "max_chunks": 0}, "max_chunks=0: must be at least 1"),
    ],
)  # fmt: skip
def test_errors_name_the_value_before_any_forward(models, ids, monkeypatch, options, message):
    _, model = models
    monkeypatch.setattr(model, "hidden_states", lambda *a, **k: pytest.fail("a forward ran"))
    with pytest.raises(PerplexityInputError) as e:
        perplexity(model, ids, **options)
    assert str(e.value).startswith(message)


def bpe(add_bos: bool):
    tok = train_bpe(texts=[TEXT], vocab_size=300, special_tokens=["<|bos|>", "<|eos|>"], progress=False)
    tok.bos_token, tok.eos_token, tok.add_bos_token = "<|bos|>", "<|eos|>", add_bos
    return tok


def test_tokenize_as_common_tokenize_with_add_special():
    text = "When the night <|eos|> of Rome"  # a special token's text stays plain text (parse_special=false)
    tok = bpe(add_bos=True)
    bos = tok.token_to_id("<|bos|>")
    assert chunk_bos(tok) == bos
    assert tokenize(tok, text) == [bos, *tok.encode_ordinary(text)]
    assert tok.token_to_id("<|eos|>") not in tokenize(tok, text)
    plain = bpe(add_bos=False)
    assert chunk_bos(plain) is None and tokenize(plain, text) == plain.encode_ordinary(text)


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """A random 2-layer lmforge Llama (vocabulary 300, context 64) as GGUF files (F32, Q8_0) whose tokenizer adds
    bos (tokenizer.ggml.add_bos_token), as llama.cpp reads them."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64))
    directory = tmp_path_factory.mktemp("model")
    for qtype in ("f32", "q8_0"):
        lmforge.save(model, directory / f"model-{qtype}.gguf", tokenizer=bpe(add_bos=True), qtype=qtype)
    return directory / "model-f32.gguf", directory / "model-q8_0.gguf"


@pytest.fixture(scope="module")
def model_file(gguf_files):
    return gguf_files[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_cli_json_is_the_librarys_result(model_file, data):
    result = runner.invoke(app, ["eval", "ppl", str(model_file), "--data", str(data), "--ctx", "32", "--batch", "2",
                                 "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    model, tok = lmforge.load(model_file)
    assert chunk_bos(tok) is not None
    want = text_perplexity(model, tok, TEXT, n_ctx=32)
    assert want.chunks >= 3
    assert json.loads(result.stdout) == pytest.approx(dataclasses.asdict(want), rel=1e-6)
    assert "perplexity" in result.stderr  # the progress bar


def test_cli_prints_ppl_with_the_chunk_cap(model_file, data):
    result = runner.invoke(app, ["eval", "ppl", str(model_file), "--data", str(data), "--ctx", "32", "--chunks", "2"])
    assert result.exit_code == 0, result.output
    want = text_perplexity(*lmforge.load(model_file), TEXT, n_ctx=32, max_chunks=2)
    assert result.stdout.strip().splitlines() == [
        f"PPL = {want.ppl:.4f} +/- {want.stderr:.5f} ({want.tokens_scored} tokens scored in 2 chunks of 32)",
        f"bits/byte = {want.bits_per_byte:.4f} ({want.bytes_scored} bytes in the scored tokens)",
    ]


@pytest.mark.parametrize("max_chunks", [None, 2])
def test_bits_per_byte_counts_the_bytes_of_the_scored_tokens(model_file, max_chunks):
    """Σ nll of the scored tokens / ln 2 / the UTF-8 bytes those tokens decode to (positions 17 … 31 of each chunk
    of 32, counted here by hand; the nll itself is checked against transformers above)."""
    model, tok = lmforge.load(model_file)
    ids = tokenize(tok, TEXT)
    result = text_perplexity(model, tok, TEXT, n_ctx=32, max_chunks=max_chunks)
    scored = [ids[c * 32 + j] for c in range(result.chunks) for j in range(17, 32)]
    n_bytes = len(tok.decode_bytes(scored))
    assert result.tokens_scored == len(scored) and result.bytes_scored == n_bytes
    assert n_bytes > 2 * len(scored)  # tokens of several bytes
    assert result.bits_per_byte == pytest.approx(result.nll * len(scored) / math.log(2) / n_bytes, rel=1e-12)


def test_cli_errors_name_the_file_or_flag(model_file, data, tmp_path):
    def error(*args: str) -> str:
        result = runner.invoke(app, ["eval", "ppl", str(model_file), "--data", *args])
        assert result.exit_code == 1, result.output
        return " ".join(result.stderr.split())

    missing = tmp_path / "missing.txt"
    assert error(str(missing)) == f"error: {missing}: No such file or directory"
    short = tmp_path / "short.txt"
    short.write_text("When the night of Rome", encoding="utf-8")
    assert error(str(short), "--ctx", "32").startswith(f"error: {short}: tokenizes to only ")
    assert "needs at least 2 × n_ctx = 64 (--ctx=32)" in error(str(short), "--ctx", "32")
    assert error(str(data)) == "error: --ctx=512: larger than the model's max_seq_len (64)"
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"abc\xff")
    assert error(str(binary)).startswith(f"error: {binary}: not UTF-8 text")


def test_cli_quantized_gives_the_dequantized_weights_figure(gguf_files, data):
    q8 = gguf_files[1]
    result = runner.invoke(app, ["eval", "ppl", str(q8), "--data", str(data), "--ctx", "32", "--quantized", "--json"])
    assert result.exit_code == 0, result.output
    want = text_perplexity(*lmforge.load(q8, dtype=torch.float32), TEXT, n_ctx=32)  # the Q8_0 values in float32
    # the CLI runs the kernels: here every linear's 32 inputs are one Q8_0 block, one scale per row, so they take
    # the int8 kernel (bfloat16 activations): the figure within bfloat16 rounding
    assert json.loads(result.stdout) == pytest.approx(dataclasses.asdict(want), rel=1e-3)
