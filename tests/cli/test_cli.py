"""The `lmforge` command: --version, init, info, and one clear `error:` line for every user mistake.

Every command reports a mistake the same way (`lmforge.cli.errors.reports_errors`): exit status 1, exactly one line on
stderr starting with `error:`, naming the flag (`--top-p`, not `SamplingParams.top_p`) or the file, and no
traceback (CliRunner records an escaped exception as `result.exception`; a clean exit is a SystemExit).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import lmforge
from lmforge.cli import app
from lmforge.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_bpe

runner = CliRunner()


def assert_one_error(result, *names: str) -> str:
    """Exit 1, one `error:` line on stderr (returned) naming every one of `names`, no traceback."""
    assert result.exit_code == 1, result.output
    assert type(result.exception) is SystemExit, repr(result.exception)  # not an exception that escaped
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer (max_seq_len 64)."""
    text = "To be, or not to be, that is the question. " * 20
    tok = train_bpe(texts=[text], vocab_size=280, special_tokens=["<|im_start|>", "<|im_end|>"], progress=False)
    tok.eos_token = "<|im_end|>"
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=280, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=64))
    path = tmp_path_factory.mktemp("model")
    lmforge.save(model, path, tokenizer=tok)
    return path


def broken_copy(model_dir, tmp_path, name: str):
    """A copy of `model_dir` broken as `name` says; returns the copy and the file the error must name."""
    copy = tmp_path / name
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    if name == "missing_field":
        del config["hidden_size"]
        (copy / "config.json").write_text(json.dumps(config))
        return copy, "hidden_size"
    if name == "wrong_type":
        config["num_hidden_layers"] = "two"
        (copy / "config.json").write_text(json.dumps(config))
        return copy, "num_hidden_layers"
    if name == "not_json":
        (copy / "config.json").write_text("{not json")
        return copy, "config.json"
    if name == "unreadable":  # a directory where the file belongs (root reads any file, whatever its mode)
        (copy / "config.json").unlink()
        (copy / "config.json").mkdir()
        return copy, "config.json"
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # "truncated"
    return copy, "model.safetensors"


BROKEN = ["missing_field", "wrong_type", "not_json", "unreadable", "truncated"]


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
    assert "no such file or directory" in assert_one_error(result, str(tmp_path / "missing"))


def test_init_bad_preset():
    assert_one_error(runner.invoke(app, ["init", "x", "--preset", "gpt5"]), "unknown preset 'gpt5'")


@pytest.mark.parametrize("seed", [str(2**64), "-1"])
def test_init_seed_out_of_range(tmp_path, seed):
    assert_one_error(runner.invoke(app, ["init", str(tmp_path / "m"), "--seed", seed]), f"--seed={seed}")
    assert not (tmp_path / "m").exists()


def test_init_into_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    assert_one_error(runner.invoke(app, ["init", str(tmp_path / "f")]), str(tmp_path / "f"))


@pytest.mark.parametrize("broken", BROKEN)
@pytest.mark.parametrize("command", ["info", "generate", "export"])
def test_a_broken_model_file_is_one_error_naming_the_file(model_dir, tmp_path, command, broken):
    path, key = broken_copy(model_dir, tmp_path, broken)
    extra = {"info": [], "generate": ["--prompt", "To be"], "export": [str(tmp_path / "out.gguf")]}[command]
    line = assert_one_error(runner.invoke(app, [command, str(path), *extra]), key)
    assert str(path) in line  # the file is named by its path


@pytest.mark.parametrize("command", [["info"], ["generate", "--prompt", "x"], ["chat"], ["export", "out.gguf"]])
def test_a_missing_model_path(tmp_path, command):
    missing = str(tmp_path / "none")
    line = assert_one_error(runner.invoke(app, [command[0], missing, *command[1:]]), missing)
    assert "no such file" in line.lower()


def test_a_corrupt_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(60)))
    for args in (["info", str(bad)], ["info", str(bad), "--tensors"], ["generate", str(bad), "--prompt", "x"]):
        assert_one_error(runner.invoke(app, args), str(bad))


def test_a_model_without_a_tokenizer(tmp_path):
    lmforge.save(Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32)), tmp_path)
    assert_one_error(runner.invoke(app, ["generate", str(tmp_path), "--prompt", "x"]), "has no tokenizer")
    assert_one_error(runner.invoke(app, ["export", str(tmp_path), str(tmp_path / "o.gguf")]), "has no tokenizer")


GENERATE_MISTAKES = [
    (["--prompt", ""], "--prompt: is empty"),
    (["--prompt", "xq" * 40], "--prompt: has 80 tokens"),
    (["--prompt", "x", "--dtype", "foo"], "--dtype='foo'"),
    (["--prompt", "x", "--seed", str(2**64)], f"--seed={2**64}"),
    (["--prompt", "x", "--seed", "-1"], "--seed=-1"),
    (["--prompt", "x", "--temperature", "nan"], "--temperature=nan"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature=-1.0"),
    (["--prompt", "x", "--max-tokens", "-1"], "--max-tokens=-1"),
    (["--prompt", "x", "--max-tokens", "0"], "--max-tokens=0"),
    (["--prompt", "x", "--top-p", "2"], "--top-p=2.0"),
    (["--prompt", "x", "--top-k", "-5"], "--top-k=-5"),
    (["--prompt", "x", "--min-p", "inf"], "--min-p=inf"),
    (["--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty=0.0"),
    (["--prompt", "x", "--stop", ""], "--stop=['']"),
]


@pytest.mark.parametrize(("args", "named"), GENERATE_MISTAKES)
def test_generate_mistakes_name_the_flag(model_dir, args, named):
    line = assert_one_error(runner.invoke(app, ["generate", str(model_dir), *args]), named)
    assert "SamplingParams" not in line


@pytest.mark.parametrize(
    ("args", "named"),
    [(["--dtype", "float64"], "--dtype='float64'"), (["--temperature", "inf"], "--temperature=inf"),
     (["--seed", str(2**70)], f"--seed={2**70}"), (["--top-p", "-0.5"], "--top-p=-0.5"),
     (["--max-tokens", "-3"], "--max-tokens=-3")],
)  # fmt: skip
def test_chat_mistakes_name_the_flag(model_dir, args, named):
    assert_one_error(runner.invoke(app, ["chat", str(model_dir), *args], input="hi\n/exit\n"), named)


def test_chat_turn_longer_than_the_context_is_dropped_and_the_chat_goes_on(model_dir):
    args = ["chat", str(model_dir), "--max-tokens", "3", "--temperature", "0"]
    result = runner.invoke(app, args, input="xq" * 40 + "\nhi\n/exit\n")
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the conversation: has" in errors[0] and "max_seq_len" in errors[0]
    fresh = runner.invoke(app, args, input="hi\n/exit\n")
    assert result.stdout.split("> ")[2] == fresh.stdout.split("> ")[1]  # "hi" was answered without the long turn


def test_export_mistakes(model_dir, tmp_path):
    assert_one_error(runner.invoke(app, ["export", str(model_dir), str(tmp_path / "o.gguf"), "--qtype", "q3"]),
                     "--qtype='q3'")  # fmt: skip
    assert_one_error(runner.invoke(app, ["export", str(model_dir), str(tmp_path)]), "is a directory")
    assert_one_error(runner.invoke(app, ["export", str(model_dir), str(tmp_path / "no" / "o.gguf")]),
                     "no such directory")  # fmt: skip


def test_export_of_an_architecture_gguf_cannot_hold(tmp_path):
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.pretokenize import GPT2_PATTERN

    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], GPT2_PATTERN, {})
    small = dict(vocab_size=256, d_model=16, n_layers=1, n_heads=2, head_dim=8, d_ff=32)
    cfg = ModelConfig.preset("gpt2-124m").replace(**small)
    lmforge.save(Transformer(cfg), tmp_path / "m", tokenizer=tok)
    assert_one_error(runner.invoke(app, ["export", str(tmp_path / "m"), str(tmp_path / "o.gguf")]), "gpt2")


@pytest.mark.parametrize(
    ("args", "named"),
    [(["--minutes", "nan"], "--minutes=nan"), (["--minutes", "0"], "--minutes=0.0"),
     (["--stories", "0"], "--stories=0"), (["--preset", "tpu"], "--preset 'tpu'"),
     (["--data", "/nonexistent/text.txt"], "/nonexistent/text.txt")],
)  # fmt: skip
def test_speedrun_mistakes(tmp_path, args, named):
    assert_one_error(runner.invoke(app, ["speedrun", "--out", str(tmp_path / "run"), *args]), named)


def test_tokenizer_mistakes(model_dir, tmp_path):
    broken = tmp_path / "tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{oops")
    assert_one_error(runner.invoke(app, ["tokenizer", "inspect", str(broken)]), "tokenizer.json")
    assert_one_error(runner.invoke(app, ["tokenizer", "inspect", str(tmp_path / "none")]), str(tmp_path / "none"))
    text = tmp_path / "a.txt"
    text.write_text("hello")
    args = ["tokenizer", "encode", "--tokenizer", str(broken), "--input", str(text), "--out", str(tmp_path / "s")]
    assert_one_error(runner.invoke(app, args), "tokenizer.json")
    args = ["tokenizer", "train", "--input", str(tmp_path / "gone.txt"), "--out", str(tmp_path / "t")]
    assert_one_error(runner.invoke(app, args), "gone.txt")


def test_a_long_message_stays_on_one_line(model_dir):
    """rich would wrap at the terminal's width (80 in CliRunner) and eat `[...]` as markup; neither happens."""
    line = assert_one_error(runner.invoke(app, ["generate", str(model_dir), "--prompt", "xq" * 40]))
    assert len(line) > 100 and line.startswith("error: --prompt: has 80 tokens") and line.endswith("reply")
    line = assert_one_error(runner.invoke(app, ["generate", str(model_dir), "--prompt", "x", "--top-p", "7"]))
    assert line == "error: --top-p=7.0: must be in [0, 1]"


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "lmforge.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "info" in out.stdout and "init" in out.stdout


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["generate", "m", "--prompt", "hi", "--max-tokens", "abc"], ["'--max-tokens'", "lmforge generate --help"]),
        (["frobnicate"], ["No such command 'frobnicate'", "lmforge --help"]),
        (["generate"], ["Missing argument 'model'"]),
        (["info", "--bogus"], ["No such option: --bogus"]),
    ],
)
def test_parser_errors_are_one_line_too(monkeypatch, capsys, argv, words):
    """The executable (`lmforge.cli:run`) prints the parser's own usage errors as one error: line, exit 2."""
    from lmforge.cli import run

    monkeypatch.setattr(sys, "argv", ["lmforge", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]


def test_the_executable_runs_commands(monkeypatch, capsys):
    from lmforge.cli import run

    monkeypatch.setattr(sys, "argv", ["lmforge", "--version"])
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 0 and lmforge.__version__ in capsys.readouterr().out
