"""`lmforge speedrun`, shortened: every stage runs, the run directory holds what the report promises, and the
time-driven schedule spends the budget and ends decayed (the fake-clock tests of that are in test_trainer.py)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import lmforge
from lmforge.cli import app

runner = CliRunner()


def flat(text: str) -> str:
    """The text without rich's line wrapping."""
    return " ".join(text.split())


def test_speedrun_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["speedrun", "--minutes", "0.25", "--stories", "1500", "--chat-steps", "12",
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    for text in ("bits/byte", "entropy floor", "left to learn", "tokens/s", "MFU", "## Samples", "```toml",
                 "## Chat stage", "| SFT | 12 steps (full fine-tuning)", "exact match, held-out questions | 0% before"):
        assert text in report, text
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.3  # (about 40 steps on an idle 2-core machine: 6.4 -> 1.2)
    steps = [r for r in records if "loss" in r]  # the cpu preset logs every step
    assert steps[-1]["elapsed_s"] >= 15 > steps[-2]["elapsed_s"]  # the whole budget, then the end
    progress = [r["progress"] for r in steps]
    assert progress == sorted(progress) and progress[-1] > 0.5  # (1.0 unless the last step stalls, unforeseeably,
    # on a busy machine: the fake-clock tests in test_trainer.py show the exact end at the decayed minimum)
    decay = [r["lr_factor"] for r in steps if r["progress"] >= 0.05]  # after the warmup, 5% of the budget
    assert decay == sorted(decay, reverse=True) and decay[-1] < 0.6
    assert f"| training | {len(steps):,} steps, {len(steps) * 16 * 128:,} tokens |" in report  # batch 16 x 128
    budget = report.split("| budget | ")[1].split(" |")[0]
    assert budget.startswith(f"{steps[-1]['elapsed_s']:.1f} s of 15 s (")
    assert budget.endswith(f"ended by the time budget at {progress[-1]:.0%} of the lr schedule")
    headline = dict(line.split(None, 1) for line in result.stdout.strip().splitlines()[-4:])
    assert list(headline) == ["result", "steps", "tokens", "time"]
    assert headline["result"].startswith(f"{records[-1]['val_bpb']:.4f} bits/byte, floor ")
    assert headline["steps"] == f"{len(steps):,}" and headline["tokens"] == f"{len(steps) * 16 * 128:,}"
    assert headline["time"].startswith(f"training {budget}; ")
    floor = float(report.split("| entropy floor | ")[1].split(" ")[0])
    bpb = [r["val_bpb"] for r in records if "val_bpb" in r][-1]
    assert 0.15 < floor < 0.3 and bpb > floor  # no model beats the grammar's entropy
    for name in ("loss.png", "config.toml", "model.gguf", "hf/config.json", "tokenizer/tokenizer.json",
                 "pretrained/config.json", "chat/train.jsonl", "chat/log.jsonl"):
        assert (out / name).exists(), name
    model, tok = lmforge.load(out / "model.gguf")
    assert model.config.n_kv_heads == 2 and tok.encode("Once upon a time")  # GQA, and the trained tokenizer
    gen = runner.invoke(app, ["generate", str(out / "model.gguf"), "--prompt", "Once upon a time", "--max-tokens", "8"])
    assert gen.exit_code == 0 and gen.stdout.strip()
    chat_losses = [json.loads(line)["loss"] for line in (out / "chat" / "log.jsonl").read_text().splitlines()
                   if '"loss"' in line]  # fmt: skip
    assert chat_losses[-1] < chat_losses[0]  # the SFT stage learns the answers' form
    assert tok.eot_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    story = "Mia was a big fox who lived near the lake. The end."
    chat = runner.invoke(app, ["chat", str(out / "model.gguf"), "--max-tokens", "12", "--temperature", "0"],
                         input=f"{story} Who is the story about?\n/exit\n")  # fmt: skip
    assert chat.exit_code == 0 and chat.stdout.strip(), chat.output
    again = runner.invoke(app, ["speedrun", "--minutes", "0.1", "--out", str(out)])
    assert again.exit_code == 1 and "already holds a run" in flat(again.stderr)


def test_speedrun_on_user_text_and_bad_flags(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 400)
    out = tmp_path / "run"
    result = runner.invoke(app, ["speedrun", "--minutes", "0.1", "--data", str(text), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "bits/byte" in report and "entropy floor" not in report  # unknown for real text
    assert "## Chat stage" not in report  # its questions are about the grammar's stories
    assert "ended by the time budget at " in report  # not cut by a step count mid-schedule
    assert result.stdout.strip().splitlines()[-4].startswith("result  validation loss ")  # no floor: the loss
    bad = runner.invoke(app, ["speedrun", "--preset", "tpu", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "unknown --preset 'tpu'" in flat(bad.stderr)
    missing = runner.invoke(app, ["speedrun", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "y")])
    assert missing.exit_code == 1 and "nope.txt" in flat(missing.stderr)
