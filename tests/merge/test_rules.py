"""Each rule, one tensor at a time, against mergekit's own kernel (`merge_tensors`) on edge cases the tiny models
do not reach: 1-D and 3-D tensors, extreme densities, a model equal to the base, colinear / antipodal / zero
SLERP inputs, a tensor larger than SLERP's chunk; and the YAML setting rules against mergekit's `evaluate_setting`."""

from __future__ import annotations

import pytest
import torch

from lmforge.merge import (
    breadcrumbs,
    breadcrumbs_ties,
    linear,
    model_stock,
    negate,
    slerp,
    task_arithmetic,
    task_vector,
    ties,
)
from lmforge.merge.config import evaluate
from lmforge.merge.methods import _bool, _float
from lmforge.merge.slerp import CHUNK

SHAPES = [(7,), (12, 10), (3, 4, 5)]


def _theirs(tensors: list[torch.Tensor], method: str, **params) -> torch.Tensor:
    from mergekit.merge_methods.api import merge_tensors

    base = None if method == "linear" else 0
    return merge_tensors(tensors, method, parameters=params, base_index=base)


def _models(shape: tuple[int, ...], seed: int = 0, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base] + [base + 0.3 * torch.randn(shape, generator=g) for _ in range(n - 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 1.0])
def test_sparsifying_rules(shape: tuple[int, ...], density: float) -> None:
    base, a, b = _models(shape)
    w, d = [0.7, -0.4], [density, 0.6]
    for rescale in (False, True):
        r = "l1" if rescale else None
        theirs = _theirs([base, a, b], "ties", weight=w, density=d, rescale=rescale)
        assert ties(base, [a, b], w, d, rescale=r).equal(theirs)
    for gamma in (0.01, 0.6):  # density + gamma > 1 shrinks the outlier cut
        assert breadcrumbs(base, [a, b], w, d, [gamma, gamma]).equal(
            _theirs([base, a, b], "breadcrumbs", weight=w, density=d, gamma=gamma))
        assert breadcrumbs_ties(base, [a, b], w, d, [gamma, 0.1], normalize=True, lam=0.5).equal(
            _theirs([base, a, b], "breadcrumbs_ties", weight=w, density=d, gamma=[gamma, 0.1], normalize=True,
                    **{"lambda": 0.5}))  # fmt: skip


def test_ties_with_a_model_equal_to_base_and_opposing_signs() -> None:
    base = torch.zeros(4, 6)
    up, down = base + 1.0, base - 1.0  # sum of signs is zero everywhere: + is elected, the divisor is one weight
    for tensors in ([base, base, base], [base, up, down], [base, up, base]):
        theirs = _theirs(tensors, "ties", weight=[1.0, 1.0], density=[0.5, 1.0])
        assert ties(tensors[0], tensors[1:], [1.0, 1.0], [0.5, 1.0]).equal(theirs)


@pytest.mark.parametrize("shape", SHAPES)
def test_linear_task_arithmetic_model_stock(shape: tuple[int, ...]) -> None:
    base, a, b = _models(shape, seed=1)
    for normalize in (True, False):
        assert linear([base, a, b], [0.2, 0.3, 0.9], normalize).equal(
            _theirs([base, a, b], "linear", weight=[0.2, 0.3, 0.9], normalize=normalize))
        assert task_arithmetic(base, [a, b], [0.5, 1.5], normalize, lam=0.7).equal(
            _theirs([base, a, b], "task_arithmetic", weight=[0.5, 1.5], normalize=normalize, **{"lambda": 0.7}))
    for filter_wise in (False, True):
        assert model_stock(base, [a, b], filter_wise).equal(_theirs([base, a, b], "model_stock",
                                                                    filter_wise=filter_wise))  # fmt: skip
    # opposing fine-tunes: 1 + (N - 1) cos = 0, the base is kept
    assert model_stock(base, [base + 1, base - 1]).equal(base)
    assert _theirs([base, base + 1, base - 1], "model_stock").equal(base)


def test_task_vectors_extract_add_negate() -> None:
    base, ft, _ = _models((5, 6), seed=2)
    tau = task_vector(ft, base)
    assert tau.equal(ft - base) and negate(tau).equal(base - ft)
    assert task_arithmetic(base, [ft], [1.0]).equal(base + tau)  # adding the task vector gives the fine-tune back
    assert task_arithmetic(ft, [base], [1.0]).equal(ft + negate(tau))  # negating it removes the task


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_cases(t: float) -> None:
    v0, v1, _ = _models((16, 8), seed=3)
    big0, big1, _ = _models((CHUNK + 1000,), seed=4)  # two chunks for the norms and the dot product
    cases = [(v0, v1), (v0, 2 * v0), (v0, -v0), (v0, torch.zeros_like(v0)), (big0, big1),
             (torch.empty(0, 3), torch.empty(0, 3)), (v0.bfloat16(), v1.bfloat16())]  # fmt: skip
    for a, b in cases:
        theirs = _theirs([a, b], "slerp", t=t)
        ours = slerp(t, a, b)
        assert ours.dtype == theirs.dtype and ours.equal(theirs)
    torch.testing.assert_close(slerp(t, v0, 2 * v0), (1 - t) * v0 + t * 2 * v0)  # the colinear fallback: lerp
    assert slerp(0.0, v0, v1).equal(v0)


SETTINGS = [
    0.5, [0, 1], [0.0, 0.5, 0.3, 0.7, 1.0], [1, 2, 4], [True, False], [],
    {"filter": "self_attn", "value": [0, 1]},
    [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": 0.25}, {"value": 0.9}],
    [{"filter": "mlp", "value": [1, 0]}],
    [{"filter": "*", "value": [2, 3]}],
]  # fmt: skip


@pytest.mark.parametrize("setting", SETTINGS)
def test_settings_as_mergekit_evaluates_them(setting) -> None:
    from mergekit.config import ConditionalParameter, evaluate_setting
    from pydantic import TypeAdapter

    def theirs_of(s):
        if isinstance(s, dict):
            return ConditionalParameter(**s)
        if isinstance(s, list) and s and isinstance(s[0], dict):
            return [ConditionalParameter(**c) for c in s]
        return s

    is_bool = isinstance(setting, list) and setting and isinstance(setting[0], bool)
    validate, their_validate = (_bool, TypeAdapter(bool).validate_python) if is_bool else (
        _float, TypeAdapter(float).validate_python)  # fmt: skip
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        for t in (0.0, 0.2, 0.5, 0.75, 1.0):
            ours = evaluate(setting, name, t, validate)
            assert ours == evaluate_setting(name, theirs_of(setting), t, validate=their_validate), (name, t)
