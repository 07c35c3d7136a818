"""Attention patterns against TransformerLens, and the PNG figures drawn from them."""

from __future__ import annotations

import pytest
import torch
from matplotlib.image import imread

from interp_reference import CONFIGS, random_model
from lmforge.interp.attention_maps import attention_patterns, plot_attention, plot_heatmap
from lmforge.utils.errors import LmforgeError


@pytest.fixture(scope="module")
def pattern(tokens):
    """A real (4, 9, 9) pattern: layer 1 of the tiny Llama on the first prompt."""
    return attention_patterns(random_model(CONFIGS["llama"]), tokens, 1)[0]


def test_patterns_match_transformer_lens(pair, tokens):
    model, tl = pair
    _, cache = tl.run_with_cache(tokens)
    for layer in range(model.config.n_layers):
        ours = attention_patterns(model, tokens, layer)
        torch.testing.assert_close(ours, cache[f"blocks.{layer}.attn.hook_pattern"], atol=1e-5, rtol=1e-5,
                                   check_dtype=False)  # fmt: skip
        torch.testing.assert_close(ours.sum(-1), torch.ones_like(ours.sum(-1)))
        assert ours.triu(1).abs().max() == 0  # causal


def test_plot_attention_writes_a_png_per_head_panel(pattern, tokens, tmp_path):
    labels = [f" t{i}" for i in tokens[0].tolist()]
    one, all_heads = tmp_path / "one.png", tmp_path / "sub" / "all.png"
    assert plot_attention(pattern, labels, one, heads=[2], title="layer 1") == one
    plot_attention(pattern, labels, all_heads, columns=2)
    assert one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    small, grid = imread(one), imread(all_heads)
    assert grid.shape[0] > 1.5 * small.shape[0] and grid.shape[1] > 1.5 * small.shape[1]  # 2 x 2 panels vs 1
    assert small.std() > 0.05  # something is drawn
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["all.png", "one.png", "sub"]  # no temporary files left


def test_plot_heatmap_and_bad_inputs(pattern, tokens, tmp_path):
    grid = torch.randn(3, 9, dtype=torch.float64)
    plot_heatmap(grid, tmp_path / "h.png", row_labels=["a", "b", "c"], col_labels=list("123456789"),
                 cells=[["x"] * 9] * 3, diverging=True, title="grid")  # fmt: skip
    assert imread(tmp_path / "h.png").shape[2] == 4
    with pytest.raises(LmforgeError, match="8 token labels for a pattern over 9 positions"):
        plot_attention(pattern, ["x"] * 8, tmp_path / "bad.png")
    with pytest.raises(LmforgeError, match=r"heads \[7\] out of range \(the pattern has 4\)"):
        plot_attention(pattern, ["x"] * 9, tmp_path / "bad.png", heads=[0, 7])
    with pytest.raises(LmforgeError, match=r"values of shape \(3, 9\) for 2 row and 9 column labels"):
        plot_heatmap(grid, tmp_path / "bad.png", row_labels=["a", "b"], col_labels=list("123456789"))
    with pytest.raises(LmforgeError, match=r"layer must be in 0\.\.2, got 3"):
        attention_patterns(random_model(CONFIGS["gpt2"]), tokens, 3)
    assert not (tmp_path / "bad.png").exists()
