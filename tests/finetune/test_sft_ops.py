"""Token log-probabilities and entropies against torch's cross entropy and Categorical; masked reductions against
hand-computed numbers and the plain ops on the selected entries; whitening against TRL's formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.finetune import sft_ops
from lmforge.finetune.sft_ops import (
    masked_mean,
    masked_normalize,
    masked_sum,
    masked_var,
    token_entropy,
    token_logprobs,
)


def logits_and_labels(shape=(3, 5), vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[0, :2] = -100
    labels[-1, -1] = -100
    return logits, labels


def test_token_logprobs_is_minus_cross_entropy_and_zero_where_ignored():
    logits, labels = logits_and_labels()
    lp = token_logprobs(logits, labels)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    assert lp.shape == labels.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp, -ce)  # cross_entropy gives 0 at ignore_index as well
    assert (lp[labels == -100] == 0).all() and (lp[labels != -100] < 0).all()
    # a hand-computed row: logits [0, ln 3] -> p = [1/4, 3/4]
    two = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    torch.testing.assert_close(
        token_logprobs(two, torch.tensor([[0, 1]])), torch.tensor([[math.log(0.25), math.log(0.75)]])
    )
    assert token_logprobs(two, torch.tensor([[7, 1]]), ignore_index=7)[0, 0] == 0


def test_token_logprobs_gradient_matches_cross_entropy():
    logits, labels = logits_and_labels(seed=1)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    token_logprobs(a, labels).sum().backward()
    (-F.cross_entropy(b.flatten(0, 1), labels.flatten(), reduction="sum")).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_entropy_matches_categorical_and_handles_minus_infinity():
    logits, _ = logits_and_labels(seed=2)
    h = token_entropy(logits)
    assert h.shape == logits.shape[:-1] and h.dtype == torch.float32
    torch.testing.assert_close(h, torch.distributions.Categorical(logits=logits).entropy())
    uniform = torch.zeros(2, 8)
    torch.testing.assert_close(token_entropy(uniform), torch.full((2,), math.log(8)))
    masked = torch.tensor([[0.0, 0.0, -math.inf, -math.inf], [5.0, -math.inf, -math.inf, -math.inf]],
                          requires_grad=True)  # fmt: skip
    h = token_entropy(masked)
    torch.testing.assert_close(h.detach(), torch.tensor([math.log(2), 0.0]))
    h.sum().backward()
    assert torch.isfinite(masked.grad).all()


def test_chunked_computation_equals_one_chunk(monkeypatch):
    logits, labels = logits_and_labels(shape=(4, 7), vocab=13, seed=3)
    whole = token_logprobs(logits, labels), token_entropy(logits)
    monkeypatch.setattr(sft_ops, "CHUNK_ELEMENTS", 13 * 3)  # 3 rows a chunk: 28 rows in 10 chunks
    torch.testing.assert_close(token_logprobs(logits, labels), whole[0], rtol=0, atol=0)
    torch.testing.assert_close(token_entropy(logits), whole[1], rtol=0, atol=0)


def test_bf16_logits_give_float32_close_to_the_float32_results():
    logits, labels = logits_and_labels(shape=(2, 6), vocab=50, seed=4)
    low = logits.bfloat16()
    lp, h = token_logprobs(low, labels), token_entropy(low)
    assert lp.dtype == h.dtype == torch.float32
    # exact for the bf16 values upcast, close to the original float32 logits
    torch.testing.assert_close(lp, token_logprobs(low.float(), labels), rtol=0, atol=0)
    torch.testing.assert_close(lp, token_logprobs(logits, labels), rtol=0.02, atol=0.05)
    torch.testing.assert_close(h, token_entropy(logits), rtol=0.02, atol=0.02)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="expected"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
M = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])


def test_masked_sum_and_mean_by_hand():
    assert masked_sum(X, M).item() == 1 + 2 + 20 + 30 + 40
    assert masked_sum(X, M, dim=1).tolist() == [3.0, 90.0]
    assert masked_sum(X, M, dim=0).tolist() == [1.0, 22.0, 30.0, 40.0]
    assert masked_mean(X, M).item() == pytest.approx(93 / 5)
    assert masked_mean(X, M, dim=1).tolist() == [1.5, 30.0]
    assert masked_mean(X, M, dim=1, keepdim=True).shape == (2, 1)
    # nothing selected: 0, not nan; a nan outside the mask never leaks in
    assert masked_mean(X, torch.zeros_like(M)).item() == 0
    assert masked_mean(X, torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]]), dim=1).tolist() == [0.0, 10.0]
    with_nan = X.clone()
    with_nan[0, 3] = math.nan
    assert masked_sum(with_nan, M).item() == 93
    # a bool mask, and a mask broadcast over rows
    assert masked_mean(X, M.bool()).item() == pytest.approx(93 / 5)
    assert masked_sum(X, torch.tensor([1, 0, 0, 1])).item() == 1 + 4 + 10 + 40


def test_masked_ops_equal_the_plain_ops_on_the_selected_entries():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g)
    m = torch.rand(6, 9, generator=g) > 0.4
    sel = x[m]
    torch.testing.assert_close(masked_sum(x, m), sel.sum())
    torch.testing.assert_close(masked_mean(x, m), sel.mean())
    torch.testing.assert_close(masked_var(x, m), sel.var(unbiased=True))
    torch.testing.assert_close(masked_var(x, m, unbiased=False), sel.var(unbiased=False))
    for row in range(6):
        torch.testing.assert_close(masked_mean(x, m, dim=1)[row], x[row][m[row]].mean())
        torch.testing.assert_close(masked_var(x, m, dim=1)[row], x[row][m[row]].var())


def test_masked_normalize_is_trls_whitening():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1, 1, 1, 0])
    # mean 2, unbiased var ((1)^2 + 0 + 1^2) / 2 = 1: (x - 2) / sqrt(1 + 1e-8), applied to every entry
    expected = (x - 2.0) * torch.rsqrt(torch.tensor(1.0 + 1e-8))
    torch.testing.assert_close(masked_normalize(x, m), expected)
    torch.testing.assert_close(masked_normalize(x, m, shift_mean=False), expected + 2.0)
    torch.testing.assert_close(masked_normalize(x, m, unbiased=False, eps=0.0)[:3],
                               (x[:3] - 2.0) / math.sqrt(2 / 3))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    y = torch.randn(4, 10, generator=g) * 5 + 3
    keep = torch.rand(4, 10, generator=g) > 0.3
    whitened = masked_normalize(y, keep)
    torch.testing.assert_close(masked_mean(whitened, keep), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(masked_var(whitened, keep), torch.tensor(1.0), atol=1e-5, rtol=1e-5)
    rows = masked_normalize(y, keep, dim=1)
    torch.testing.assert_close(masked_mean(rows, keep, dim=1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(masked_var(rows, keep, dim=1), torch.ones(4), atol=1e-5, rtol=1e-5)


def test_unbiased_variance_needs_two_entries():
    with pytest.raises(ValueError, match="at least 2 selected entries, got 1"):
        masked_var(X, torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0]]), dim=1)
    with pytest.raises(ValueError, match="got 0"):
        masked_normalize(X, torch.zeros_like(M))
    assert masked_var(X, torch.zeros_like(M), unbiased=False).item() == 0
