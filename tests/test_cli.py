"""The `lmforge` command: --version, init, info, and clear errors."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

import lmforge
from lmforge.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and lmforge.__version__ in result.stdout


def test_init_then_info(tmp_path):
    out = tmp_path / "tiny"
    assert runner.invoke(app, ["init", str(out), "--preset", "tiny"]).exit_code == 0
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0, result.stdout
    for text in ("architecture", "llama", "parameters", "1,787,008", "float32", "file size", "n_kv_heads"):
        assert text in result.stdout


def test_info_on_missing_path_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no such file or directory" in " ".join(result.stdout.split())


def test_init_bad_preset():
    result = runner.invoke(app, ["init", "x", "--preset", "gpt5"])
    assert result.exit_code == 1 and "unknown preset 'gpt5'" in result.stdout


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "lmforge.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "info" in out.stdout and "init" in out.stdout
