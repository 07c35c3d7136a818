"""`lmforge distill TEACHER --student RUN.toml`: a tiny distillation end to end, and the checks made before any
training (a missing teacher, another vocabulary, flags out of range), each one `error:` line naming the flag."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import lmforge
from lmforge.cli import app
from lmforge.config import ModelConfig
from lmforge.data.shards import write_shards
from lmforge.data.stories import write_corpus
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_bpe

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Story shards, their tokenizer, and a random teacher (larger than the student) with that tokenizer."""
    root = tmp_path_factory.mktemp("distill")
    write_corpus(root / "text", n_stories=300, seed=0, per_file=100)
    files = sorted((root / "text").iterdir())
    tok = train_bpe(files=files, vocab_size=400, special_tokens=["<|endoftext|>"], progress=False, workers=1)
    tok.eos_token = "<|endoftext|>"
    tok.save(root / "tok")
    write_shards(tok, files, root / "shards", workers=1, progress=False)
    for name, vocab in (("teacher", 448), ("other", 512)):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=vocab, d_model=48, n_layers=3, n_heads=4, d_ff=96, max_seq_len=64))
        lmforge.save(model, root / name, tokenizer=tok)
    (root / "student.toml").write_text(f"""
[model]
vocab_size = 448
d_model = 32
n_layers = 2
n_heads = 4
d_ff = 64
max_seq_len = 64

[data]
shards = "{root / "shards"}"
tokenizer = "{root / "tok"}"
seq_len = 32
batch_size = 4

[train]
max_steps = 4
eval_every = 2
eval_steps = 1
log_every = 2
checkpoint_every = 0
""")
    return root


def distill(data, out, *flags: str):
    teacher = flags[0] if flags and not flags[0].startswith("-") else str(data / "teacher")
    rest = flags[1:] if flags and not flags[0].startswith("-") else flags
    sets = ["--set", f'train.out_dir="{out}"']
    return runner.invoke(app, ["distill", teacher, "--student", str(data / "student.toml"), *sets, *rest])


@pytest.mark.slow  # ~9 s on 2 busy cores: training, on-policy generation, the exports
def test_a_distillation_run_end_to_end(data, tmp_path):
    out = tmp_path / "run"
    result = distill(data, out, "--loss", "jsd", "--beta", "0.3", "--temperature", "1.5", "--alpha", "0.8",
                     "--on-policy-fraction", "0.5", "--set", "distill.prompt_tokens=8")  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    trained = [r for r in records if "divergence" in r]
    assert [r["step"] for r in trained] == [2, 4] and all(r["divergence"] > 0 and r["ce"] > 0 for r in trained)
    assert [r["step"] for r in records if "val_bpb" in r] == [2, 4]
    resolved = (out / "config.toml").read_text()
    assert 'loss = "jsd"' in resolved and "beta = 0.3" in resolved and "on_policy_fraction = 0.5" in resolved
    student, _ = lmforge.load(out / "hf")
    assert student.config.d_model == 32 and student.config.vocab_size == 448
    assert "step 4" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("missing",), "TEACHER"),
        (("other",), "vocab_size is 512"),
        (("--loss", "jsd", "--beta", "1.5"), "--beta=1.5"),
        (("--beta", "0.2"), "--beta=0.2"),  # beta is an option of --loss jsd
        (("--temperature", "0"), "--temperature=0"),
        (("--loss", "kl"), "--loss='kl'"),
    ],
)
def test_mistakes_are_refused_before_training(data, tmp_path, flags, message):
    if flags[0] in ("missing", "other"):
        flags = (str(data / flags[0]), *flags[1:])
    result = distill(data, tmp_path / "run", *flags)
    assert result.exit_code == 1 and result.stderr.startswith("error:") and message in result.stderr, result.output
    assert not (tmp_path / "run" / "log.jsonl").exists()
