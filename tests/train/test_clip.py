"""train/clip.py: global-norm gradient clipping, equal to torch.nn.utils.clip_grad_norm_."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.train.clip import clip_grad_norm


def model_with_grads(seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16))
    ids = torch.randint(0, 64, (2, 8))
    (model(ids).square().mean() * scale).backward()
    return model


@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 1e6, math.inf])
def test_equal_to_torch(max_norm):
    ours, theirs = model_with_grads(), model_with_grads()
    norm = clip_grad_norm(ours.parameters(), max_norm)
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    assert torch.equal(norm, want)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_the_clipped_norm_is_max_norm_and_a_small_one_is_untouched():
    model = model_with_grads(scale=1e3)
    before = clip_grad_norm(model.parameters(), math.inf)
    assert before > 1.0
    clip_grad_norm(model.parameters(), 1.0)
    assert clip_grad_norm(model.parameters(), math.inf) == pytest.approx(1.0, rel=1e-5)
    grads = [p.grad.clone() for p in model.parameters()]
    clip_grad_norm(model.parameters(), 10.0)  # already below: unchanged (the factor is exactly 1)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


def test_no_gradients():
    assert clip_grad_norm([torch.zeros(3, requires_grad=True)], 1.0).item() == 0.0
