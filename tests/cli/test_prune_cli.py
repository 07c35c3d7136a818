"""`lmforge prune` (cli/prune.py): each method and rule writes a model that loads with the pruned weights zero and
the rest as they were, equal to the library's `prune_model` on the same model; every bad option is refused before
any work (nothing written)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import lmforge
from lmforge.cli import app
from lmforge.quant.calibration import calibration_windows
from lmforge.quant.pruning import prune_model

runner = CliRunner()
CALIB = ["--calib-samples", "4", "--calib-len", "32"]
PROJECTIONS = 2 * 7


def linears(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize(("method", "rule", "scope"), [
    ("magnitude", {"sparsity": 0.5}, None),
    ("magnitude", {"pattern": "2:4"}, None),
    ("wanda", {"sparsity": 0.6}, "layer"),
    ("wanda", {"pattern": "2:4"}, None),
])  # fmt: skip
def test_prune_writes_the_library_result(tmp_path, model_dir, calib, method, rule, scope):
    out = tmp_path / "pruned"
    args = ["prune", str(model_dir), "--method", method, "--out", str(out)]
    for key, value in rule.items():
        args += [f"--{key}", str(value)]
    if scope:
        args += ["--scope", scope]
    if method == "wanda":
        args += ["--calib", str(calib), *CALIB]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"{PROJECTIONS} layers" in result.stdout and "% of their weights zero" in result.stdout

    want, tok = lmforge.load(model_dir, dtype=torch.float32)
    dense = {n: w.clone() for n, w in linears(want).items()}
    windows = None
    if method == "wanda":
        ids = torch.tensor(tok.encode(calib.read_text(encoding="utf-8")), dtype=torch.long)
        windows = calibration_windows(ids, 4, 32)
    prune_model(want, method, windows=windows, scope=scope, progress=False, **rule)
    got, _ = lmforge.load(out)
    expected = linears(want)
    for name, weight in linears(got).items():
        assert torch.equal(weight, expected[name]), name
        if not name.startswith("blocks."):
            assert torch.equal(weight, dense[name])  # the LM head stays dense
    zeros = sum(int((w == 0).sum()) for n, w in linears(got).items() if n.startswith("blocks."))
    total = sum(w.numel() for n, w in linears(got).items() if n.startswith("blocks."))
    assert zeros / total == pytest.approx(rule.get("sparsity", 0.5), abs=0.01)


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "nope", "--sparsity", "0.5"], "--method='nope': choose one of magnitude, wanda"),
    (["--method", "magnitude", "--sparsity", "1.5"], "--sparsity=1.5: must be a fraction of weights in (0, 1)"),
    (["--method", "magnitude", "--sparsity", "0"], "--sparsity=0.0: must be a fraction"),
    (["--method", "magnitude"], "--sparsity=None: give a sparsity or an N:M pattern"),
    (["--method", "magnitude", "--sparsity", "0.5", "--pattern", "2:4"], "give a sparsity or an N:M pattern, not"),
    (["--method", "magnitude", "--pattern", "4:2"], "--pattern='4:2': N:M keeps N of every M weights"),
    (["--method", "magnitude", "--pattern", "2-4"], "--pattern='2-4': must be N:M"),
    (["--method", "magnitude", "--pattern", "2:3"],
     "--pattern='2:3': the 32 input features of blocks.0.attn.q_proj are not a multiple of M=3"),
    (["--method", "magnitude", "--pattern", "2:4", "--scope", "row"], "--scope='row': applies to unstructured"),
    (["--method", "magnitude", "--sparsity", "0.5", "--scope", "col"], "--scope='col': choose one of row, layer"),
    (["--method", "wanda", "--sparsity", "0.5"], "--method=wanda: needs calibration text (--calib FILE)"),
    (["--method", "magnitude", "--sparsity", "0.5", "--calib", "CALIB"], "--method=magnitude: takes no calibration"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib", "missing.txt"], "--calib=missing.txt: no such file"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib", "CALIB", "--calib-len", "1024"],
     "--calib-len=1024: must be in 1 .. the model's context (256)"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib", "CALIB", "--calib-samples", "0"],
     "--calib-samples=0: needs at least 1 window"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib", "CALIB", "--calib-samples", "500"],
     "calibration data has"),
])  # fmt: skip
def test_bad_options_are_refused_before_any_work(tmp_path, model_dir, calib, extra, message):
    out = tmp_path / "pruned"
    extra = [str(calib) if a == "CALIB" else a for a in extra]
    result = runner.invoke(app, ["prune", str(model_dir), "--out", str(out), *extra])
    assert result.exit_code == 1 and message in " ".join(result.stderr.split()), result.output
    assert not out.exists()


def test_the_output_must_be_a_directory_in_an_existing_folder(tmp_path, model_dir):
    gguf = runner.invoke(app, ["prune", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--out",
                               str(tmp_path / "m.gguf")])  # fmt: skip
    assert gguf.exit_code == 1 and "writes a model directory (then `lmforge export` it" in " ".join(gguf.stderr.split())
    nowhere = runner.invoke(app, ["prune", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--out",
                                  str(tmp_path / "no" / "such")])  # fmt: skip
    assert nowhere.exit_code == 1 and "no such directory" in nowhere.stderr
