"""Learning-rate schedules: the lr multiplier f(s) in [0, 1] as a pure function of the step s.

The trainer sets  lr_g(s) = base_lr_g * f(s)  for every parameter group g before optimizer update s
(s = 0, 1, 2, ...: the number of updates already done). With W = warmup_steps, S = total_steps, m = min_lr_ratio:

  warmup (every kind), s < W:   f = s / W            linear from 0 (f(0) = 0, f(W) = 1), as Hugging Face's
                                                     schedules do, so they are tested equal to them
  decay progress, s >= W:       p = min(1, (s - W) / (S - W))
  cosine:                       f = m + (1 - m) * 0.5 * (1 + cos(pi p))           (Loshchilov & Hutter 2017)
  linear:                       f = m + (1 - m) * (1 - p)
  constant:                     f = 1
  inverse square root:          f = max(m, sqrt(W / s))                           (Vaswani et al. 2017; needs W >= 1)
  warmup-stable-decay (WSD):    f = 1 for W <= s < S - D, then over the last D = round(decay_fraction * S) steps,
                                with q = min(1, (s - (S - D)) / D):               (MiniCPM, Hu et al. 2024)
                                  "linear":  f = m + (1 - m) * (1 - q)
                                  "1-sqrt":  f = m + (1 - m) * (1 - sqrt(q))     (Hägele et al. 2024)
                                  "cosine":  f = m + (1 - m) * 0.5 * (1 + cos(pi q))

So f(S) = m for the decaying kinds, and f stays m for s > S. The three decay shapes share one `anneal(shape, q, m)`:
cosine and linear schedules anneal over the whole post-warmup span, WSD only over its final D steps.

Time-driven runs (`Trainer(schedule_by="time")`, the speedrun) evaluate the same shapes at a fraction of the
schedule instead of a step: `schedule.at(p)` = f(p * S) for the progress p in [0, 1] (elapsed time over the budget),
so warmup takes the first W / S of the budget and f(1) = m for the decaying kinds, at whatever speed the run goes.

Use: `Schedule(...)` is a callable step -> f; `set_lr(optimizer, schedule, step)` applies it (each group keeps its
own base lr under "initial_lr", the key `torch.optim.lr_scheduler` uses); a `Schedule` is also a valid `lr_lambda`
for `torch.optim.lr_scheduler.LambdaLR` (see `lambda_lr`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from lmforge.config import ConfigError

KINDS = ("cosine", "linear", "constant", "wsd", "inverse_sqrt")
DECAY_SHAPES = ("linear", "1-sqrt", "cosine")


def _fail(name: str, value: object, allowed: str) -> NoReturn:
    raise ConfigError(f"invalid {name}={value!r}: {allowed}")


def anneal(shape: str, q: float, min_ratio: float) -> float:
    """Decay from 1 at q = 0 to `min_ratio` at q = 1 along `shape` (one of `DECAY_SHAPES`)."""
    if shape == "linear":
        g = 1.0 - q
    elif shape == "1-sqrt":
        g = 1.0 - math.sqrt(q)
    elif shape == "cosine":
        g = 0.5 * (1.0 + math.cos(math.pi * q))
    else:
        _fail("decay_shape", shape, f"must be one of {', '.join(DECAY_SHAPES)}")
    return min_ratio + (1.0 - min_ratio) * g


@dataclass(frozen=True)
class Schedule:
    """The lr multiplier of one schedule; `schedule(step)` -> f(step) (see the module docstring)."""

    kind: str = "cosine"
    total_steps: int | None = None  # S; required by cosine, linear and wsd
    warmup_steps: int = 0  # W
    min_lr_ratio: float = 0.0  # m: the final lr as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: the cooldown is the last round(decay_fraction * S) steps
    decay_shape: str = "1-sqrt"  # wsd: "linear", "1-sqrt" or "cosine"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            _fail("kind", self.kind, f"must be one of {', '.join(KINDS)}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            _fail("warmup_steps", self.warmup_steps, "must be an integer >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if self.kind == "inverse_sqrt" and self.warmup_steps < 1:
            _fail("warmup_steps", self.warmup_steps, "inverse_sqrt needs warmup_steps >= 1 (f = sqrt(W / s))")
        if self.kind in ("cosine", "linear", "wsd"):
            S = self.total_steps
            if not (isinstance(S, int) and S > 0):
                _fail("total_steps", S, f"{self.kind} needs a positive integer")
            if self.warmup_steps >= S:
                _fail("warmup_steps", self.warmup_steps, f"must be < total_steps={S}")
        elif self.total_steps is not None and not (isinstance(self.total_steps, int) and self.total_steps > 0):
            _fail("total_steps", self.total_steps, "must be a positive integer or None")
        if self.kind == "wsd":
            if not 0.0 < self.decay_fraction <= 1.0:
                _fail("decay_fraction", self.decay_fraction, "must be in (0, 1]")
            if self.decay_shape not in DECAY_SHAPES:
                _fail("decay_shape", self.decay_shape, f"must be one of {', '.join(DECAY_SHAPES)}")
            room = self.total_steps - self.warmup_steps
            if not 1 <= self.decay_steps <= room:
                _fail(
                    "decay_fraction",
                    self.decay_fraction,
                    f"gives {self.decay_steps} decay steps; need 1..total_steps - warmup_steps = {room}",
                )

    @property
    def decay_steps(self) -> int:
        """The number of steps over which f falls from 1 to min_lr_ratio (wsd: D; cosine, linear: S - W)."""
        if self.kind == "wsd":
            return round(self.decay_fraction * self.total_steps)
        if self.kind in ("cosine", "linear"):
            return self.total_steps - self.warmup_steps
        return 0

    def __call__(self, step: int) -> float:
        if step < 0:
            _fail("step", step, "must be >= 0")
        W = self.warmup_steps
        if step < W:
            return step / W
        if self.kind == "constant":
            return 1.0
        if self.kind == "inverse_sqrt":
            return max(self.min_lr_ratio, math.sqrt(W / step))
        start = self.total_steps - self.decay_steps  # where the decay begins (= W for cosine and linear)
        if step < start:
            return 1.0
        q = min(1.0, (step - start) / self.decay_steps)
        return anneal(self.decay_shape if self.kind == "wsd" else self.kind, q, self.min_lr_ratio)

    def at(self, progress: float) -> float:
        """f at a fraction `progress` of the schedule: f(progress * total_steps), with progress above 1 held at 1.

        The steps are continuous here (warmup is linear in progress, the decay is evaluated between steps), so a
        time-driven run gets the same shape whatever number of steps fits its budget; total_steps is required."""
        if not (isinstance(progress, int | float) and math.isfinite(progress) and progress >= 0):
            _fail("progress", progress, "must be a finite number >= 0")
        if self.total_steps is None:
            _fail("total_steps", None, f"a schedule evaluated by progress needs total_steps (kind {self.kind!r})")
        return self(min(1.0, progress) * self.total_steps)


def set_lr(optimizer: torch.optim.Optimizer, schedule: Schedule, step: int) -> float:
    """Set every group's lr to its base lr times `schedule(step)`; returns the multiplier.

    A group's base lr is its lr the first time it is seen, kept under "initial_lr" (so it travels with the
    optimizer's state_dict and an exact resume needs nothing else)."""
    return scale_lr(optimizer, schedule(step))


def scale_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to its base lr ("initial_lr", see `set_lr`) times `factor`; returns `factor`."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
    return factor


def lambda_lr(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """The same schedule as a `torch.optim.lr_scheduler.LambdaLR` (call `.step()` after each optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def plot_schedules(
    path: str | Path, total_steps: int = 1000, warmup_steps: int = 100, min_lr_ratio: float = 0.1
) -> Path:
    """Draw every kind (and each WSD decay shape) over `total_steps` into a PNG at `path` (written atomically)."""
    from lmforge.train.plot import figure, save_figure

    common = {"total_steps": total_steps, "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio}
    curves = {kind: Schedule(kind, **common) for kind in KINDS if kind != "wsd"}
    curves |= {f"wsd ({shape})": Schedule("wsd", decay_shape=shape, **common) for shape in DECAY_SHAPES}
    steps = range(total_steps + 1)
    fig, ax = figure(f"lr schedules (warmup {warmup_steps}, min ratio {min_lr_ratio})", "step", "lr / peak lr")
    for name, schedule in curves.items():
        ax.plot(steps, [schedule(s) for s in steps], label=name)
    return save_figure(fig, path)
