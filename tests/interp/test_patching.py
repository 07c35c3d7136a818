"""Activation patching grids against TransformerLens's patching module (one run per patch there)."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching as tl_patching

from lmforge.interp.patching import PatchingError, logit_diff, patch_heads, patch_residual

TOL = {"atol": 1e-5, "rtol": 1e-5}
METRIC = logit_diff(5, 11)


@pytest.fixture(scope="module")
def corrupted(tokens):
    ids = tokens.clone()
    ids[:, 3] = (ids[:, 3] + 1) % 97
    ids[:, 6] = (ids[:, 6] + 5) % 97
    return ids


@pytest.mark.parametrize("point", ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"])
def test_residual_patching_matches_transformer_lens(pair, tokens, corrupted, point):
    model, tl = pair
    ours = patch_residual(model, tokens, corrupted, METRIC, point=point, batch_size=5)
    _, clean_cache = tl.run_with_cache(tokens)
    if point == "resid_post":  # TransformerLens has no resid_post grid: its resid_pre of the next layer, and the end
        pre = tl_patching.get_act_patch_resid_pre(tl, corrupted, clean_cache, METRIC)
        assert torch.equal(ours[:-1], patch_residual(model, tokens, corrupted, METRIC, batch_size=5)[1:])
        torch.testing.assert_close(ours[:-1], pre[1:].to(ours.dtype), **TOL)
        return
    theirs = getattr(tl_patching, f"get_act_patch_{point}")(tl, corrupted, clean_cache, METRIC)
    assert ours.shape == (model.config.n_layers, tokens.shape[1])
    torch.testing.assert_close(ours, theirs.to(ours.dtype), **TOL)
    assert ours.std() > 1e-3  # a grid with structure


@pytest.mark.parametrize("by_position", [False, True])
def test_head_patching_matches_transformer_lens(pair, tokens, corrupted, by_position):
    model, tl = pair
    ours = patch_heads(model, tokens, corrupted, METRIC, by_position=by_position, batch_size=16)
    _, clean_cache = tl.run_with_cache(tokens)
    kind = "by_pos" if by_position else "all_pos"
    theirs = getattr(tl_patching, f"get_act_patch_attn_head_out_{kind}")(tl, corrupted, clean_cache, METRIC)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), **TOL)


def test_patching_invariants(pair, tokens, corrupted):
    """Positions where the prompts agree change nothing at the first layer; batching does not change the grid."""
    model, _ = pair
    grid = patch_residual(model, tokens, corrupted, METRIC, batch_size=1)
    clean, dirty = METRIC(model(tokens)), METRIC(model(corrupted))
    same = [p for p in range(tokens.shape[1]) if p not in (3, 6)]
    torch.testing.assert_close(grid[0, same], dirty.expand(len(same)).float(), atol=1e-9, rtol=0)
    assert abs(grid[0, 3] - dirty) > 1e-3  # the position that differs matters
    torch.testing.assert_close(patch_residual(model, tokens, corrupted, METRIC, batch_size=64), grid, atol=1e-9, rtol=0)
    # the last position's output of the last block is everything the metric (on the last position) reads
    last = patch_residual(model, tokens, corrupted, METRIC, point="resid_post")
    torch.testing.assert_close(last[-1, -1], clean.float(), atol=1e-9, rtol=0)


def test_pairs_of_different_lengths_are_errors(pair, tokens):
    model, _ = pair
    with pytest.raises(PatchingError, match="clean prompt has 9 tokens and the corrupted one 8"):
        patch_residual(model, tokens, tokens[:, :8], METRIC)
    with pytest.raises(PatchingError, match="clean_ids has 2 prompts and corrupted_ids 1"):
        patch_heads(model, tokens, tokens[:1], METRIC)
    with pytest.raises(PatchingError, match="point must be one of"):
        patch_residual(model, tokens, tokens, METRIC, point="resid")
