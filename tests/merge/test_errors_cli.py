"""Bad configs and incompatible models are refused before any work, with one LmforgeError naming the file, key or
tensor; the output directory is untouched. And the `lmforge merge` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lmforge
from lmforge.cli.errors import reports_errors
from lmforge.cli.merge import merge_command
from lmforge.merge import MergeConfigError, merge, parse_config
from lmforge.utils.errors import LmforgeError
from merge_reference import read_weights


def _ties(models: dict[str, Path], ft2: Path | None = None) -> dict:
    return {"merge_method": "ties", "base_model": str(models["base"]), "models": [
        {"model": str(models["ft1"]), "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": str(ft2 or models["ft2"]), "parameters": {"weight": 0.5, "density": 0.5}}]}  # fmt: skip


def _altered(models: dict[str, Path], tmp_path: Path, edit) -> Path:
    """A copy of ft2 with its weights (or config) edited."""
    copy = tmp_path / "altered"
    shutil.copytree(models["ft2"], copy)
    weights = load_file(copy / "model.safetensors")
    edit(copy, weights)
    save_file(weights, copy / "model.safetensors")
    return copy


def _refused(config: dict, tmp_path: Path, *needles: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(LmforgeError) as e:
        merge(parse_config(config, "cfg.yml"), out, progress=False)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert not out.exists()


def test_missing_tensor(models: dict[str, Path], tmp_path: Path) -> None:
    ft2 = _altered(models, tmp_path, lambda d, w: w.pop("model.layers.1.mlp.up_proj.weight"))
    _refused(_ties(models, ft2), tmp_path, str(ft2), "'model.layers.1.mlp.up_proj.weight'")


def test_shape_mismatch(models: dict[str, Path], tmp_path: Path) -> None:
    def edit(d: Path, w: dict) -> None:
        w["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)

    ft2 = _altered(models, tmp_path, edit)
    _refused(_ties(models, ft2), tmp_path, "'model.layers.0.self_attn.o_proj.weight'", "(64, 32)", "(64, 64)")


def test_architecture_mismatch(models: dict[str, Path], tmp_path: Path) -> None:
    def edit(d: Path, w: dict) -> None:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))

    ft2 = _altered(models, tmp_path, edit)
    _refused(_ties(models, ft2), tmp_path, "config.json", "model_type", "'mistral'", "'llama'")


def test_tokenizer_mismatch(models: dict[str, Path], tmp_path: Path) -> None:
    tok = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}, "added_tokens": []}
    roots = {}
    for name in ("base", "ft1", "ft2"):
        roots[name] = tmp_path / name
        shutil.copytree(models[name], roots[name])
        vocab = {"a": 0, "c": 1} if name == "ft2" else tok["model"]["vocab"]
        (roots[name] / "tokenizer.json").write_text(json.dumps({**tok, "model": {**tok["model"], "vocab": vocab}}))
    _refused(_ties(roots), tmp_path, str(roots["ft2"] / "tokenizer.json"), "vocabulary")


@pytest.mark.parametrize(("edit", "needles"), [
    ({"tokenizer_source": "union"}, ["tokenizer_source", "not supported"]),
    ({"merge_method": "frankenstein"}, ["merge_method", "'frankenstein'"]),
    ({"parameters": {"desnity": 0.5}}, ["'desnity'", "not a parameter of ties"]),
    ({"dtype": "float8"}, ["dtype", "'float8'"]),
    ({"base_model": None}, ["ties needs a base model"]),
    ({"parameters": {"normalize": "yes"}}, ["'normalize'", "true or false"]),
    ({"parameters": {"lambda": [{"filter": "mlp", "value": {"x": 1}}]}}, ["lambda", "filter"]),
])  # fmt: skip
def test_bad_config(models: dict[str, Path], tmp_path: Path, edit: dict, needles: list[str]) -> None:
    _refused({**_ties(models), **edit}, tmp_path, "cfg.yml", *needles)


def test_missing_weight_and_input_count(models: dict[str, Path], tmp_path: Path) -> None:
    config = {"merge_method": "linear", "models": [{"model": str(models["ft1"])}, {"model": str(models["ft2"])}]}
    _refused(config, tmp_path, "'weight' is required")
    slerp = {"merge_method": "slerp", "base_model": str(models["base"]), "parameters": {"t": 0.5},
             "models": [{"model": str(models["ft1"])}, {"model": str(models["ft2"])}]}  # fmt: skip
    _refused(slerp, tmp_path, "slerp merges 2 models", "got 3")
    sliced = {"merge_method": "linear", "parameters": {"weight": 1.0},
              "slices": [{"sources": [{"model": str(models["ft1"]), "layer_range": [0, 3]}]}]}  # fmt: skip
    _refused(sliced, tmp_path, "has no layer 2")
    with pytest.raises(MergeConfigError, match="not a model directory"):
        merge(parse_config({**_ties(models), "base_model": str(tmp_path / "nowhere")}), tmp_path / "o", progress=False)


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("merge")(reports_errors(merge_command))
    app.command("other")(lambda: None)  # two commands: `merge` stays a subcommand, as in lmforge's app
    return app


def test_cli_merge_writes_a_model_lmforge_and_transformers_load(models: dict[str, Path], tmp_path: Path) -> None:
    import transformers as T

    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump({**_ties(models), "out_dtype": "bfloat16"}))
    out = tmp_path / "merged"
    result = CliRunner().invoke(_app(), ["merge", str(config), "--out", str(out), "--shard-size", "0.0001"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    assert (out / "model.safetensors.index.json").is_file()  # 0.0001 GiB shards: several files
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "generation_config.json").read_bytes() == (models["base"] / "generation_config.json").read_bytes()
    hf = T.LlamaForCausalLM.from_pretrained(out)
    assert next(hf.parameters()).dtype == torch.bfloat16
    net, _ = lmforge.load(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        ref = hf.float()(ids).logits
        torch.testing.assert_close(net(ids).float(), ref, atol=1e-4, rtol=1e-4)
    weights = read_weights(out)
    assert weights["model.norm.weight"].dtype == torch.bfloat16


def test_cli_reports_errors(models: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "bad.yml"
    config.write_text(yaml.safe_dump({**_ties(models), "parameters": {"desnity": 1}}))
    result = CliRunner().invoke(_app(), ["merge", str(config), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "error:" in result.output and "desnity" in result.output
    result = CliRunner().invoke(_app(), ["merge", str(tmp_path / "none.yml"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no such file" in result.output


def test_registered_in_lmforge_app(models: dict[str, Path], tmp_path: Path) -> None:
    """Passes once the lead registers `merge_command` as `merge` in lmforge.cli.app."""
    from lmforge.cli import app

    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(_ties(models)))
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "model.safetensors").is_file()
