"""Per-row sampling: a batch where every row has its own SamplingParams equals each row run alone through the
single-row transforms (`process_logits`, `next_token`, the oracle; they are pinned to transformers in
test_sampling.py): bit-equal processed logits, the same tokens for the same seeds, generators left in the same state.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.infer.sampling import (
    SamplingParams,
    SamplingRows,
    TokenHistory,
    next_token,
    process_logits,
    process_rows,
    sample_rows,
)

V = 50
HISTORY_IDS = 12  # histories draw from the first ids only, so tokens repeat


def some(*values):
    """Mostly the listed values (edges, extremes, "off"), sometimes anything in between."""
    return st.sampled_from(values)


PARAMS = st.builds(
    SamplingParams,
    temperature=some(0.0, 0.0, 1e-300, 1e-6, 0.3, 0.7, 1.0, 1.0, 1.7, 5.0, 1e300, 2.0**63) | st.floats(0, 4),
    top_k=some(0, 0, 1, 3, 17, V - 1, V, V + 10, 2**63),
    top_p=some(1.0, 1.0, 0.0, 1e-300, 0.1, 0.5, 0.9, 0.999) | st.floats(0, 1),
    min_p=some(0.0, 0.0, 1e-300, 0.05, 0.3, 1.0) | st.floats(0, 1),
    repetition_penalty=some(1.0, 1.0, 0.7, 1.3, 2.0, 1e30, 1e-300, 5e-324),
    frequency_penalty=some(0.0, 0.0, 0.5, -1.0, 1e300, -1.7e308, 1.7e308) | st.floats(-3, 3),
    presence_penalty=some(0.0, 0.0, 0.8, -0.4, -1e300, 1.7e308),
    seed=st.integers(0, 2**64 - 1),
)


def make_logits(kind: str, batch: int, seed: int) -> torch.Tensor:
    """(B, V) float32: plain, with -inf entries, many ties, huge magnitudes; every row keeps a finite entry."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, V, generator=g) * 3
    if kind == "neginf":
        x[torch.rand(batch, V, generator=g) < 0.4] = float("-inf")
    elif kind == "ties":
        x = torch.randint(0, 4, (batch, V), generator=g).float()
    elif kind == "huge":
        x = x * 1e37
        x[:, ::7] = 3e38
    x[:, V - 1] = x[:, V - 1].nan_to_num(neginf=0.5)
    return x


def random_history(batch: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Per row a prompt (1..12 ids) and an output (0..8 ids) of different lengths, with repeats."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 9, (batch, 2), generator=g).tolist()
    ids = lambda n: torch.randint(0, HISTORY_IDS, (n,), generator=g).tolist()
    return [ids(p + 1) for p, _ in lengths], [ids(o) for _, o in lengths]


def alone(logits, params, prompts, outputs) -> list[torch.Tensor]:
    """The oracle: each row through `process_logits` by itself, (1, V) each."""
    rows = []
    for b, p in enumerate(params):
        history = torch.tensor([prompts[b] + outputs[b]])
        rows.append(process_logits(logits[b : b + 1], p, history, torch.tensor([outputs[b]], dtype=torch.long)))
    return rows


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)  # equal bit patterns: -0.0 differs from 0.0 here, -inf is one pattern


@settings(max_examples=200, deadline=None)
@given(
    params=st.lists(PARAMS, min_size=1, max_size=6),
    kind=st.sampled_from(["plain", "neginf", "ties", "huge"]),
    seed=st.integers(0, 2**16),
)
def test_rows_equal_each_row_alone(params, kind, seed):
    b = len(params)
    logits = make_logits(kind, b, seed)
    prompts, outputs = random_history(b, seed + 1)
    want = alone(logits, params, prompts, outputs)
    rows = SamplingRows.of(params, V)
    got = process_rows(logits, rows, TokenHistory.of(prompts, V, outputs=outputs))
    for row in range(b):
        assert torch.equal(bits(got[row]), bits(want[row][0])), f"row {row}: {params[row]}"
    # the saturation rules hold in the batched form: no NaN, no +inf, something left to draw in every row
    assert not got.isnan().any() and not got.isposinf().any() and got.isfinite().any(-1).all()

    mine = [torch.Generator().manual_seed(p.seed) for p in params]
    theirs = [torch.Generator().manual_seed(p.seed) for p in params]
    tokens = sample_rows(got, rows, mine)
    for row, p in enumerate(params):
        assert tokens[row] == next_token(want[row], p, theirs[row])[0]
        assert torch.equal(mine[row].get_state(), theirs[row].get_state())  # the same draws were consumed
    assert got.gather(-1, tokens[:, None]).isfinite().all()


def decode_steps(params: list[SamplingParams], steps: int, logits_seed: int, rows_of: list[int]) -> list[list[int]]:
    """Sample `steps` tokens for each of `params` from random logits (row i sees the logits of `rows_of[i]`'s
    stream), updating the history as the decode loop does; the tokens of each row."""
    n = len(params)
    prompts = [[1, 2, 3, 2][: 1 + i % 4] for i in rows_of]
    history = TokenHistory.of(prompts, V)
    rows = SamplingRows.of(params, V)
    generators = [torch.Generator().manual_seed(p.seed) for p in params]
    streams = [torch.Generator().manual_seed(logits_seed + i) for i in rows_of]
    out = [[] for _ in range(n)]
    for _ in range(steps):
        logits = torch.cat([torch.randn(1, V, generator=g) * 2 for g in streams])
        tokens = sample_rows(process_rows(logits, rows, history), rows, generators)
        history.add(tokens)
        for i, t in enumerate(tokens.tolist()):
            out[i].append(t)
    return out


def test_a_row_draws_the_same_tokens_alone_and_in_a_batch_of_four():
    row = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.3, frequency_penalty=0.4, seed=7)
    others = [
        SamplingParams(temperature=0.0, presence_penalty=1.0, seed=0),
        SamplingParams(temperature=1.5, min_p=0.1, seed=8),
        SamplingParams(temperature=0.5, top_p=0.5, repetition_penalty=0.8, seed=9),
    ]
    by_itself = decode_steps([row], 30, logits_seed=100, rows_of=[0])[0]
    for position in range(4):  # the row at each place in the batch
        batch = [*others[:position], row, *others[position:]]
        got = decode_steps(batch, 30, logits_seed=100, rows_of=[*[1, 2, 3][:position], 0, *[1, 2, 3][position:]])
        assert got[position] == by_itself
    assert len(set(by_itself)) > 5  # a real draw, not a constant


def test_history_select_keeps_the_rows_asked_for():
    history = TokenHistory.of([[1], [2, 2], [3]], V, outputs=[[4], [], [5, 5]])
    history.add(torch.tensor([6, 7, 8]))
    kept = history.select(torch.tensor([2, 0]))
    want = TokenHistory.of([[3], [1]], V, outputs=[[5, 5, 8], [4, 6]])
    assert torch.equal(kept.seen, want.seen) and torch.equal(kept.counts, want.counts)
    assert kept.counts[0, 5] == 2 and kept.seen[0, 3] and not kept.seen[0, 1]


@pytest.mark.parametrize("greedy", [True, False])
def test_a_batch_of_one_kind_skips_the_other(greedy):
    """All-greedy rows consume no randomness; all-sampled rows each consume their own."""
    params = [SamplingParams(temperature=0.0 if greedy else 1.0, seed=s) for s in (1, 2)]
    logits = make_logits("plain", 2, 3)
    generators = [torch.Generator().manual_seed(p.seed) for p in params]
    before = [g.get_state() for g in generators]
    tokens = sample_rows(logits, SamplingRows.of(params, V), generators)
    assert [torch.equal(a, g.get_state()) for a, g in zip(before, generators, strict=True)] == [greedy, greedy]
    if greedy:
        assert torch.equal(tokens, logits.argmax(-1))
