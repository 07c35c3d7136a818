"""LR schedules: closed-form values, Hugging Face's schedulers, shape invariants, the optimizer hooks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import optimization as hf

from lmforge.config import ConfigError
from lmforge.train.schedule import DECAY_SHAPES, KINDS, Schedule, lambda_lr, set_lr

COS = Schedule("cosine", total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
LIN = Schedule("linear", total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
CONST = Schedule("constant", warmup_steps=10)
ISQRT = Schedule("inverse_sqrt", warmup_steps=16)
# wsd: S = 100, W = 10, D = 0.2 * 100 = 20, so the decay runs over steps 80..100
WSD = {shape: Schedule("wsd", 100, 10, decay_fraction=0.2, decay_shape=shape) for shape in DECAY_SHAPES}

# (schedule, step, f(step)) worked out by hand from the module docstring's equations
CLOSED_FORM = [
    (COS, 0, 0.0),
    (COS, 5, 0.5),
    (COS, 10, 1.0),
    (COS, 35, 0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5))),  # p = 1/4, cos(pi/4) = sqrt(1/2)
    (COS, 60, 0.55),  # p = 1/2
    (COS, 110, 0.1),
    (COS, 1000, 0.1),
    (LIN, 5, 0.5),
    (LIN, 35, 0.775),  # 0.1 + 0.9 * 3/4
    (LIN, 60, 0.55),
    (LIN, 110, 0.1),
    (LIN, 1000, 0.1),
    (CONST, 0, 0.0),
    (CONST, 4, 0.4),
    (CONST, 10, 1.0),
    (CONST, 10**7, 1.0),
    (ISQRT, 8, 0.5),
    (ISQRT, 16, 1.0),
    (ISQRT, 64, 0.5),  # sqrt(16 / 64)
    (ISQRT, 1600, 0.1),
    (Schedule("inverse_sqrt", warmup_steps=16, min_lr_ratio=0.2), 1600, 0.2),  # floored at m
    (WSD["linear"], 5, 0.5),
    (WSD["linear"], 10, 1.0),
    (WSD["linear"], 50, 1.0),
    (WSD["linear"], 80, 1.0),
    (WSD["linear"], 85, 0.75),  # q = 1/4
    (WSD["1-sqrt"], 85, 0.5),
    (WSD["cosine"], 85, 0.5 * (1 + math.sqrt(0.5))),
    (WSD["1-sqrt"], 100, 0.0),
    (WSD["1-sqrt"], 150, 0.0),
    (Schedule("wsd", 100, 10, min_lr_ratio=0.1, decay_fraction=0.2, decay_shape="1-sqrt"), 85, 0.55),
]


@pytest.mark.parametrize(("schedule", "step", "expected"), CLOSED_FORM)
def test_closed_form_values(schedule, step, expected):
    assert schedule(step) == pytest.approx(expected, abs=1e-12)


def _hf_factors(make, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# ours vs Hugging Face's (both warm up linearly from 0); HF's cosine rises again past S, so compare up to S
HF_CASES = {
    "cosine": (COS, lambda o: hf.get_cosine_with_min_lr_schedule_with_warmup(o, 10, 110, min_lr_rate=0.1), 111),
    "linear": (Schedule("linear", 110, 10), lambda o: hf.get_linear_schedule_with_warmup(o, 10, 110), 130),
    "constant": (CONST, lambda o: hf.get_constant_schedule_with_warmup(o, 10), 50),
    "inverse_sqrt": (ISQRT, lambda o: hf.get_inverse_sqrt_schedule(o, 16), 300),
    # HF's wsd warms up from min_lr_ratio, ours from 0: compare with m = 0, and with m > 0 without warmup
    **{
        f"wsd_{shape}": (
            WSD[shape],
            lambda o, shape=shape: hf.get_wsd_schedule(o, 10, 20, num_training_steps=100, decay_type=shape),
            130,
        )
        for shape in DECAY_SHAPES
    },
    "wsd_min": (
        Schedule("wsd", 100, 0, min_lr_ratio=0.2, decay_fraction=0.3, decay_shape="linear"),
        lambda o: hf.get_wsd_schedule(o, 0, 30, num_training_steps=100, decay_type="linear", min_lr_ratio=0.2),
        130,
    ),
}


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_matches_hugging_face(name):
    schedule, make, steps = HF_CASES[name]
    ours = [schedule(s) for s in range(steps)]
    assert ours == pytest.approx(_hf_factors(make, steps), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    total=st.integers(2, 300),
    warmup_frac=st.floats(0.0, 0.9),
    min_ratio=st.floats(0.0, 1.0),
    decay_fraction=st.floats(0.05, 1.0),
    shape=st.sampled_from(DECAY_SHAPES),
)
def test_shape_invariants(kind, total, warmup_frac, min_ratio, decay_fraction, shape):
    W = int(warmup_frac * (total - 1))
    if kind == "inverse_sqrt":
        W = max(W, 1)
    if kind == "wsd":
        decay_fraction = max(decay_fraction, 1 / total)
        decay_fraction = min(decay_fraction, (total - W) / total)
    s = Schedule(kind, total, W, min_ratio, decay_fraction, shape)
    f = [s(i) for i in range(total + 20)]
    assert all(0.0 <= x <= 1.0 for x in f)
    assert all(a <= b for a, b in itertools.pairwise(f[: W + 1])), "warmup must rise"
    assert all(a >= b for a, b in itertools.pairwise(f[W:])), "after warmup f must not rise"
    assert f[0] == (0.0 if W else 1.0) and f[W] == 1.0
    assert all(x >= min_ratio - 1e-12 for x in f[W:])
    if kind in ("cosine", "linear", "wsd"):
        assert f[total:] == pytest.approx([min_ratio] * 20, abs=1e-12)


def _sgd_two_groups() -> torch.optim.SGD:
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    return torch.optim.SGD([{"params": [a], "lr": 3e-3}, {"params": [b], "lr": 1e-3}], lr=1.0)


@pytest.mark.parametrize("schedule", [COS, WSD["1-sqrt"], ISQRT])
def test_set_lr_equals_lambda_lr(schedule):
    """Per-group base lrs; LambdaLR is stepped after each optimizer step, set_lr called before it."""
    opt_a, opt_b = _sgd_two_groups(), _sgd_two_groups()
    sched = lambda_lr(opt_b, schedule)
    for step in range(130):
        factor = set_lr(opt_a, schedule, step)
        lrs = [g["lr"] for g in opt_a.param_groups]
        assert lrs == pytest.approx([3e-3 * factor, 1e-3 * factor], rel=1e-12)
        assert lrs == pytest.approx([g["lr"] for g in opt_b.param_groups], rel=1e-12)
        opt_a.step()
        opt_b.step()
        sched.step()


def test_set_lr_base_survives_a_resume():
    opt = _sgd_two_groups()
    set_lr(opt, COS, 60)
    state = opt.state_dict()
    fresh = _sgd_two_groups()
    for g in fresh.param_groups:
        g["lr"] = 123.0  # whatever lr the fresh optimizer starts with, the saved base lr wins
    fresh.load_state_dict(state)
    set_lr(fresh, COS, 61)
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx([3e-3 * COS(61), 1e-3 * COS(61)])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"kind": "step"}, "kind"),
        ({"kind": "cosine"}, "total_steps"),
        ({"kind": "linear", "total_steps": 0}, "total_steps"),
        ({"kind": "cosine", "total_steps": 10, "warmup_steps": 10}, "warmup_steps"),
        ({"kind": "cosine", "total_steps": 10, "warmup_steps": -1}, "warmup_steps"),
        ({"kind": "cosine", "total_steps": 10, "min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"kind": "inverse_sqrt"}, "warmup_steps"),
        ({"kind": "constant", "total_steps": -3}, "total_steps"),
        ({"kind": "wsd", "total_steps": 10, "decay_fraction": 0.0}, "decay_fraction"),
        ({"kind": "wsd", "total_steps": 10, "warmup_steps": 5, "decay_fraction": 0.8}, "decay_fraction"),
        ({"kind": "wsd", "total_steps": 10, "decay_shape": "exp"}, "decay_shape"),
    ],
)
def test_invalid_arguments_are_named(kwargs, name):
    with pytest.raises(ConfigError, match=f"invalid {name}="):
        Schedule(**kwargs)


def test_negative_step_is_rejected():
    with pytest.raises(ConfigError, match="invalid step="):
        COS(-1)


def test_plot_schedules_writes_a_png(tmp_path):
    from lmforge.train.schedule import plot_schedules

    path = plot_schedules(tmp_path / "plots" / "schedules.png", total_steps=200, warmup_steps=20)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["schedules.png"]  # no temporary file left behind


# -- by progress (time-driven runs) ------------------------------------------------------------------------------

BY_PROGRESS = [COS, LIN, Schedule("constant", 50, 10), Schedule("inverse_sqrt", 200, 16), *WSD.values()]


@pytest.mark.parametrize("schedule", BY_PROGRESS, ids=lambda s: f"{s.kind}-{s.decay_shape}")
def test_at_progress_is_the_step_schedule_stretched_over_the_budget(schedule):
    """at(s / S) is f(s) at every step (the step schedule is the oracle, itself tested against Hugging Face), and
    progress past 1 holds the end value: the decayed minimum for the decaying kinds."""
    S = schedule.total_steps
    assert [schedule.at(s / S) for s in range(S + 1)] == pytest.approx([schedule(s) for s in range(S + 1)], abs=1e-12)
    assert schedule.at(1.0) == schedule.at(7.5) == schedule(S)
    if schedule.kind in ("cosine", "linear", "wsd"):
        assert schedule.at(1.0) == schedule.min_lr_ratio


def test_at_progress_between_steps():
    """Between steps the shapes are continuous (hand-computed from the module docstring's equations)."""
    assert COS.at(0.05) == pytest.approx(0.55)  # x = 5.5 of W = 10: warmup 5.5 / 10
    assert LIN.at(0.5) == pytest.approx(0.1 + 0.9 * 0.55)  # x = 55: p = 45 / 100
    assert WSD["linear"].at(0.825) == pytest.approx(0.875)  # x = 82.5: q = 2.5 / 20


@pytest.mark.parametrize("progress", [-0.01, math.nan, math.inf])
def test_at_rejects_a_progress_that_is_not_a_fraction(progress):
    with pytest.raises(ConfigError, match="invalid progress="):
        COS.at(progress)


def test_at_needs_total_steps():
    with pytest.raises(ConfigError, match="invalid total_steps=None: a schedule evaluated by progress"):
        CONST.at(0.5)
