"""The training loop: one optimizer update per step, from deterministic batches, resumable bit for bit.

What it minimises is injected: an objective (objective.py) maps a batch to (loss sum, counted units, metrics);
by default the language model's next-token cross entropy. Its options are one `LoopConfig` ([train] in a run's
TOML file, train/config.py); the keyword arguments of old (`Trainer(..., max_steps=12, grad_accum=4)`) build one.

One step s (s = 0, 1, ...):

    lr      <- base_lr * schedule(s)                          (schedule.py; time-driven: see below)
    batch   <- train_data.batch(s): (B, ...) tensors, e.g. input_ids and targets (-100: not counted)
    N       <- objective.count(batch), summed over ranks      (the global batch's counted units)
    for each of the `grad_accum` micro-batches m (B / grad_accum rows):
        out_m   = objective(m)
        loss_m  = R * out_m.loss / N + out_m.mean_loss / grad_accum     (R ranks; objective.py)
        loss_m.backward()                                     (gradients add up to those of the whole batch)
    g_norm  <- ||grad||_2 over all parameters; gradients scaled by min(1, clip / g_norm)   (clip.py)
    optimizer.step() if the loss and g_norm are finite; zero the gradients

Dividing each micro-batch's summed loss by the unit count of the *whole* batch makes accumulation exact:
`grad_accum = 4` computes the same update as one batch 4x larger (tested), even when micro-batches count
different numbers of tokens.

A non-finite loss or gradient norm (a learning rate far too high, bad data, an overflow) stops the run with a
`NonFiniteError` naming the step, before that step's update touches the weights, so the last checkpoint and the
weights in memory are the last good ones. The check costs one host sync per optimizer step (the loss and the norm,
which clipping computes anyway, are read together), none per micro-batch. With `skip_nonfinite=True` such a step
is skipped instead (no update; a `{"step", "skipped"}` record in the log, counted in `skipped_steps`), and
`max_consecutive_skips` skipped steps in a row still stop the run. With fp16 the gradient scaler owns non-finite
gradients (it skips the step and lowers the scale, by design); only a non-finite loss counts there.

Time-driven runs (`schedule_by="time"`, what the speedrun uses) follow the clock instead of the step count, so
a run spends its budget B and ends at the decayed rate whatever the machine's speed does:

    p_s     <- max(p_(s-1), min(1, (e_s + d_(s-1)) / B))      lr <- base_lr * schedule.at(p_s)
    stop    after the step whose end has e >= B (or at max_steps, then a cap)

e_s is the time elapsed since `fit` began when step s starts (every evaluation, sample and checkpoint before it
included: the budget is the wall time of the run), d_(s-1) the previous step's duration. p_s is thus the fraction
of the budget spent when step s will *end*: the step that exhausts the budget runs at p = 1, the schedule's
minimum, and taking the max keeps the lr monotone in time when the machine speeds up. Time comes from `clock`
(`time.perf_counter` unless a test injects a fake one; tokens/s always uses `time.perf_counter`). A time-driven
checkpoint records the elapsed time, the last step's duration and p (extra "elapsed_s", "step_s",
"schedule_progress"), so a resumed run continues the same schedule where the killed one stopped (the time between
the checkpoint and the restart is not counted); one without them cannot be resumed time-driven. After `fit`,
`elapsed_s`, `schedule_progress` and `ended_by` ("max_steps" or "time_budget") say how much of the budget and of
the schedule ran and why the run ended.

Options: bf16 autocast (CPU and CUDA) or fp16 autocast with a gradient scaler (CUDA), activation checkpointing
(`model.runtime.activation_checkpointing`: each block's activations are recomputed in backward: memory O(layers)
block inputs instead of every intermediate), chunked cross entropy (loss.py: the (tokens, vocab) logits are never
held), document masking (the batch's position_ids and doc_ids reach the model), `torch.compile` of the objective.

Every `log_every` steps a line goes to `<run>/log.jsonl` and the progress bar (and, with `tensorboard=True`, to
TensorBoard event files in `<run>/tensorboard/`): loss, lr, gradient norm, tokens/s and MFU, the model FLOPs
utilisation:

    MFU = tokens/s * (6 N + 12 L d T) / peak FLOP/s

(6 N per token for the forward and backward matrix products of the N non-embedding parameters, 12 L d T for
attention over T positions, PaLM appendix B; peak = the measured speed of a large matmul in the training
dtype on this device, so MFU says how much of what this machine can do the training uses). Every `eval_every`
steps: the objective's validation loss (eval mode: plain CE for the language model) and bits per byte,
bpb = (sum of CE in nats / ln 2) / (UTF-8 bytes of the targets),
which compares models with different tokenizers; and, with a tokenizer, a sample continuation. Checkpoints
(checkpoint.py) every `checkpoint_every` steps and at the end; `fit` resumes from the newest one; with
`trainable_checkpoints=True` they hold only the parameters that train (an adapter, not the frozen model the run
rebuilds). The loss curves are drawn to `<run>/loss.png`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from lmforge.configfile import ConfigError, check_finite, check_integer
from lmforge.train.checkpoint import CheckpointError, is_sharded, latest_checkpoint, load_checkpoint, save_checkpoint
from lmforge.train.clip import clip_grad_norm
from lmforge.train.config import DTYPES, PRECISIONS, SCHEDULE_BY, LoopConfig
from lmforge.train.distributed import DistInfo, all_reduce_sum, unwrap
from lmforge.train.objective import LanguageModelObjective, ObjectiveOutput, count_targets, lm_options
from lmforge.train.plot import plot_losses
from lmforge.train.schedule import Schedule, scale_lr
from lmforge.utils.atomic import atomic_write
from lmforge.utils.errors import LmforgeError

__all__ = ["DTYPES", "PRECISIONS", "SCHEDULE_BY", "Batches", "NonFiniteError", "Trainer"]  # the first three: config's

# [train] fields the run uses and the loop does not (train/run.py, `TrainConfig.trainer_options`)
RUN_FIELDS = ("time_budget_min", "out_dir", "seed", "device")
LOOP_FIELDS = tuple(f.name for f in dataclasses.fields(LoopConfig) if f.name not in RUN_FIELDS)
# the keyword form's defaults where they differ from [train]'s: no evaluation or checkpoints unless asked
KEYWORD_DEFAULTS = {"eval_every": 0, "checkpoint_every": 0, "keep_last": 3}


class NonFiniteError(LmforgeError, RuntimeError):
    """Training produced a non-finite loss or gradient norm (the run diverged); the message names the step.

    An `LmforgeError` because its cause is almost always a setting the user chose (the learning rate, the
    precision, the data), so the CLI prints it as one `error:` line."""


class Batches(Protocol):
    def batch(self, step: int) -> dict[str, Tensor]:
        """The batch of `step` (a pure function of the step): (B, ...) tensors for the objective, "input_ids"
        (B, T) among them (tokens/s and MFU count it); the language model's also "targets" (B, T), and with
        document masking "position_ids" and "doc_ids" (data/loader.py)."""
        ...


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """6 N + 12 L d T: training FLOPs per token (N: parameters outside the embedding table; the attention term
    for models with a `config` that has n_layers and d_model)."""
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("embed.", "pos_embed.")))
    cfg = getattr(model, "config", None)
    attention = 12 * cfg.n_layers * cfg.d_model * seq_len if hasattr(cfg, "n_layers") else 0
    return 6 * n + attention


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 1024) -> float:
    """FLOP/s of a (size x size) @ (size x size) matmul in `dtype` on `device`: the MFU denominator."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


_PLAIN = (str, int, float, bool, type(None))  # what a log record holds (JSON values)


def _restored_history(path: Path, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """The log records a checkpoint carries, each a flat dict of JSON values with an integer "step"."""
    history = extra.get("history", [])
    if not isinstance(history, list):
        raise CheckpointError(f"{path}: extra['history'] is a {type(history).__name__}, expected a list of records")
    for i, record in enumerate(history):
        ok = isinstance(record, dict) and all(isinstance(k, str) and isinstance(v, _PLAIN) for k, v in record.items())
        step = record.get("step") if ok else None
        if not (isinstance(step, int) and not isinstance(step, bool)):
            raise CheckpointError(f"{path}: extra['history'][{i}] is not a log record (a flat dict of plain values "
                                  "with an integer 'step')")  # fmt: skip
    return history


def _counter(path: Path, extra: dict[str, Any], key: str) -> int:
    """A non-negative integer of a checkpoint's extra (0 when absent: checkpoints from before it existed)."""
    value = extra.get(key, 0)
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise CheckpointError(f"{path}: extra[{key!r}] is {value!r}, expected an integer >= 0")
    return value


def _seconds(path: Path, extra: dict[str, Any], key: str) -> float:
    """A finite number >= 0 of a time-driven checkpoint's extra (a duration or a progress), required."""
    value = extra.get(key)
    if value is None:
        raise CheckpointError(f"{path}: extra has no {key!r}: it was not written by a time-driven run "
                              "(schedule_by='time'); resume it step-driven or start a new run")  # fmt: skip
    if not (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
        raise CheckpointError(f"{path}: extra[{key!r}] is {value!r}, expected a finite number >= 0")
    return float(value)


def _loop(loop: LoopConfig | None, options: dict[str, Any]) -> LoopConfig:
    """`loop` with the loop fields in `options` replaced (no loop: built from them over `KEYWORD_DEFAULTS`; then
    max_steps is required). A refused value names the keyword, e.g. "invalid schedule_by='clock'"."""
    unknown = [name for name in options if name not in LOOP_FIELDS]
    if unknown:
        raise TypeError(f"Trainer() got an unexpected keyword argument {unknown[0]!r}")
    if loop is None:
        if "max_steps" not in options:
            raise TypeError("Trainer() needs loop=LoopConfig(...) or max_steps=")
        options = KEYWORD_DEFAULTS | options
    try:
        return dataclasses.replace(loop, **options) if loop is not None else LoopConfig(**options)
    except ConfigError as e:  # only keyword values can be refused here: name them as the caller wrote them
        raise ConfigError(str(e).replace("invalid train.", "invalid ", 1)) from None


def _split(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """`batch` as `parts` micro-batches of consecutive rows (every tensor split along its first dimension)."""
    chunks = {k: v.chunk(parts) for k, v in batch.items() if isinstance(v, Tensor)}
    return [batch | {k: c[i] for k, c in chunks.items()} for i in range(parts)]


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        msg = "tensorboard=True needs the tensorboard package: pip install 'lmforge[tensorboard]'"
        raise ImportError(msg) from None
    return SummaryWriter


class Trainer:
    """Trains `model` with `optimizer` on `train_data`, minimising `objective`, as `loop` says (module docstring).

    objective: an `nn.Module` mapping a batch to an `ObjectiveOutput` (objective.py) that holds `model`, maybe
    wrapped by `distributed.parallelize` (made before the optimizer; see train/run.py); None: the language-model
    objective that loop's chunked_ce, z_loss, label_smoothing and document_mask describe. `parallel` is the
    older name of a wrapped objective. loop: a `LoopConfig` ([train]); today's keyword arguments (max_steps=...,
    precision=..., any field of it the loop reads) replace its fields, and without a loop they build one (with
    no evaluation or checkpoints unless asked). `trainer.max_steps` and the other loop fields read `trainer.loop`;
    setting one replaces the loop (checked again). The rest are the run's: `run_dir` (train.out_dir),
    `time_budget_s` (train.time_budget_min, in seconds), `grad_accum` ([data]), `grad_clip` ([optim]; 0 or None:
    no clipping); `TrainConfig.trainer_options()` gives them from a config."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        train_data: Batches,
        objective: Callable[[dict[str, Tensor]], ObjectiveOutput] | None = None,
        loop: LoopConfig | None = None,
        *,
        val_data: Batches | None = None,
        run_dir: str | Path | None = None,
        grad_accum: int = 1,
        grad_clip: float | None = 1.0,
        time_budget_s: float | None = None,
        tokenizer: Any = None,
        sample_prompt: str = "",
        clock: Callable[[], float] = time.perf_counter,
        progress: bool = True,
        dist: DistInfo | None = None,
        parallel: torch.nn.Module | None = None,
        trainable_checkpoints: bool = False,
        **loop_options: Any,
    ) -> None:
        self.loop = _loop(loop, loop_options)
        check_integer("grad_accum", grad_accum, 1)
        grad_clip = 0.0 if grad_clip is None else grad_clip
        check_finite("grad_clip", grad_clip, at_least=0)  # 0 (or None): no clipping
        self.device = next(model.parameters()).device
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device (it relies on a gradient scaler); use bf16 on CPU")
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.train_data, self.val_data = train_data, val_data
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.skipped_steps = self.skip_streak = 0  # steps skipped in all, and in a row up to the last one
        self.tokenizer, self.sample_prompt = tokenizer, sample_prompt
        self.time_budget_s, self.progress, self.clock = time_budget_s, progress, clock
        self._check_schedule_by()
        self.elapsed_s = self.step_s = 0.0  # time since fit began when the last step ended; that step's duration
        self._start = 0.0  # `clock` when this run's time began (set by fit)
        self.schedule_progress = 0.0  # time-driven: the schedule fraction p of the last step
        self.ended_by: str | None = None  # "max_steps" or "time_budget" once fit has ended the run
        self.dist = dist or DistInfo(device=self.device)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.trainable_checkpoints = trainable_checkpoints  # checkpoints hold the trainable parameters alone
        self._set_activation_checkpointing()
        if is_sharded(model) and not getattr(optimizer, "shardable", True):
            raise ValueError(f"optimizer {type(optimizer).__name__} cannot update FSDP2-sharded parameters: use "
                             "dist.strategy='ddp' or another optimizer (adamw, adam, sgd, lion, muon)")  # fmt: skip
        wrapped = self._objective(objective, parallel)  # what the loop calls: the objective, maybe wrapped
        self.objective = unwrap(wrapped)  # the objective itself (its count, train/eval mode, FSDP2's root)
        self._wrapped = wrapped
        self.forward = torch.compile(wrapped) if self.compile else wrapped
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._byte_lengths: Tensor | None = None
        if self.tensorboard and self.run_dir is None:
            raise ValueError("tensorboard=True needs a run_dir to write the event files to")
        self._tb_on = self.tensorboard and self.dist.is_main
        if self._tb_on:
            _summary_writer_class()  # fail now, not at the first log line, when tensorboard is not installed
        self._tb: Any = None

    def __getattr__(self, name: str) -> Any:
        """`trainer.max_steps` and every other loop field: read from `trainer.loop`."""
        loop = self.__dict__.get("loop")
        if loop is not None and name in LOOP_FIELDS:
            return getattr(loop, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        """Setting a loop field (`trainer.max_steps = 6`) replaces `trainer.loop`, checked again."""
        if name in LOOP_FIELDS:
            name, value = "loop", _loop(self.loop, {name: value})
        super().__setattr__(name, value)

    def _objective(self, objective: Any, parallel: torch.nn.Module | None) -> Any:
        """The objective to call: the one given (or `parallel`, its older name), else the language model's of
        the loop; it must hold `model`, and loop options of the language-model objective must be its own."""
        if objective is not None and parallel is not None:
            raise ValueError("give the objective once: objective= or parallel= (its older name), not both")
        given, arg = (objective, "objective") if objective is not None else (parallel, "parallel")
        if given is None:
            return LanguageModelObjective.from_loop(self.model, self.loop)
        inner = unwrap(given)
        if not (isinstance(inner, torch.nn.Module) and any(m is self.model for m in inner.modules())):
            raise ValueError(f"{arg} must be distributed.parallelize(objective, ...) of an objective holding this "
                             "model (or the objective itself), e.g. LanguageModelObjective(model)")  # fmt: skip
        wanted = lm_options(self.loop)
        default = lm_options(LoopConfig())
        own = inner.options() if isinstance(inner, LanguageModelObjective) else None
        changed = [k for k in wanted if wanted[k] != default[k] and (own is None or own[k] != wanted[k])]
        if changed:
            raise ValueError(f"loop options {', '.join(changed)} describe the language-model objective the trainer "
                             f"builds, but {arg}= was given ({type(inner).__name__}): set them on it")  # fmt: skip
        return given

    def _set_activation_checkpointing(self) -> None:
        """The loop's activation_checkpointing, set on the model's runtime options (`model.runtime`)."""
        runtime = getattr(self.model, "runtime", None)
        if runtime is not None:
            runtime.activation_checkpointing = self.activation_checkpointing
        elif self.activation_checkpointing:
            raise ValueError(f"activation_checkpointing=True needs a model with runtime options (model.runtime); "
                             f"{type(self.model).__name__} has none")  # fmt: skip

    def _check_schedule_by(self) -> None:
        """schedule_by is "step" or "time"; time needs a finite budget > 0 and a schedule with total_steps (the
        shape `Schedule.at` stretches over the budget). Checked again by `fit`, for attributes set after init."""
        if self.schedule_by not in SCHEDULE_BY:
            raise ValueError(f"invalid schedule_by={self.schedule_by!r}: must be one of {', '.join(SCHEDULE_BY)}")
        if self.schedule_by == "step":
            return
        budget = self.time_budget_s
        if not (isinstance(budget, int | float) and math.isfinite(budget) and budget > 0):
            raise ValueError(f"invalid time_budget_s={budget!r}: schedule_by='time' needs a finite budget > 0 "
                             "(train.time_budget_min)")  # fmt: skip
        if self.schedule.total_steps is None:
            raise ValueError(f"invalid schedule.total_steps=None: schedule_by='time' stretches the schedule's "
                             f"total_steps over the budget; give {self.schedule.kind!r} a total_steps")  # fmt: skip

    # -- one step ---------------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def _batch(self, data: Batches, step: int) -> dict[str, Any]:
        """Batch `step` of `data` on the training device."""
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in data.batch(step).items()}

    def _count(self, batch: dict[str, Tensor]) -> Tensor:
        """The units the objective's loss of `batch` sums over (objective.py), known before its forward."""
        return getattr(self.objective, "count", count_targets)(batch)

    def _set_mode(self, training: bool) -> None:
        self.model.train(training)
        if isinstance(self.objective, torch.nn.Module):
            self.objective.train(training)

    def train_step(self, step: int, progress: float | None = None) -> dict[str, float]:
        """One optimizer update from `train_data.batch(step)` at base lr * schedule(step), or, given the schedule
        `progress` (time-driven runs), at base lr * schedule.at(progress); returns its metrics."""
        self._set_mode(True)
        factor = self.schedule(step) if progress is None else self.schedule.at(progress)
        lr_factor = scale_lr(self.optimizer, factor)
        batch = self._batch(self.train_data, step)
        ids = batch["input_ids"]
        if ids.shape[0] % self.grad_accum:
            raise ValueError(f"the batch has {ids.shape[0]} rows, not divisible by grad_accum={self.grad_accum}")
        counted = all_reduce_sum(self._count(batch), self.dist).clamp(min=1)  # the global batch's units
        ranks = self.dist.world_size  # the wrappers average gradients over ranks; the loss undoes it
        sums: dict[str, Tensor] = {}
        for micro in _split(batch, self.grad_accum):
            with self._autocast():
                out = self.forward(micro)
            loss = out.loss * ranks / counted  # objective.py: the normalisation
            if out.mean_loss is not None:
                loss = loss + out.mean_loss / self.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            for key, value in out.logged().items():
                sums[key] = sums.get(key, torch.zeros((), device=self.device)) + value.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(self.model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        names = list(sums)  # every rank sees the same loss and norm: the same decision
        means = [all_reduce_sum(sums[k], self.dist).float() / counted for k in names]
        *values, norm = torch.stack([*means, grad_norm.float()]).tolist()  # the step's one host sync
        logged = dict(zip(names, values, strict=True))
        lr = self.optimizer.param_groups[0]["lr"]
        if self._update_is_finite(step, logged["loss"], norm, lr):
            if self.scaler:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {**logged, "lr": lr, "lr_factor": lr_factor, "grad_norm": norm,
                   "skipped_steps": self.skipped_steps, "tokens": ids.numel() * ranks, "seq_len": ids.shape[1]}
        return metrics if progress is None else metrics | {"progress": progress}  # fmt: skip

    def _update_is_finite(self, step: int, loss: float, grad_norm: float, lr: float) -> bool:
        """Whether the update of `step` may be applied; raises `NonFiniteError`, or with `skip_nonfinite` counts
        the skipped step (and raises after `max_consecutive_skips` in a row)."""
        problems = [f"the loss is {loss}"] if not math.isfinite(loss) else []
        if not math.isfinite(grad_norm) and self.scaler is None:  # fp16: the scaler skips such steps itself
            problems.append(f"the gradient norm is {grad_norm}")
        if not problems:
            self.skip_streak = 0
            return True
        n, problem = step + 1, " and ".join(problems)
        if not self.skip_nonfinite:
            raise NonFiniteError(f"step {n}: {problem} (lr {lr:.3g}); the update was not applied. Lower the "
                                 "learning rate or check the data and precision, or skip such steps with "
                                 "skip_nonfinite (train.skip_nonfinite = true)")  # fmt: skip
        self.skipped_steps += 1
        self.skip_streak += 1
        self._log({"step": n, "skipped": problem})
        if self.skip_streak >= self.max_consecutive_skips:
            first = n - self.skip_streak + 1
            raise NonFiniteError(f"steps {first}-{n}: {problem} (lr {lr:.3g}) at {self.skip_streak} steps in a row "
                                 f"(max_consecutive_skips={self.max_consecutive_skips}); stopping")  # fmt: skip
        return False

    # -- evaluation -------------------------------------------------------------------------------------------

    def _target_bytes(self, targets: Tensor) -> Tensor:
        """UTF-8 bytes of the counted targets (the bits-per-byte denominator; ids past the tokenizer's: 0)."""
        if self._byte_lengths is None:
            n = self.tokenizer.vocab_size
            lengths = [len(self.tokenizer.token_to_bytes(i)) for i in range(n)] + [0]
            self._byte_lengths = torch.tensor(lengths, device=self.device)
        counted = targets != -100
        return self._byte_lengths[targets.clamp(0, len(self._byte_lengths) - 1)][counted].sum()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (per unit: nats/token for the language model) of the objective in eval mode over
        `eval_steps` batches, and bits per byte with a tokenizer and batches with "targets"."""
        self._set_mode(False)
        loss = units = nbytes = 0.0
        for i in range(self.eval_steps):
            batch = self._batch(self.val_data, i)
            with self._autocast():
                out = self._wrapped(batch)
            loss += out.logged()["loss"].item()
            units += out.tokens.item()
            if self.tokenizer is not None and "targets" in batch:
                nbytes += self._target_bytes(batch["targets"]).item()
        metrics = {"val_loss": loss / max(units, 1)}
        if nbytes:
            metrics["val_bpb"] = loss / math.log(2) / nbytes
        return metrics

    def sample(self, max_tokens: int = 48) -> str:
        from lmforge.infer.generate import generate_text

        self.model.eval()
        prompt = self.sample_prompt or [0]
        sharded = is_sharded(self.model)  # FSDP2: gather the root's weights; each group gathers its own
        if sharded:
            self.objective.unshard()
        try:
            return generate_text(
                self.model, self.tokenizer, prompt, temperature=0.8, top_k=50, seed=0, max_tokens=max_tokens
            )
        finally:
            if sharded:
                self.objective.reshard()

    # -- the loop ---------------------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.run_dir is not None and self.dist.is_main:
            with open(self.run_dir / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key == "sample":
                    self._tb.add_text("sample", value, record["step"])
                elif key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                    self._tb.add_scalar(tag, value, record["step"])

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        if path is None:
            return
        self.step, extra = load_checkpoint(path, self.model, self.optimizer)
        self.history = [r for r in _restored_history(path, extra) if r["step"] <= self.step]
        self.skipped_steps, self.skip_streak = (_counter(path, extra, key) for key in ("skipped_steps", "skip_streak"))
        if self.schedule_by == "time":
            self.elapsed_s, self.step_s, self.schedule_progress = (
                _seconds(path, extra, key) for key in ("elapsed_s", "step_s", "schedule_progress")
            )
        lines = "".join(json.dumps(r) + "\n" for r in self.history)
        if self.dist.is_main:
            atomic_write(self.run_dir / "log.jsonl", lines)  # drop what was logged after the checkpoint

    def _checkpoint(self) -> None:  # every rank takes part (FSDP2 gathers the shards); rank 0 writes
        if self.run_dir is not None:
            extra = {"history": self.history, "skipped_steps": self.skipped_steps, "skip_streak": self.skip_streak}
            if self.schedule_by == "time":  # the clock now (after this step's evaluation): resume continues from it
                extra |= {"elapsed_s": self._elapsed(), "step_s": self.step_s,
                          "schedule_progress": self.schedule_progress}  # fmt: skip
            save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, extra, keep_last=self.keep_last,
                            trainable_only=self.trainable_checkpoints)  # fmt: skip

    def _elapsed(self) -> float:
        """Seconds of this run so far on `clock` (a resumed time-driven run counts its earlier processes' too)."""
        return self.clock() - self._start

    def _budget_spent(self) -> bool:
        return self.time_budget_s is not None and self.elapsed_s >= self.time_budget_s

    def _end_reason(self) -> str | None:
        """Why the run ends after the step just done: "max_steps", "time_budget", or None (it goes on)."""
        if self.step == self.max_steps:
            return "max_steps"
        return "time_budget" if self._budget_spent() else None

    def _next_progress(self) -> float:
        """The schedule progress p of the step about to run (module docstring): the fraction of the budget spent
        when it will end, projected from the last step's duration, and never below the last step's."""
        projected = (self._elapsed() + self.step_s) / self.time_budget_s
        self.schedule_progress = max(self.schedule_progress, min(1.0, projected))
        return self.schedule_progress

    def _steps(self) -> Iterator[int]:
        from tqdm import tqdm

        if self.schedule_by == "time" and self._budget_spent():  # a finished time-driven run, resumed
            self.ended_by = "time_budget"
            return
        quiet = not (self.progress and self.dist.is_main)
        steps = range(self.step, self.max_steps)
        if self.schedule_by == "time":  # the clock ends the run: max_steps is only a cap, no step total to show
            bar = tqdm(iter(steps), initial=self.step, total=None, disable=quiet, unit="step")
        else:
            bar = tqdm(steps, initial=self.step, total=self.max_steps, disable=quiet)
        self._bar = bar
        yield from bar

    def fit(self, resume: bool = True) -> dict[str, Any]:
        """Train up to `max_steps` (or the time budget; time-driven: until the budget is spent, module docstring);
        returns the last logged metrics."""
        self._check_schedule_by()
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                self._resume()
            elif (self.run_dir / "log.jsonl").exists():
                (self.run_dir / "log.jsonl").unlink()
        if self._tb_on:  # events logged after the checkpoint (or all, without resume) are purged
            self._tb = _summary_writer_class()(str(self.run_dir / "tensorboard"), purge_step=self.step + 1)
        peak = measure_peak_flops(self.device, DTYPES[self.precision])
        if self.schedule_by == "step":
            self.elapsed_s = 0.0  # a step-driven run's budget counts from each fit; a time-driven one goes on
        self._start = self.clock() - self.elapsed_s
        window_start, window_tokens = time.perf_counter(), 0
        last: dict[str, Any] = {}
        for step in self._steps():
            progress = self._next_progress() if self.schedule_by == "time" else None
            step_start = self.clock()
            metrics = self.train_step(step, progress)
            self.step = step + 1
            self.step_s, self.elapsed_s = self.clock() - step_start, self._elapsed()
            window_tokens += metrics["tokens"]
            self.ended_by = self._end_reason()
            done = self.ended_by is not None
            if progress is not None:
                metrics["elapsed_s"] = self.elapsed_s
            if self.step % self.log_every == 0 or done:
                seconds = time.perf_counter() - window_start
                tok_s = window_tokens / seconds
                mfu = tok_s * model_flops_per_token(self.model, metrics["seq_len"]) / peak
                metrics |= {"step": self.step, "tok_s": tok_s, "mfu": mfu}
                self._bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
                self._log(metrics)
                last = metrics
                window_start, window_tokens = time.perf_counter(), 0
            if self.val_data is not None and self.eval_every and (self.step % self.eval_every == 0 or done):
                eval_start = time.perf_counter()
                record = {"step": self.step, **self.evaluate()}
                if self.tokenizer is not None and self.sample_every and (self.step % self.sample_every == 0 or done):
                    record["sample"] = self.sample()
                self._log(record)
                last = last | record  # a new dict: the logged step record stays as written
                window_start += time.perf_counter() - eval_start  # tokens/s counts training time only
            if self.checkpoint_every and self.step % self.checkpoint_every == 0 and not done:
                self._checkpoint()
            if done:
                break
        self._checkpoint()
        if self.run_dir is not None and self.dist.is_main:
            plot_losses(self.history, self.run_dir / "loss.png")
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        return last
