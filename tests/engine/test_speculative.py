"""Speculative decoding's acceptance rule and proposers (lmforge.engine.speculative).

Oracles: plain greedy decoding of the same toy target (greedy verification must reproduce it token for token);
the target distribution p itself (a chi-square test over 20,000 draws: what speculative sampling emits must be
distributed as p, whatever the draft's q); hand-computed n-gram lookups.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.engine import speculative
from lmforge.engine.speculative import (
    PAD,
    Acceptance,
    DraftModel,
    PromptLookup,
    Proposal,
    accept_greedy,
    accept_sampled,
)

V = 16
TABLE = torch.randn(V, V, V, generator=torch.Generator().manual_seed(0)) * 2
NOISE = torch.randn(V, V, V, generator=torch.Generator().manual_seed(1)) * 1.5


def target_logits(row: list[int]) -> torch.Tensor:
    """A deterministic toy language model: the next token's logits depend on the last two tokens."""
    return TABLE[row[-2], row[-1]]


def draft_probs(rows: list[list[int]]) -> torch.Tensor:
    """A draft that agrees with the target often, not always: the target's logits plus a fixed perturbation."""
    return torch.stack([(target_logits(r) + NOISE[r[-2], r[-1]]).softmax(-1) for r in rows])


def verify_logits(rows: list[list[int]], proposal: Proposal) -> torch.Tensor:
    """(B, K + 1, V): the target after each row's prefix and its first i drafts (one target forward's output)."""
    k = proposal.tokens.shape[1]
    drafts = proposal.tokens.tolist()
    return torch.stack(
        [torch.stack([target_logits(r + d[:i]) for i in range(k + 1)]) for r, d in zip(rows, drafts, strict=True)]
    )


def plain_greedy(prompt: list[int], n: int) -> list[int]:
    row = list(prompt)
    for _ in range(n):
        row.append(int(target_logits(row).argmax()))
    return row[len(prompt) :]


def speculative_greedy(prompts: list[list[int]], proposer, n: int, k: int) -> tuple[list[list[int]], int]:
    """Rounds of propose + verify until every row has n tokens; also the number of drafts accepted."""
    rows, accepted = [list(p) for p in prompts], 0
    while min(len(r) - len(p) for r, p in zip(rows, prompts, strict=True)) < n:
        proposal = proposer(rows, k)
        result = accept_greedy(proposal, verify_logits(rows, proposal))
        accepted += int(result.accepted.sum())
        for row, tokens in zip(rows, result.rows(), strict=True):
            row += tokens
    return [r[len(p) : len(p) + n] for r, p in zip(rows, prompts, strict=True)], accepted


PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 3, 1, 4], [2, 7], [5, 5, 5, 5, 5, 5], [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]]


@pytest.mark.parametrize("proposer", [PromptLookup(max_n=3, min_n=1), DraftModel(draft_probs)], ids=["ngram", "draft"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_speculation_equals_plain_greedy(proposer, k):
    got, accepted = speculative_greedy(PROMPTS, proposer, n=24, k=k)
    assert got == [plain_greedy(p, 24) for p in PROMPTS]
    assert accepted > 0  # the drafts were used, not all rejected (the test would not exercise acceptance)


def test_greedy_acceptance_by_hand():
    proposal = Proposal(torch.tensor([[1, 2, 3], [1, 2, 3], [4, 0, 0]]), torch.tensor([3, 3, 1]))
    logits = torch.zeros(3, 4, 6)
    for b, best in enumerate([[1, 2, 3, 5], [1, 0, 3, 5], [4, 2, 0, 0]]):
        logits[b, torch.arange(4), torch.tensor(best)] = 1.0
    result = accept_greedy(proposal, logits)
    assert result.accepted.tolist() == [3, 1, 1]
    assert result.tokens.tolist() == [[1, 2, 3, 5], [1, 0, PAD, PAD], [4, 2, PAD, PAD]]
    assert result.rows() == [[1, 2, 3, 5], [1, 0], [4, 2]]


# ---- speculative sampling: the emitted tokens are distributed as the target's p -------------------------------

DRAWS, VOCAB, K = 20_000, 8, 2


def chi_square_p_value(tokens: torch.Tensor, p: torch.Tensor) -> float:
    """The p-value of `tokens` being draws from `p` (Pearson's chi-square; cells with p = 0 must stay empty)."""
    observed = torch.bincount(tokens, minlength=len(p)).double()
    expected = p.double() * len(tokens)
    assert observed[expected == 0].sum() == 0, "a token the target never emits was emitted"
    small = (expected > 0) & (expected < 5)  # pooled into one cell, where the chi-square approximation holds
    observed = torch.cat((observed[expected >= 5], observed[small].sum()[None]))
    expected = torch.cat((expected[expected >= 5], expected[small].sum()[None]))
    cells = expected > 0
    stat = ((observed[cells] - expected[cells]) ** 2 / expected[cells]).sum()
    df = int(cells.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def dist(*weights: float) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    return (w / w.sum()).float()


def random_dist(seed: int) -> torch.Tensor:
    return dist(*torch.rand(VOCAB, generator=torch.Generator().manual_seed(seed)).tolist())


P_SKEWED = dist(8, 4, 2, 1, 1, 0.5, 0.25, 0.25)
CASES = {  # name: (p_1, p_2, p_3, q_1, q_2); q None: the drafts are point masses (prompt lookup)
    "random": (random_dist(1), random_dist(2), random_dist(3), random_dist(4), random_dist(5)),
    "q_where_p_has_none": (
        dist(5, 3, 2, 0, 0, 0, 0, 0),
        dist(0, 0, 1, 1, 1, 0, 0, 0),
        random_dist(6),
        dist(1, 1, 1, 1, 1, 1, 1, 1),
        dist(0, 0, 0, 0, 1, 3, 3, 3),
    ),
    "p_equals_q": (P_SKEWED, P_SKEWED.flip(0), random_dist(7), P_SKEWED, P_SKEWED.flip(0)),
    "disjoint": (
        dist(1, 1, 1, 1, 0, 0, 0, 0),
        dist(1, 2, 3, 4, 0, 0, 0, 0),
        random_dist(8),
        dist(0, 0, 0, 0, 1, 1, 1, 1),
        dist(0, 0, 0, 0, 4, 3, 2, 1),
    ),
    "point_mass": (P_SKEWED, dist(1, 1, 1, 1, 1, 1, 1, 0), random_dist(9), None, None),
}


def speculate(case: str, seed: int = 0, counts: torch.Tensor | None = None) -> tuple[Acceptance, torch.Tensor]:
    """One verification round of DRAWS independent rows with fixed p and q; the drafts drawn from q."""
    p1, p2, p3, q1, q2 = CASES[case]
    g = torch.Generator().manual_seed(seed)
    if q1 is None:
        tokens, q = torch.tensor([[0, 3]]).expand(DRAWS, K), None  # a fixed draft: the point mass q = one_hot
    else:
        q = torch.stack((q1, q2))
        tokens = torch.stack([torch.multinomial(qi, DRAWS, replacement=True, generator=g) for qi in q], dim=1)
        q = q.expand(DRAWS, K, VOCAB)
    counts = torch.full((DRAWS,), K) if counts is None else counts
    p = torch.stack((p1, p2, p3))
    generators = [torch.Generator().manual_seed(seed * DRAWS + i) for i in range(DRAWS)]
    return accept_sampled(Proposal(tokens, counts, q), p.expand(DRAWS, K + 1, VOCAB), generators), p


@pytest.mark.parametrize("case", CASES)
def test_speculative_sampling_emits_the_target_distribution(case):
    result, p = speculate(case)
    assert chi_square_p_value(result.tokens[:, 0], p[0]) > 1e-3  # the first token, always emitted
    if case == "disjoint":
        assert bool((result.accepted == 0).all())  # every draft is rejected
        return
    second = result.tokens[result.accepted >= 1, 1]  # emitted when x_1 was accepted; p_2 does not depend on x_1
    assert chi_square_p_value(second, p[1]) > 1e-3
    if case == "p_equals_q":
        assert bool((result.accepted == K).all())  # nothing is ever rejected


SOFT = TABLE * 0.3  # a flatter toy target, so that every pair of tokens is seen often enough for a chi-square


def soft_probs(context: torch.Tensor) -> torch.Tensor:
    """The flatter target after contexts ending in `context` (B, 2)."""
    return SOFT[context[:, 0], context[:, 1]].softmax(-1)


def soft_draft(rows: list[list[int]]) -> torch.Tensor:
    last = torch.tensor([r[-2:] for r in rows])
    return (SOFT[last[:, 0], last[:, 1]] + SOFT[last[:, 1], last[:, 0]]).softmax(-1)


def test_draft_model_speculation_samples_the_targets_sequences():
    """Rounds of a sampled draft model + speculative sampling until each row has two tokens: the pairs are
    distributed as the target's p(y1) p(y2 | y1), the second token coming from round one or round two."""
    rows = [[3, 1] for _ in range(DRAWS // 2)]
    generators = [torch.Generator().manual_seed(i) for i in range(len(rows))]
    draft = DraftModel(soft_draft, generators)
    while min(len(r) for r in rows) < 4:
        proposal = draft(rows, K)
        extended = torch.cat((torch.tensor([r[-2:] for r in rows]), proposal.tokens), dim=1)
        p = torch.stack([soft_probs(extended[:, i : i + 2]) for i in range(K + 1)], dim=1)
        for row, tokens in zip(rows, accept_sampled(proposal, p, generators).rows(), strict=True):
            row += tokens
    pairs = torch.tensor([r[2] * V + r[3] for r in rows])
    first = soft_probs(torch.tensor([[3, 1]]))[0]
    joint = (first[:, None] * soft_probs(torch.stack((torch.ones(V, dtype=torch.long), torch.arange(V)), 1))).flatten()
    assert chi_square_p_value(pairs, joint) > 1e-3


def test_rows_with_fewer_drafts_sample_the_target_after_their_last_draft():
    counts = torch.arange(DRAWS) % (K + 1)
    result, p = speculate("q_where_p_has_none", counts=counts)
    assert bool((result.accepted <= counts).all())
    none = counts == 0
    assert chi_square_p_value(result.tokens[none, 0], p[0]) > 1e-3
    bonus = result.accepted == counts
    assert chi_square_p_value(result.tokens[bonus & (counts == 1), 1], p[1]) > 1e-3


def test_the_test_rejects_a_wrong_residual(monkeypatch):
    """Drawing from p instead of max(0, p - q) after a rejection over-weights the tokens q favours: the same
    chi-square test must see it (otherwise the tests above prove nothing)."""
    monkeypatch.setattr(speculative, "residual", lambda p, q: p)
    result, p = speculate("q_where_p_has_none")
    assert chi_square_p_value(result.tokens[:, 0], p[0]) < 1e-3


def test_a_rows_tokens_do_not_depend_on_its_batch_mates():
    p1, p2, p3, q1, q2 = CASES["random"]
    tokens, counts = torch.tensor([[0, 1], [2, 3], [4, 4], [1, 0]]), torch.tensor([2, 1, 2, 0])
    q, p = torch.stack((q1, q2)).expand(4, K, VOCAB), torch.stack((p1, p2, p3)).expand(4, K + 1, VOCAB)
    seeds = [11, 12, 13, 14]
    batch = accept_sampled(Proposal(tokens, counts, q), p, [torch.Generator().manual_seed(s) for s in seeds])
    for b, seed in enumerate(seeds):
        alone = Proposal(tokens[b : b + 1], counts[b : b + 1], q[b : b + 1])
        assert accept_sampled(alone, p[b : b + 1], [torch.Generator().manual_seed(seed)]).rows() == [batch.rows()[b]]


# ---- proposers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "max_n", "min_n", "k", "draft"),
    [
        ([1, 2, 3, 4, 1, 2, 3], 3, 1, 2, [4, 1]),  # the 3-gram (1, 2, 3) occurred at 0
        ([5, 1, 9, 1, 8, 1], 1, 1, 2, [8, 1]),  # the most recent earlier occurrence of (1,) wins
        ([7, 1, 2, 9, 2, 8, 1, 2], 2, 1, 2, [9, 2]),  # the longer n-gram first ...
        ([7, 1, 2, 9, 2, 8, 1, 2], 1, 1, 2, [8, 1]),  # ... the 1-gram alone finds a later match
        ([7, 1, 2, 9, 2, 8, 1, 2], 3, 3, 2, []),  # (8, 1, 2) never occurred before
        ([1, 2, 1], 2, 1, 3, [2, 1]),  # fewer than k tokens follow the match
        ([4], 3, 1, 2, []),  # nothing earlier
    ],
)
def test_prompt_lookup_by_hand(tokens, max_n, min_n, k, draft):
    proposal = PromptLookup(max_n=max_n, min_n=min_n)([tokens, [9, 9, 9, 9]], k)
    assert proposal.tokens.shape == (2, k) and proposal.q is None
    assert proposal.counts.tolist() == [len(draft), 1]  # (9, 9, 9), (9, 9) and (9,) recur with one 9 after them
    assert proposal.tokens[0, : len(draft)].tolist() == draft


def test_proposers_check_their_sizes():
    with pytest.raises(ValueError, match="draft tokens"):
        DraftModel(draft_probs)([[1, 2]], 0)
    with pytest.raises(ValueError, match="max_n"):
        PromptLookup(max_n=1, min_n=2)
    with pytest.raises(ValueError, match="min_n"):
        PromptLookup(min_n=0)


def test_draft_model_proposes_its_own_tokens_and_distributions():
    rows = [[3, 1], [2, 7, 7]]
    greedy = DraftModel(draft_probs)(rows, 3)
    expected = [list(r) for r in rows]
    for _ in range(3):
        for r in expected:
            r.append(int(draft_probs([r])[0].argmax()))
    assert greedy.tokens.tolist() == [r[-3:] for r in expected] and greedy.q is None
    assert greedy.counts.tolist() == [3, 3]
    sampled = DraftModel(draft_probs, [torch.Generator().manual_seed(s) for s in (0, 1)])(rows, 3)
    for b, row in enumerate(rows):
        for i in range(3):
            prefix = row + sampled.tokens[b, :i].tolist()
            torch.testing.assert_close(sampled.q[b, i], draft_probs([prefix])[0])
    alone = DraftModel(draft_probs, [torch.Generator().manual_seed(1)])(rows[1:], 3)
    assert alone.tokens.tolist() == sampled.tokens[1:].tolist()
