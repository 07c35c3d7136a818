"""Sampling transforms against transformers' logits processors (the oracle) and closed forms."""

from __future__ import annotations

import pytest
import torch
import transformers.generation.logits_process as T

from lmforge.infer.sampling import (
    SamplingParams,
    apply_temperature,
    frequency_presence_penalty,
    greedy,
    min_p_filter,
    next_token,
    process_logits,
    repetition_penalty,
    sample,
    top_k_filter,
    top_p_filter,
)

V = 50


def make_logits(kind: str, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """Random logits (B, V): plain, with -inf entries, with many ties, or one row of all-equal values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, V, generator=g) * 3
    if kind == "neginf":
        x[torch.rand(batch, V, generator=g) < 0.3] = float("-inf")
    elif kind == "ties":
        x = torch.randint(0, 4, (batch, V), generator=g).float()
    elif kind == "flat":
        x[0] = 0.5
    return x


KINDS = ["plain", "neginf", "ties", "flat"]
NO_IDS = torch.zeros(4, 0, dtype=torch.long)


def same(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0) -> bool:
    """Equal (within `atol`), with -inf in the same places: filters must drop exactly the same tokens."""
    finite = ~a.isinf()
    return torch.equal(finite, ~b.isinf()) and torch.allclose(a[finite], b[finite], rtol=0, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [0.3, 1.0, 1.7])
def test_temperature(kind, t):
    x = make_logits(kind)
    assert same(apply_temperature(x, t), T.TemperatureLogitsWarper(t)(NO_IDS, x.clone()))


def test_temperature_zero_is_not_a_scale():
    with pytest.raises(ValueError, match="greedy"):
        apply_temperature(make_logits("plain"), 0.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3, 17, V, V + 10])
def test_top_k(kind, k):
    x = make_logits(kind)
    got = top_k_filter(x, k)
    assert same(got, T.TopKLogitsWarper(k)(NO_IDS, x.clone()))
    if kind == "plain":  # distinct values: exactly min(k, V) survive per row
        assert (~got.isinf()).sum(-1).tolist() == [min(k, V)] * 4


def test_top_k_zero_is_off():
    x = make_logits("neginf")
    assert top_k_filter(x, 0) is x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_top_p(kind, p):
    x = make_logits(kind)
    got = top_p_filter(x, p)
    assert same(got, T.TopPLogitsWarper(p)(NO_IDS, x.clone()))
    kept = ~got.isinf()
    assert kept.sum(-1).min() >= 1
    probs = x.softmax(-1)
    assert ((probs * kept).sum(-1) >= p - 1e-6).all()  # the kept set reaches p ...
    if kind == "plain" and p < 1:  # ... and is the smallest: without its least likely token it falls short
        least = probs.masked_fill(~kept, 2.0).amin(-1)
        assert (((probs * kept).sum(-1) - least < p) | (kept.sum(-1) == 1)).all()


def test_top_p_one_is_identity():
    x = make_logits("neginf")
    x[1, :5] = -200.0  # probabilities that underflow to 0 are still kept
    assert top_p_filter(x, 1.0) is x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [0.0, 0.05, 0.3, 1.0])
def test_min_p(kind, m):
    x = make_logits(kind)
    got = min_p_filter(x, m)
    assert same(got, T.MinPLogitsWarper(m)(NO_IDS, x.clone()))
    probs = x.softmax(-1)
    want_kept = (probs >= m * probs.amax(-1, keepdim=True)) & ~x.isinf()
    assert torch.equal(~got.isinf(), want_kept)


def history(batch: int = 4, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 10, (batch, length), generator=torch.Generator().manual_seed(seed))  # with repeats


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.3, 2.0])
def test_repetition_penalty(kind, penalty):
    x, ids = make_logits(kind), history()
    got = repetition_penalty(x, ids, penalty)
    assert same(got, T.RepetitionPenaltyLogitsProcessor(penalty)(ids, x.clone()))
    assert torch.equal(x, make_logits(kind))  # inputs untouched


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("freq", "pres"), [(0.5, 0.0), (0.0, 0.8), (0.3, -0.4), (-1.0, 2.0)])
def test_frequency_presence_penalty_closed_form(kind, freq, pres):
    x, ids = make_logits(kind), history()
    want = x.clone()
    for b in range(x.shape[0]):
        for tok in set(ids[b].tolist()):
            count = ids[b].tolist().count(tok)
            want[b, tok] -= freq * count + pres
    assert same(frequency_presence_penalty(x, ids, freq, pres), want, atol=1e-6)  # float rounding only


def test_penalties_with_empty_history_are_identity():
    x = make_logits("plain")
    assert torch.equal(repetition_penalty(x, NO_IDS, 1.5), x)
    assert torch.equal(frequency_presence_penalty(x, NO_IDS, 1.0, 1.0), x)


@pytest.mark.parametrize("kind", KINDS)
def test_process_logits_equals_transformers_chain(kind):
    """Penalty, temperature, top-k, top-p, min-p, in the order of transformers' _get_logits_processor."""
    x, ids = make_logits(kind), history()
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.1, repetition_penalty=1.2)
    chain = T.LogitsProcessorList(
        [
            T.RepetitionPenaltyLogitsProcessor(1.2),
            T.TemperatureLogitsWarper(0.7),
            T.TopKLogitsWarper(20),
            T.TopPLogitsWarper(0.8),
            T.MinPLogitsWarper(0.1),
        ]
    )
    assert same(process_logits(x, params, ids), chain(ids, x.clone()))


def test_process_logits_frequency_counts_output_ids_only():
    x, prompt, out = make_logits("plain"), history(seed=2), history(length=5, seed=3)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=1.1)
    got = process_logits(x, params, torch.cat([prompt, out], 1), out)
    want = frequency_presence_penalty(repetition_penalty(x, torch.cat([prompt, out], 1), 1.1), out, 0.5, 0.25)
    assert torch.equal(got, want)


def test_greedy_params_skip_the_warpers():
    x = make_logits("plain")
    params = SamplingParams(temperature=0.0, top_k=1, top_p=0.01)
    assert torch.equal(process_logits(x, params, NO_IDS), x)
    assert torch.equal(next_token(x, params), x.argmax(-1))


def test_greedy_takes_first_of_ties():
    assert greedy(torch.tensor([[1.0, 3.0, 3.0, 0.0]])).tolist() == [1]


def test_sample_is_seeded_and_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0])).expand(20000, 4)
    draws = sample(logits, torch.Generator().manual_seed(7))
    assert torch.equal(draws, sample(logits, torch.Generator().manual_seed(7)))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert (freq - torch.tensor([0.5, 0.3, 0.2, 0.0])).abs().max() < 0.015  # ~4.5 standard errors
    assert freq[3] == 0  # a -inf logit is never drawn


def test_sample_with_top_k_one_is_greedy():
    x = make_logits("plain", batch=64, seed=5)
    assert torch.equal(sample(top_k_filter(x, 1), torch.Generator().manual_seed(0)), greedy(x))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", "hot"),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("min_p", 2.0),
        ("repetition_penalty", 0.0),
        ("frequency_penalty", float("inf")),
        ("presence_penalty", None),
        ("max_tokens", 0),
        ("max_tokens", True),
        ("stop", [""]),
        ("stop", [3]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["2"]),
        ("seed", 1.5),
    ],
)
def test_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**{field: value})


def test_params_defaults_and_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=(1, 2))
    assert p.stop == ["###"] and p.stop_token_ids == [1, 2]
    d = SamplingParams()
    assert (d.temperature, d.top_k, d.top_p, d.min_p, d.repetition_penalty) == (1.0, 0, 1.0, 0.0, 1.0)
    assert d.seed is None and d.stop == [] and not d.greedy and SamplingParams(temperature=0).greedy
