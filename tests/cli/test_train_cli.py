"""`lmforge train`: config + shards -> a run directory with logs, checkpoints and an exported model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import lmforge
from lmforge.cli import app
from lmforge.data.shards import write_shards
from lmforge.data.stories import write_corpus
from lmforge.tokenizer import train_bpe

runner = CliRunner()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_corpus(root / "text", n_stories=600, seed=0, per_file=100)
    files = sorted((root / "text").iterdir())
    tok = train_bpe(files=files, vocab_size=400, special_tokens=["<|endoftext|>"], progress=False, workers=1)
    tok.eos_token = "<|endoftext|>"
    tok.save(root / "tok")
    write_shards(tok, files, root / "shards", workers=1, progress=False)
    return root


def args(shards, out, *extra: str) -> list[str]:
    sets = {
        "data.shards": f'"{shards / "shards"}"', "data.tokenizer": f'"{shards / "tok"}"', "data.seq_len": "64",
        "data.batch_size": "4", "model.vocab_size": "512", "model.d_model": "64", "model.n_layers": "2",
        "model.d_ff": "128", "model.max_seq_len": "64", "train.max_steps": "30", "train.eval_every": "15",
        "train.eval_steps": "2", "train.log_every": "5", "train.out_dir": f'"{out}"', "schedule.warmup_steps": "5",
        "optim.lr": "3e-3",
    }  # fmt: skip
    return ["train", *[f"--set={k}={v}" for k, v in sets.items()], *extra]


def test_train_writes_a_run_that_generate_can_use(shards, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, args(shards, out))
    assert result.exit_code == 0, result.output
    assert (out / "config.toml").exists() and (out / "loss.png").exists()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert [r["step"] for r in records if "val_bpb" in r] == [15, 30]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000030.pt"]
    (hf, hf_tok), (gguf, gguf_tok) = lmforge.load(out / "hf"), lmforge.load(out / "model.gguf")
    ids = lmforge.load_tokenizer(shards / "tok").encode("Once upon a time")
    assert hf_tok.encode("Once upon a time") == gguf_tok.encode("Once upon a time") == ids
    with torch.no_grad():
        torch.testing.assert_close(gguf(torch.tensor([ids])), hf(torch.tensor([ids])), rtol=0, atol=0.05)  # F16
    gen = runner.invoke(app, ["generate", str(out / "model.gguf"), "--prompt", "Once upon a time", "--max-tokens", "8"])
    assert gen.exit_code == 0 and gen.stdout.strip(), gen.output
    again = runner.invoke(app, args(shards, out))  # resumes at step 30: nothing left to train
    assert again.exit_code == 0 and "step 30" in again.stderr


def test_config_errors_name_the_field(shards, tmp_path):
    result = runner.invoke(app, args(shards, tmp_path / "r", "--set", "optim.lrr=1"))
    assert result.exit_code == 1 and "optim.lrr" in result.stderr and "lr" in result.stderr
    result = runner.invoke(app, ["train", "--set", f'train.out_dir="{tmp_path}"'])
    assert result.exit_code == 1 and "data.shards" in result.stderr


@pytest.mark.parametrize("method", ["qat", "bitnet"])
def test_quantization_aware_training_exports_the_weights_it_trained(shards, tmp_path, method):
    """[quant]: the blocks' projections train as QAT (4-bit, groups of 32) or BitNet b1.58 layers over the model's
    own parameters (the checkpoint has the plain names), and the export holds the quantized weights baked in:
    the checkpoint's latent weights put through the same layers."""
    from lmforge.model.transformer import Transformer
    from lmforge.train.checkpoint import load_checkpoint
    from lmforge.train.config import load_train_config
    from lmforge.train.run import baked

    out = tmp_path / "run"
    quant = ["--set=quant.bits=4", "--set=quant.group_size=32"] if method == "qat" else []
    quick = ["--set=train.max_steps=10", "--set=train.eval_every=10", f"--set=quant.method={method}", *quant]
    result = runner.invoke(app, args(shards, out, *quick))
    assert result.exit_code == 0, result.output
    cfg = load_train_config(out / "config.toml")
    assert cfg.quant.method == method
    latent = Transformer(cfg.model)
    load_checkpoint(out / "checkpoints" / "step_00000010.pt", latent, restore_rng=False)
    want = baked(latent, cfg.quant).state_dict()
    exported, _ = lmforge.load(out / "hf")
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)
    weight = exported.blocks[0].mlp.up_proj.weight
    if method == "bitnet":
        assert torch.unique(weight).numel() <= 3  # ternary: {-s, 0, s}
    else:  # on its own 4-bit grid: fake-quantizing it again changes nothing
        from lmforge.quant.qat import FakeQuantLinear

        again = FakeQuantLinear(torch.nn.Parameter(weight.detach().clone()), bits=4, group_size=32)
        torch.testing.assert_close(again.fake_quantized_weight().detach(), weight, rtol=1e-6, atol=1e-7)


def test_quant_options_belong_to_their_method(shards, tmp_path):
    result = runner.invoke(app, args(shards, tmp_path / "r", "--set=quant.method=bitnet", "--set=quant.bits=2"))
    assert result.exit_code == 1 and "quant.bits" in result.stderr and "'qat'" in " ".join(result.stderr.split())
    result = runner.invoke(app, args(shards, tmp_path / "r", "--set=quant.method=gptq"))
    assert result.exit_code == 1 and "quant.method" in result.stderr
    result = runner.invoke(app, args(shards, tmp_path / "r", "--set=quant.method=qat", "--set=quant.group_size=48"))
    assert result.exit_code == 1 and "group_size" in result.stderr


def losses_of(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_equals_one_process(shards, tmp_path, strategy):
    """`torchrun --nproc_per_node=2 -m lmforge train`: 2 ranks x 2 rows reproduce 1 process x 4 rows, and rank 0
    exports the whole model (under FSDP2 the shards are gathered first)."""
    import os
    import subprocess
    import sys

    quick = ["--set=train.max_steps=8", "--set=train.eval_every=0", "--set=train.log_every=1"]
    one = runner.invoke(app, args(shards, tmp_path / "one", *quick))
    assert one.exit_code == 0, one.output
    two = args(shards, tmp_path / "two", *quick, "--set=data.batch_size=2", f"--set=dist.strategy={strategy}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge", *two]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses_of(tmp_path / "two") == pytest.approx(losses_of(tmp_path / "one"), abs=1e-5)
    assert (tmp_path / "two" / "model.gguf").exists()  # rank 0 exported
    one_model, _ = lmforge.load(tmp_path / "one" / "hf")
    two_model, _ = lmforge.load(tmp_path / "two" / "hf")
    two_weights = two_model.state_dict()
    for name, value in one_model.state_dict().items():
        torch.testing.assert_close(two_weights[name], value, rtol=0, atol=1e-5, msg=name)


def one_error_line(result) -> str:
    """The command failed with exactly one `error:` line on stderr, its last (after any progress bar), and no
    traceback; returns it."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert result.exit_code == 1 and errors == lines[-1:] and lines[-1].startswith("error: "), result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    return lines[-1]


def test_resume_refuses_a_malicious_checkpoint(shards, tmp_path):
    from lmforge.train.checkpoint import FORMAT
    from malicious import Touch  # unpickling it runs `touch MARKER`

    out, marker = tmp_path / "run", tmp_path / "MARKER"
    (out / "checkpoints").mkdir(parents=True)
    evil = {"format": FORMAT, "step": 5, "extra": Touch(marker, "os.system")}
    torch.save(evil, out / "checkpoints" / "step_00000005.pt")
    line = one_error_line(runner.invoke(app, args(shards, out)))
    assert "step_00000005.pt: not a safe checkpoint, refusing to unpickle it" in line
    assert not marker.exists()


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["--set=model.attn_scale=1e30"], "step 1: the gradient norm is nan"),  # passes the config, diverges at once
        (["--set=optim.lr=nan"], "invalid optim.lr=nan"),
        (["--set=train.seed=-1"], "invalid train.seed=-1"),
    ],
)
def test_training_and_config_errors_are_one_line(shards, tmp_path, sets, expected):
    line = one_error_line(runner.invoke(app, args(shards, tmp_path / "run", "--set=train.max_steps=8", *sets)))
    assert expected in line


def test_init_starts_a_run_from_a_trained_model(shards, tmp_path):
    from lmforge.train.run import initial_model

    first = tmp_path / "first"
    assert runner.invoke(app, args(shards, first)).exit_code == 0
    exported, _ = lmforge.load(first / "hf")
    ids = torch.tensor([lmforge.load_tokenizer(shards / "tok").encode("Once upon a time")])
    with torch.no_grad():
        want = exported(ids)
        for source in (first / "hf", first, first / "checkpoints" / "step_00000030.pt"):
            model, tok = initial_model(source)
            assert tok is not None and tok.encode("Once upon a time") == ids[0].tolist()
            assert torch.equal(model(ids), want), source
        torch.testing.assert_close(initial_model(first / "model.gguf")[0](ids), want, rtol=0, atol=0.05)

    def first_loss(out, *extra):
        plain = [a for a in args(shards, out, *extra) if not (extra and a.startswith("--set=model."))]
        result = runner.invoke(app, [*plain, "--set=train.max_steps=8", "--set=train.log_every=1"])
        assert result.exit_code == 0, result.output
        return json.loads((out / "log.jsonl").read_text().splitlines()[0])["loss"]

    assert first_loss(tmp_path / "continued", "--init", str(first / "hf")) < first_loss(tmp_path / "fresh") - 1.0
    same = runner.invoke(app, [*args(shards, tmp_path / "same", "--set=train.max_steps=8", "--init", str(first))])
    assert same.exit_code == 0, same.output  # [model] as the init model's: no conflict
    conflict = runner.invoke(app, args(shards, tmp_path / "bad", "--set=model.d_model=32", "--init", str(first)))
    assert conflict.exit_code == 1 and "drop the [model] section" in conflict.output
