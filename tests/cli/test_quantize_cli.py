"""`lmforge quantize`: every method through the command line, what it writes runs quantized, and every option a
method cannot take is refused before any work (nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import lmforge
from lmforge.cli import app
from lmforge.quant.llm_int8 import Int8Linear
from lmforge.quant.modules import quantized_layers
from lmforge.quant.smoothquant import W8A8Linear
from lmforge.quant.weight_only import QuantLinear

runner = CliRunner()
CALIB = ["--calib-samples", "4", "--calib-len", "32"]
PROJECTIONS = 2 * 7


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize(("method", "extra", "kind", "bits"), [
    ("int8", [], QuantLinear, 8),
    ("rtn", ["--group-size", "32"], QuantLinear, 4),
    ("rtn", ["--bits", "8", "--group-size", "0", "--symmetric"], QuantLinear, 8),
    ("gptq", ["--group-size", "32", "--act-order", *CALIB], QuantLinear, 4),
    ("awq", ["--group-size", "32", *CALIB], QuantLinear, 4),
    ("llm-int8", [], Int8Linear, 8),
    ("smoothquant", [*CALIB], W8A8Linear, 8),
])  # fmt: skip
def test_each_method_writes_a_model_that_loads_quantized(tmp_path, model_dir, calib, method, extra, kind, bits):
    out = tmp_path / "q"
    args = ["quantize", str(model_dir), "--method", method, "--out", str(out), *extra]
    if "--calib-len" in extra:
        args += ["--calib", str(calib)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"{PROJECTIONS} layers at" in result.stdout and "bits per weight" in result.stdout
    model, tok = lmforge.load(out)
    layers = quantized_layers(model)
    assert len(layers) == PROJECTIONS and {type(m) for m in layers.values()} == {kind}
    if kind is QuantLinear:
        assert {m.bits for m in layers.values()} == {bits}
    float_model, _ = lmforge.load(model_dir)
    ids = torch.tensor([tok.encode("To be, or not to be")])
    want, got = logits(float_model, ids), logits(model, ids)
    assert ((got - want).norm() / want.norm()).item() < (0.05 if bits == 8 else 0.3)
    generated = runner.invoke(app, ["generate", str(out), "--prompt", "To be", "--max-tokens", "4"])
    assert generated.exit_code == 0, generated.output


@pytest.mark.parametrize("method", ["q8_0", "q4_0"])
def test_gguf_types_write_a_gguf_file(tmp_path, model_dir, method):
    out = tmp_path / "m.gguf"
    result = runner.invoke(app, ["quantize", str(model_dir), "--method", method, "--out", str(out)])
    assert result.exit_code == 0, result.output
    model, _ = lmforge.load(out, quantized=True)
    assert quantized_layers(model)


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "nope"], "--method='nope': choose one of int8, llm-int8, gptq"),
    (["--method", "rtn", "--bits", "3"], "--bits=3: rtn packs 4- or 8-bit codes"),
    (["--method", "rtn", "--group-size", "48"], "--group-size=48: does not divide the 32 input features of blocks.0"),
    (["--method", "rtn", "--group-size", "-4"], "--group-size=-4: must be a positive number"),
    (["--method", "int8", "--bits", "4"], "--bits=4: int8 takes no --bits"),
    (["--method", "llm-int8", "--group-size", "64"], "--group-size=64: llm-int8 takes no --group-size"),
    (["--method", "awq", "--act-order"], "--act-order: is GPTQ's option, not awq's"),
    (["--method", "awq", "--symmetric"], "--symmetric: is an option of rtn and gptq, not awq"),
    (["--method", "gptq", "--group-size", "32"], "--method=gptq: needs calibration text (--calib FILE)"),
    (["--method", "gptq", "--group-size", "32", "--calib-len", "1024", "--calib", "CALIB"],
     "--calib-len=1024: longer than the model's"),
    (["--method", "gptq", "--group-size", "32", "--calib-samples", "500", "--calib", "CALIB"], "calibration data has"),
    (["--method", "rtn", "--group-size", "32", "--calib", "CALIB"], "--method=rtn: takes no calibration text"),
    (["--method", "gptq", "--calib", "missing.txt"], "--calib=missing.txt: no such file"),
    (["--method", "q4_0", "--bits", "4"], "--bits=4: q4_0 takes no --bits (the format fixes them)"),
    (["--method", "int8", "--format", "hf"], "--format=hf: the Hugging Face layouts (GPTQ, AWQ) hold rtn, gptq and"),
    (["--method", "rtn", "--format", "gguf"], "--format=gguf: 'lmforge' or 'hf'"),
    (["--method", "awq", "--bits", "8", "--group-size", "32", "--format", "hf", "--calib", "CALIB"],
     "AWQ's GEMM layout holds 4-bit"),
])  # fmt: skip
def test_bad_options_are_refused_before_any_work(tmp_path, model_dir, calib, extra, message):
    out = tmp_path / ("m.gguf" if "q4_0" in extra else "q")
    extra = [str(calib) if a == "CALIB" else a for a in extra]
    result = runner.invoke(app, ["quantize", str(model_dir), "--out", str(out), *extra])
    assert result.exit_code == 1 and message in " ".join(result.stderr.split()), result.output
    assert not out.exists()


@pytest.mark.parametrize(("method", "extra"), [("rtn", []), ("gptq", CALIB), ("awq", CALIB)])
def test_format_hf_writes_the_gptq_or_awq_checkpoint_layout(tmp_path, model_dir, calib, method, extra):
    out = tmp_path / "q"
    calibration = ["--calib", str(calib)] if extra else []
    result = runner.invoke(app, ["quantize", str(model_dir), "--method", method, "--group-size", "32", "--format",
                                 "hf", "--out", str(out), *extra, *calibration])  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == ("awq" if method == "awq" else "gptq") and config["group_size"] == 32
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {"model.layers.1.mlp.down_proj.qweight", "model.layers.1.mlp.down_proj.scales"} <= names
    assert (out / "tokenizer.json").is_file()


def test_the_output_kind_must_fit_the_method(tmp_path, model_dir):
    gguf = runner.invoke(app, ["quantize", str(model_dir), "--method", "rtn", "--out", str(tmp_path / "m.gguf")])
    assert gguf.exit_code == 1 and "writes a model directory" in " ".join(gguf.stderr.split())
    plain = runner.invoke(app, ["quantize", str(model_dir), "--method", "q4_1", "--out", str(tmp_path / "d")])
    assert plain.exit_code == 1 and "writes a .gguf file" in " ".join(plain.stderr.split())
