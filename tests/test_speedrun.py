"""`lmforge speedrun`, shortened: every stage runs and the run directory holds what the report promises."""

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
    result = runner.invoke(app, ["speedrun", "--minutes", "0.25", "--stories", "1500", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    for text in ("bits/byte", "entropy floor", "left to learn", "tokens/s", "MFU", "## Samples", "```toml"):
        assert text in report, text
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.3  # (about 40 steps on an idle 2-core machine: 6.4 -> 1.2)
    floor = float(report.split("| entropy floor | ")[1].split(" ")[0])
    bpb = [r["val_bpb"] for r in records if "val_bpb" in r][-1]
    assert 0.15 < floor < 0.3 and bpb > floor  # no model beats the grammar's entropy
    for name in ("loss.png", "config.toml", "model.gguf", "hf/config.json", "tokenizer/tokenizer.json"):
        assert (out / name).exists(), name
    model, tok = lmforge.load(out / "model.gguf")
    assert model.config.n_kv_heads == 2 and tok.encode("Once upon a time")  # GQA, and the trained tokenizer
    gen = runner.invoke(app, ["generate", str(out / "model.gguf"), "--prompt", "Once upon a time", "--max-tokens", "8"])
    assert gen.exit_code == 0 and gen.stdout.strip()
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
    bad = runner.invoke(app, ["speedrun", "--preset", "tpu", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "unknown --preset 'tpu'" in flat(bad.stderr)
    missing = runner.invoke(app, ["speedrun", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "y")])
    assert missing.exit_code == 1 and "nope.txt" in flat(missing.stderr)
