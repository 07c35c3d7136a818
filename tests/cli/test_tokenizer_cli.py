"""`lmforge tokenizer train/encode/inspect`, token shards, and tokenizers travelling with models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lmforge
from lmforge.cli import app
from lmforge.config import ModelConfig
from lmforge.data.shards import write_shards
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_bpe

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"
runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    for name in ("hamlet_gut.txt", "macbeth_gut.txt"):
        (d / name).write_text((DATA / name).read_text()[:60_000])
    return sorted(d.glob("*.txt"))


def test_train_inspect_encode(tmp_path, small_files):
    tok_dir, shard_dir = tmp_path / "tok", tmp_path / "shards"
    held_out = DATA / "tempest_gut.txt"
    args = ["tokenizer", "train", "--input", *map(str, small_files), "--vocab-size", "600"]
    args += ["--special-token", "<|endoftext|>", "--out", str(tok_dir), "--held-out", str(held_out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "bytes/token" in result.output
    assert {p.name for p in tok_dir.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "tokenizer.tiktoken"}

    result = runner.invoke(app, ["tokenizer", "inspect", str(tok_dir), "--sample", str(held_out)])
    assert result.exit_code == 0, result.output
    assert "600" in result.output and "<|endoftext|> (599)" in flat(result.output)
    assert "(?:[sdmt]" in result.output  # the regex is shown, not eaten as markup

    args = ["tokenizer", "encode", "--tokenizer", str(tok_dir), "--input", *map(str, small_files)]
    result = runner.invoke(app, [*args, "--out", str(shard_dir), "--shard-tokens", "5000"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["eot_id"] == 599
    ids = np.concatenate([np.load(shard_dir / s["file"], mmap_mode="r") for s in manifest["shards"]])
    tok = lmforge.load_tokenizer(tok_dir)
    want = []
    for f in small_files:
        want += [*tok.encode_ordinary(f.read_text()), 599]
    assert ids.tolist() == want
    assert all(s["tokens"] <= 5000 for s in manifest["shards"]) and manifest["total_tokens"] == len(want)


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k"])
def test_shards_equal_whole_file_encoding_for_any_cut_and_worker_count(tmp_path, small_files, pattern):
    from lmforge.tokenizer import CL100K_PATTERN, GPT2_PATTERN

    tricky = tmp_path / "tricky.txt"  # blank-line runs, CRLF and spaces: cuts must not change pre-tokens
    tricky.write_bytes(("word \r\n\n\n   \n\tx  don't 123456 " * 300).encode())
    files = [*small_files, tricky]
    regex = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN}[pattern]
    tok = train_bpe(files=small_files, vocab_size=300, pattern=regex, progress=False)
    want = [tok.encode_ordinary(f.read_bytes().decode()) for f in files]
    for workers, unit in ((1, 1 << 22), (2, 97)):
        manifest = write_shards(tok, files, tmp_path / f"s{workers}", workers=workers, progress=False, unit_chars=unit)
        got = np.concatenate([np.load(tmp_path / f"s{workers}" / s["file"]) for s in manifest["shards"]])
        assert got.tolist() == [i for ids in want for i in ids]
        assert [i["tokens"] for i in manifest["inputs"]] == [len(ids) for ids in want]


def test_cli_errors_are_clear(tmp_path, small_files):
    out = str(tmp_path / "t")
    result = runner.invoke(app, ["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--out", out])
    assert result.exit_code == 1 and "no such file or directory" in flat(result.output)
    args = ["tokenizer", "train", "--input", str(small_files[0]), "--vocab-size", "257", "--out", out]
    result = runner.invoke(app, [*args, "--special-token", "<a>", "--special-token", "<b>"])
    assert result.exit_code == 1 and "smaller than 256 bytes + 2 special tokens" in flat(result.output)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    result = runner.invoke(app, ["tokenizer", "train", "--input", str(latin1), "--out", out])
    assert result.exit_code == 1 and "line 1 is not UTF-8" in flat(result.output)
    result = runner.invoke(app, ["tokenizer", "inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 1


def test_model_and_tokenizer_travel_together(tmp_path, small_files):
    tok = train_bpe(files=small_files, vocab_size=320, special_tokens=["<|im_start|>", "<|im_end|>"], progress=False)
    model = Transformer(ModelConfig(vocab_size=320, d_model=32, n_layers=1, n_heads=2, d_ff=32))
    lmforge.save(model, tmp_path, tokenizer=tok)
    model2, tok2 = lmforge.load(tmp_path)
    text = "To be, or not to be"
    assert tok2.encode(text) == tok.encode(text)
    ids = torch.tensor([tok2.encode(text)])
    with torch.no_grad():
        assert torch.equal(model2(ids), model.eval()(ids))
    chat = tok2.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
