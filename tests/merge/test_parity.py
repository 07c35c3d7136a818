"""lmforge's merge of whole checkpoints is bit-identical (torch.equal, float32) to mergekit's on the same YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.merge import merge, parse_config
from merge_reference import mergekit_merge, read_weights


def _configs(m: dict[str, Path]) -> dict[str, dict]:
    base, ft1, ft2 = (str(m[k]) for k in ("base", "ft1", "ft2"))
    three = {"base_model": base, "models": [
        {"model": ft1, "parameters": {"weight": 0.7, "density": 0.4}},
        {"model": ft2, "parameters": {"weight": 0.5, "density": 0.6}}], "dtype": "float32"}
    return {
        "linear": {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": base, "parameters": {"weight": 0.2}}, {"model": ft1, "parameters": {"weight": 0.5}},
            {"model": ft2, "parameters": {"weight": 0.3}}]},
        "linear_unnormalized": {"merge_method": "linear", "parameters": {"normalize": False}, "models": [
            {"model": ft1, "parameters": {"weight": 0.6}}, {"model": ft2, "parameters": {"weight": 0.9}}]},
        "task_arithmetic": {**three, "merge_method": "task_arithmetic", "parameters": {"lambda": 0.8}},
        "task_arithmetic_negated": {"merge_method": "task_arithmetic", "base_model": base, "models": [
            {"model": ft1, "parameters": {"weight": -1.0}}]},
        "ties": {**three, "merge_method": "ties"},
        "ties_rescaled": {**three, "merge_method": "ties", "parameters": {"rescale": True, "normalize": False}},
        "breadcrumbs": {**three, "merge_method": "breadcrumbs", "parameters": {"gamma": 0.05}},
        "breadcrumbs_ties": {**three, "merge_method": "breadcrumbs_ties"},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": [{"model": ft1}, {"model": ft2}]},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": base, "parameters":
                                    {"filter_wise": True}, "models": [{"model": ft1}, {"model": ft2}]},
        "slerp": {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": ft1}],
                  "parameters": {"t": 0.3}},
        # mergekit's own example: per-filter gradients over the layers, a default for the rest
        "slerp_gradient": {"merge_method": "slerp", "base_model": base, "dtype": "float32",
                           "slices": [{"sources": [{"model": base, "layer_range": [0, 2]},
                                                   {"model": ft2, "layer_range": [0, 2]}]}],
                           "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                                {"value": 0.5}]}},
        # a frankenmerge-style slice list: output layers from different input layers, per-slice parameters
        "slices": {"merge_method": "linear", "slices": [
            {"sources": [{"model": ft1, "layer_range": [1, 2], "parameters": {"weight": 0.25}},
                         {"model": ft2, "layer_range": [0, 1], "parameters": {"weight": 0.75}}]},
            {"sources": [{"model": ft1, "layer_range": [0, 2]}, {"model": ft2, "layer_range": [0, 2]}],
             "parameters": {"weight": [0.1, 0.9]}}]},
        "out_dtype": {**three, "merge_method": "ties", "out_dtype": "bfloat16"},
        "bf16_ties": {**three, "merge_method": "ties", "dtype": "bfloat16"},
        "bf16_slerp": {"merge_method": "slerp", "base_model": base, "models": [{"model": ft2}], "dtype": "bfloat16",
                       "parameters": {"t": [0.2, 0.9]}},
        "bf16_linear": {"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": ft1, "parameters": {"weight": 1.0}}, {"model": ft2, "parameters": {"weight": 2.0}}]},
    }


CASES = list(_configs({"base": Path("b"), "ft1": Path("1"), "ft2": Path("2")}))


@pytest.mark.parametrize("case", CASES)
def test_bit_identical_to_mergekit(case: str, models: dict[str, Path], tmp_path: Path) -> None:
    config = _configs(models)[case]
    theirs = mergekit_merge(config, tmp_path / "mergekit")
    merge(parse_config(config, case), tmp_path / "lmforge", progress=False)
    ours = read_weights(tmp_path / "lmforge")
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype, name
        assert ours[name].equal(t), f"{case}: {name} differs by {(ours[name] - t).abs().max()}"
    ours_cfg, theirs_cfg = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("lmforge", "mergekit"))
    for key in ("num_hidden_layers", "dtype", "model_type", "hidden_size"):
        assert ours_cfg[key] == theirs_cfg[key], key
    # the merge changed something (an output equal to one input would let a no-op pass)
    for path in models.values():
        given = read_weights(path)
        assert any(not t.equal(given[n]) for n, t in ours.items() if t.shape == given[n].shape), path
