"""The logit lens against TransformerLens's final norm and unembedding over its accumulated residual stream."""

from __future__ import annotations

import pytest
import torch

from lmforge.interp.logit_lens import lens_names, logit_lens, target_probs, top_tokens
from lmforge.utils.errors import LmforgeError

TOL = {"atol": 1e-5, "rtol": 1e-5}


def test_logit_lens_matches_transformer_lens(pair, tokens):
    model, tl = pair
    ours = logit_lens(model, tokens)
    _, cache = tl.run_with_cache(tokens)
    stack = cache.accumulated_resid()  # (L + 1, B, T, d): every resid_pre, then the last resid_post
    theirs = tl.unembed(tl.ln_final(stack))
    assert ours.shape == (model.config.n_layers + 1, *tokens.shape, model.config.vocab_size)
    torch.testing.assert_close(ours, theirs, **TOL)
    probs = torch.softmax(theirs, dim=-1)
    values, ids = top_tokens(ours, k=3)
    ref_values, ref_ids = probs.topk(3, dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(values, ref_values, **TOL)
    targets = tokens.roll(-1, dims=1)  # each position's next token
    expected = probs.gather(-1, targets.expand(len(probs), -1, -1)[..., None])[..., 0]
    torch.testing.assert_close(target_probs(ours, targets), expected, **TOL)


def test_the_last_layer_of_the_lens_is_the_model_and_positions_select(pair, tokens):
    model, _ = pair
    lens = logit_lens(model, tokens)
    assert torch.equal(lens[-1], model(tokens))
    assert lens_names(model)[0] == "blocks.0.hook_resid_pre" and len(lens_names(model)) == len(lens)
    same = {"atol": 1e-12, "rtol": 0}  # the head multiplies fewer rows: float64 rounding
    torch.testing.assert_close(logit_lens(model, tokens, positions=-1), lens[:, :, -1:], **same)
    torch.testing.assert_close(logit_lens(model, tokens, positions=[0, 4]), lens[:, :, [0, 4]], **same)
    torch.testing.assert_close(logit_lens(model, tokens, positions=slice(2, 5)), lens[:, :, 2:5], **same)
    assert torch.equal(target_probs(lens, 7), torch.softmax(lens, -1)[..., 7])


def test_bad_lens_arguments_are_errors(pair, tokens):
    model, _ = pair
    lens = logit_lens(model, tokens, positions=-1)
    with pytest.raises(LmforgeError, match=r"k must be in 1\.\.97"):
        top_tokens(lens, k=0)
    with pytest.raises(LmforgeError, match=r"targets of shape \(3,\) do not broadcast .* \(2, 1\)"):
        target_probs(lens, torch.tensor([1, 2, 3]))
    with pytest.raises(LmforgeError, match=r"target ids must be in 0..96"):
        target_probs(lens, 97)
