"""Training configuration: a TOML file plus dotted `--set` overrides, validated field by field.

A run is described by one `TrainConfig`, made of eight frozen sections; each maps to one TOML table:

    [model]      a `lmforge.config.ModelConfig`: `preset` (default "tiny", "none" for the bare ModelConfig
                 defaults) plus any ModelConfig field; nested tables [model.moe], [model.mla], [model.rope_scaling]
    [data]       token shards, sequence length, micro-batch size, gradient accumulation, validation split, loader
    [optim]      optimizer name (see `lmforge.train.optim.OPTIMIZERS`) and its hyper-parameters
    [schedule]   lr schedule (see `lmforge.train.schedule.Schedule`); total_steps defaults to train.max_steps
    [train]      the loop: steps, precision, compile, losses, eval / sample / log / checkpoint cadence, out_dir
    [dist]       torch.distributed backend, strategy (DDP, FSDP2, or DDP + ZeRO-1) and FSDP2's mixed precision
    [quant]      quantization-aware training: method "qat" (bits, group_size, activations) or "bitnet"
    [distill]    knowledge distillation from a frozen teacher model (train/distill.py); no teacher: none

Every field has a default, so an empty file (or no file) is a tiny CPU run. Example `run.toml`:

    [model]
    preset = "tiny"
    d_model = 256          # head_dim follows d_model / n_heads unless it is set too
    n_kv_heads = "none"    # TOML has no null: the string "none" sets a field that allows None to None

    [model.moe]            # merged over the preset's moe, if it has one
    n_experts = 8
    top_k = 2
    d_expert = 256

    [data]
    shards = "data/shards"
    seq_len = 256
    batch_size = 16
    grad_accum = 4

    [optim]
    name = "adamw"
    lr = 3e-4
    betas = [0.9, 0.95]

    [schedule]
    kind = "wsd"
    warmup_steps = 100

    [train]
    max_steps = 2000
    precision = "bf16"
    out_dir = "runs/tiny-moe"

Overrides `section.field=value` (e.g. `optim.lr=3e-4`, `model.moe.n_experts=8`, `optim.betas=[0.9, 0.95]`,
`train.out_dir=runs/x`) are applied after the file, in order; a value is read as a TOML literal when it is one
(`3e-4`, `true`, `[1, 2]`, `"text"`) and as a bare string otherwise.

Validation: an unknown section or field raises `ConfigError` naming it with the closest valid name; a value of the
wrong type names `section.field`, the expected type and the value; an out-of-range value names `section.field` and
what is allowed; a TOML syntax error names the file and the line. Values that can only make the loss NaN or
overflow are refused up front: every float must be finite (TOML's `nan` and `inf` are valid literals), the learning
rates must be in (0, MAX_LR] (10: far above any rate that trains; AdamW uses ~1e-3, Muon ~0.02, SGD ~0.1-1),
eps > 0, weight decay >= 0, betas and momentum in [0, 1), grad_clip > 0 or none; every integer (sizes, steps,
seeds) must be below 2**63; `train.device = "cuda"` (and `dist.backend = "nccl"`) needs CUDA on this machine.
Integers are accepted for floats, and integral floats (`1e4`) for integers. `save_resolved` writes the fully
resolved config (every field, defaults included) as `config.toml` in the run directory, and `load_train_config` of
that file gives back an equal `TrainConfig`. The generic machinery (TOML reading and writing, overrides, dicts to
dataclasses with type checks, the check helpers) is `lmforge.configfile`; this module holds the sections.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge import configfile
from lmforge.config import PRESETS, ModelConfig
from lmforge.configfile import (
    NONE,
    ConfigError,
    build,
    check,
    check_choice,
    check_finite,
    check_integer,
    convert,
    file_fields,
    is_finite,
    qualify,
    read_toml,
    unknown,
)
from lmforge.configfile import parse_value as parse_value  # re-exported: its home before configfile.py
from lmforge.train.distributed import STRATEGIES as DIST_STRATEGIES
from lmforge.train.optim import OPTIMIZERS
from lmforge.train.schedule import Schedule
from lmforge.utils.atomic import atomic_write

LOADERS = ("random", "sequential")
DEVICES = ("auto", "cpu", "cuda")
DIST_BACKENDS = ("auto", "gloo", "nccl")
CONFIG_FILE = "config.toml"
MAX_LR = 10.0  # a learning rate above it can only diverge
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision names -> dtypes
PRECISIONS = tuple(DTYPES)
SCHEDULE_BY = ("step", "time")
DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd")  # train/distill.py: beta 0, beta 1, distill.beta
QUANT_METHODS = ("none", "qat", "bitnet")  # what drives the lr schedule and ends the run: the step count, or the clock


# ---------------------------------------------------------------------------------------------------------------
# checks shared by the sections


def _unit(name: str, value: float) -> None:
    check(is_finite(value) and 0.0 <= value < 1.0, name, value, "must be in [0, 1)")


def _lr(name: str, value: float | None, optional: bool = False) -> None:
    check_finite(name, value, above=0, optional=optional)
    check(value is None or value <= MAX_LR, name, value, f"must be <= {MAX_LR} (higher rates only diverge)")


# ---------------------------------------------------------------------------------------------------------------
# the sections


@dataclass(frozen=True)
class DataConfig:
    """[data]: where the tokens come from and how they are batched."""

    shards: str | None = None  # directory of token shards (`lmforge.data.shards`); none: the trainer supplies data
    tokenizer: str | None = None  # the shards' tokenizer (bits per byte, samples, export); none: without those
    seq_len: int = 256  # tokens per sequence (must fit model.max_seq_len)
    batch_size: int = 8  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    val_fraction: float = 0.05  # share of the tokens held out for evaluation, in [0, 1)
    seed: int = 1337
    loader: str = "random"  # "random": windows at random offsets; "sequential": consecutive windows

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum"):
            check_integer(f"data.{name}", getattr(self, name), 1)
        check_integer("data.seed", self.seed)
        _unit("data.val_fraction", self.val_fraction)
        check_choice("data.loader", self.loader, LOADERS)


@dataclass(frozen=True)
class OptimConfig:
    """[optim]: the optimizer and its hyper-parameters (`optimizer_kwargs` maps them onto each constructor)."""

    name: str = "adamw"  # a key of `lmforge.train.optim.OPTIMIZERS`
    lr: float = 1e-3  # peak learning rate (Muon: of the 2-D hidden weights)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)  # adam, adamw, adamw8bit, lion; muon: of its AdamW part
    eps: float = 1e-8  # adam, adamw, adamw8bit; muon: of its AdamW part
    momentum: float | None = None  # sgd, muon; none: the optimizer's default
    adamw_lr: float | None = None  # muon: lr of the parameters it routes to AdamW; none: its default
    grad_clip: float | None = 1.0  # max global gradient norm; none: no clipping

    def __post_init__(self) -> None:
        check_choice("optim.name", self.name, OPTIMIZERS)
        _lr("optim.lr", self.lr)
        check_finite("optim.weight_decay", self.weight_decay, at_least=0)
        for i, beta in enumerate(self.betas):
            _unit(f"optim.betas[{i}]", beta)
        check_finite("optim.eps", self.eps, above=0)
        if self.momentum is not None:
            _unit("optim.momentum", self.momentum)
        _lr("optim.adamw_lr", self.adamw_lr, optional=True)
        check_finite("optim.grad_clip", self.grad_clip, above=0, optional=True)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `build_optimizer(self.name, model, self.lr, self.weight_decay, **kwargs)`."""
        kwargs: dict[str, Any] = {}
        if self.name in ("adam", "adamw", "adamw8bit"):
            kwargs |= {"betas": self.betas, "eps": self.eps}
        elif self.name == "lion":
            kwargs["betas"] = self.betas
        elif self.name == "muon":
            kwargs |= {"adamw_betas": self.betas, "adamw_eps": self.eps}
            if self.adamw_lr is not None:
                kwargs["adamw_lr"] = self.adamw_lr
        if self.name in ("sgd", "muon") and self.momentum is not None:
            kwargs["momentum"] = self.momentum
        return kwargs


@dataclass(frozen=True)
class ScheduleConfig:
    """[schedule]: the lr multiplier over steps; checked against train.max_steps by `TrainConfig`."""

    kind: str = "cosine"  # one of `lmforge.train.schedule.KINDS`
    warmup_steps: int = 0
    total_steps: int | None = None  # none: train.max_steps
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd only
    decay_shape: str = "1-sqrt"  # wsd only: one of `lmforge.train.schedule.DECAY_SHAPES`

    def __post_init__(self) -> None:  # the rest is checked by `Schedule` (see `build`), per kind
        check_integer("schedule.warmup_steps", self.warmup_steps)
        check_finite("schedule.min_lr_ratio", self.min_lr_ratio)  # finite even where the kind ignores it
        check_finite("schedule.decay_fraction", self.decay_fraction)
        if self.total_steps is not None:
            check_integer("schedule.total_steps", self.total_steps, 1)

    def build(self, max_steps: int) -> Schedule:
        """The `Schedule` for a run of `max_steps` steps (raises `ConfigError` naming schedule.<field>)."""
        try:
            return Schedule(
                kind=self.kind,
                total_steps=self.total_steps if self.total_steps is not None else max_steps,
                warmup_steps=self.warmup_steps,
                min_lr_ratio=self.min_lr_ratio,
                decay_fraction=self.decay_fraction,
                decay_shape=self.decay_shape,
            )
        except ConfigError as e:
            raise qualify(e, "schedule") from None


@dataclass(frozen=True)
class LoopConfig:
    """[train]: the training loop; `Trainer(..., loop=...)` reads it (its keyword arguments build one).

    time_budget_min, out_dir, seed and device are the run's (train/run.py, `TrainConfig.trainer_options`);
    chunked_ce, z_loss, label_smoothing and document_mask describe the language-model objective the trainer
    builds when it is given none (`LanguageModelObjective.from_loop`)."""

    max_steps: int = 1000  # optimizer steps
    time_budget_min: float | None = None  # stop (and checkpoint) after this many minutes; none: no budget
    schedule_by: str = "step"  # "time": the budget drives the lr schedule and ends the run (needs time_budget_min)
    precision: str = "fp32"  # autocast dtype of the forward pass; weights stay fp32
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    chunked_ce: bool = False  # cross entropy over sequence chunks (never the full logits tensor)
    z_loss: float = 0.0  # coefficient of the log(Z)^2 penalty
    label_smoothing: float = 0.0
    document_mask: bool = False  # give the model the batch's position_ids and doc_ids: packed documents apart
    eval_every: int = 100  # steps between evaluations; 0: never
    eval_steps: int = 10  # validation batches per evaluation
    sample_every: int = 0  # steps between printed samples; 0: never
    log_every: int = 10
    tensorboard: bool = False  # also log to <out_dir>/tensorboard (needs: pip install 'lmforge[tensorboard]')
    checkpoint_every: int = 500  # steps between checkpoints; 0: only at the end
    keep_last: int = 2  # checkpoints kept on disk; 0: all
    out_dir: str = "runs/default"
    seed: int = 1337
    device: str = "auto"  # "auto": cuda when available, else cpu; "cuda" needs it
    skip_nonfinite: bool = False  # skip a step whose loss or gradient norm is not finite, instead of stopping
    max_consecutive_skips: int = 10  # ... but stop after this many skipped steps in a row

    def __post_init__(self) -> None:
        check_integer("train.max_steps", self.max_steps, 1)
        check_finite("train.time_budget_min", self.time_budget_min, above=0, optional=True)
        check_choice("train.schedule_by", self.schedule_by, SCHEDULE_BY)
        check_choice("train.precision", self.precision, PRECISIONS)
        check_finite("train.z_loss", self.z_loss, at_least=0)
        _unit("train.label_smoothing", self.label_smoothing)
        for name in ("eval_every", "sample_every", "checkpoint_every", "keep_last", "seed"):
            check_integer(f"train.{name}", getattr(self, name))
        for name in ("eval_steps", "log_every", "max_consecutive_skips"):
            check_integer(f"train.{name}", getattr(self, name), 1)
        check(bool(self.out_dir), "train.out_dir", self.out_dir, "must not be empty")
        check_choice("train.device", self.device, DEVICES)
        check(self.device != "cuda" or torch.cuda.is_available(), "train.device", self.device,
               "CUDA is not available on this machine (torch.cuda.is_available() is False): use cpu")  # fmt: skip


@dataclass(frozen=True)
class DistConfig:
    """[dist]: multi-process training (launched with torchrun; a single process ignores it)."""

    backend: str = "auto"  # "auto": nccl on cuda, gloo on cpu
    strategy: str = "ddp"  # "ddp": replicated weights; "fsdp": sharded (FSDP2); "zero1": DDP + sharded optimizer
    param_dtype: str | None = None  # fsdp: the dtype blocks compute in (gathered weights); none: the weights'
    reduce_dtype: str | None = None  # fsdp: the dtype gradients are reduced in; none: param_dtype's

    def __post_init__(self) -> None:
        check_choice("dist.backend", self.backend, DIST_BACKENDS)
        check_choice("dist.strategy", self.strategy, DIST_STRATEGIES)
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None:
                check_choice(f"dist.{name}", value, PRECISIONS)
                check(self.strategy == "fsdp", f"dist.{name}", value, "a mixed-precision policy needs "
                      "dist.strategy = 'fsdp'")  # fmt: skip

    def parallel_options(self) -> dict[str, Any]:
        """`distributed.parallelize`'s mixed-precision keyword arguments (torch dtypes; None: not set)."""
        return {name: DTYPES[v] if (v := getattr(self, name)) else None for name in ("param_dtype", "reduce_dtype")}


@dataclass(frozen=True)
class QuantConfig:
    """[quant]: quantization-aware training of the blocks' projections (the embeddings and the head stay float).
    "qat": fake-quantized weights (and optionally activations) with a straight-through estimator (quant/qat.py);
    "bitnet": BitNet b1.58, absmean ternary weights and per-token int8 activations (quant/bitnet.py). The layers
    train over the model's own parameters (checkpoints keep their names); the export bakes the quantized weights
    into plain linears (train/run.py)."""

    method: str = "none"  # "none", "qat" or "bitnet"
    bits: int = 4  # qat: weight bits (2..8)
    group_size: int | None = 128  # qat: input columns per weight scale; none: one scale per output row
    activations: int | None = None  # qat: per-token activation bits (2..8); none: float activations

    def __post_init__(self) -> None:
        check_choice("quant.method", self.method, QUANT_METHODS)
        check_integer("quant.bits", self.bits, 2)
        check(self.bits <= 8, "quant.bits", self.bits, "must be in 2..8")
        if self.group_size is not None:
            check_integer("quant.group_size", self.group_size, 1)
        if self.activations is not None:
            check_integer("quant.activations", self.activations, 2)
            check(self.activations <= 8, "quant.activations", self.activations, "must be in 2..8")
        qat_only = {"bits": 4, "group_size": 128, "activations": None}
        for name, default in qat_only.items():
            value = getattr(self, name)
            check(self.method == "qat" or value == default, f"quant.{name}", value,
                  f"is an option of quant.method = 'qat', not {self.method!r}")  # fmt: skip


@dataclass(frozen=True)
class DistillConfig:
    """[distill]: train the model (the student) on a frozen teacher's distributions (train/distill.py): per counted
    token alpha T^2 D + (1 - alpha) CE, D the `loss` divergence at temperature T; `lmforge distill` sets it.

    on_policy_fraction (GKD's lambda): the share of training rows replaced by the student's own continuation of
    their first prompt_tokens tokens (needs data.tokenizer). Validation stays the student's plain cross entropy."""

    teacher: str | None = None  # the teacher model: HF directory, GGUF file or lmforge run; none: no distillation
    loss: str = "forward_kl"  # "forward_kl" KL(teacher || student), "reverse_kl" KL(student || teacher), "jsd"
    beta: float = 0.5  # jsd only: the generalized JSD's beta in [0, 1] (0: forward KL, 1: reverse KL)
    temperature: float = 1.0  # softmax temperature T of both distributions, > 0
    alpha: float = 1.0  # weight of the divergence; 1 - alpha: of the hard-label cross entropy
    on_policy_fraction: float = 0.0  # in [0, 1]
    prompt_tokens: int = 32  # on-policy rows: tokens of the row kept as the prompt

    def __post_init__(self) -> None:
        check(self.teacher is None or bool(self.teacher), "distill.teacher", self.teacher, "must not be empty")
        check_choice("distill.loss", self.loss, DISTILL_LOSSES)
        check(is_finite(self.beta) and 0.0 <= self.beta <= 1.0, "distill.beta", self.beta, "must be in [0, 1]")
        check(self.loss == "jsd" or self.beta == 0.5, "distill.beta", self.beta,
              f"is an option of distill.loss = 'jsd', not {self.loss!r}")  # fmt: skip
        check_finite("distill.temperature", self.temperature, above=0)
        for name in ("alpha", "on_policy_fraction"):
            value = getattr(self, name)
            check(is_finite(value) and 0.0 <= value <= 1.0, f"distill.{name}", value, "must be in [0, 1]")
        check_integer("distill.prompt_tokens", self.prompt_tokens, 1)


def _tiny() -> ModelConfig:
    return PRESETS["tiny"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a pre-training run needs; see the module docstring for the file format."""

    model: ModelConfig = field(default_factory=_tiny)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:  # checks that span sections (or the trainer's keyword form does not have)
        self.schedule.build(self.train.max_steps)
        check(self.train.schedule_by == "step" or self.train.time_budget_min is not None, "train.schedule_by",
              self.train.schedule_by, "a time-driven schedule needs train.time_budget_min")  # fmt: skip
        check(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            self.data.seq_len,
            f"must be <= model.max_seq_len={self.model.max_seq_len}",
        )
        check(
            not (self.dist.backend == "nccl" and self.train.device == "cpu"),
            "dist.backend",
            self.dist.backend,
            "nccl needs train.device cuda or auto",
        )
        check(self.dist.backend != "nccl" or torch.cuda.is_available(), "dist.backend", self.dist.backend,
               "nccl needs CUDA, which is not available on this machine; use gloo or auto")  # fmt: skip
        self._check_distill()

    def _check_distill(self) -> None:
        distill = self.distill
        check(distill.teacher is not None or distill == DistillConfig(), "distill.teacher", distill.teacher,
              "the [distill] options need a teacher model (distill.teacher, or `lmforge distill TEACHER`)")  # fmt: skip
        if distill.on_policy_fraction > 0:
            check(distill.prompt_tokens < self.data.seq_len, "distill.prompt_tokens", distill.prompt_tokens,
                  f"must be < data.seq_len={self.data.seq_len} (on-policy rows continue the prompt to the row's "
                  "length)")  # fmt: skip
            check(self.data.tokenizer is not None, "distill.on_policy_fraction", distill.on_policy_fraction,
                  "on-policy rows are generated by the student: set data.tokenizer")  # fmt: skip
            check(not self.train.document_mask, "distill.on_policy_fraction", distill.on_policy_fraction,
                  "generated rows are no packed documents: train.document_mask must be false")  # fmt: skip
            check(self.dist.strategy != "fsdp", "distill.on_policy_fraction", distill.on_policy_fraction,
                  "the student generates inside the objective, which FSDP2's sharded weights do not allow: "
                  "use dist.strategy 'ddp' or 'zero1'")  # fmt: skip

    def lr_schedule(self) -> Schedule:
        return self.schedule.build(self.train.max_steps)

    def trainer_options(self) -> dict[str, Any]:
        """The `Trainer` arguments this config holds outside [train]'s loop options, in the trainer's units: the
        run directory (train.out_dir), the time budget in seconds (train.time_budget_min), gradient accumulation
        ([data]) and clipping ([optim]; none: 0, no clipping). The one place they are translated."""
        budget = self.train.time_budget_min
        return {"run_dir": self.train.out_dir, "time_budget_s": budget * 60 if budget else None,
                "grad_accum": self.data.grad_accum, "grad_clip": self.optim.grad_clip or 0.0}  # fmt: skip


SECTIONS: dict[str, type] = typing.get_type_hints(TrainConfig)  # section name -> its dataclass
TITLE = "lmforge training config, fully resolved"  # the first line (a comment) of a resolved config.toml
OVERRIDE_EXAMPLE = "optim.lr=3e-4"


# ---------------------------------------------------------------------------------------------------------------
# dicts <-> TrainConfig (the generic machinery is `lmforge.configfile`)


def _build_model(data: dict[str, Any]) -> ModelConfig:
    """[model]: `preset` (default "tiny"; "none": `ModelConfig()`) with the other keys as field overrides."""
    data = dict(data)
    preset = convert("model.preset", data.pop("preset", "tiny"), str)
    if preset == NONE:
        base = ModelConfig()
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise unknown("preset", preset, PRESETS)
    if base.mla is None and base.head_dim == base.d_model // base.n_heads:
        data.setdefault("head_dim", NONE)  # the preset's head_dim was derived, not chosen: follow d_model / n_heads
    return build(ModelConfig, data, "model", base)


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """A validated `TrainConfig` from nested dicts of TOML values (missing sections and fields take defaults)."""
    sections = {}
    for name, value in d.items():
        if name not in SECTIONS:
            raise unknown("section", name, SECTIONS)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table ([{name}]), got {value!r}")
        sections[name] = _build_model(value) if name == "model" else build(SECTIONS[name], value, name)
    return TrainConfig(**sections)


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """Every field of every section as nested dicts of plain values (tuples as lists, None kept)."""
    return configfile.to_dict(config)


def dumps(config: TrainConfig) -> str:
    """The resolved config as TOML text (every field written; None as "none")."""
    return configfile.dumps(config, TITLE)


def save_resolved(config: TrainConfig, run_dir: str | Path) -> Path:
    """Write `config` as `run_dir/config.toml` (atomically); `load_train_config` of it returns an equal config."""
    path = Path(run_dir) / CONFIG_FILE
    atomic_write(path, dumps(config))
    return path


# ---------------------------------------------------------------------------------------------------------------
# files and overrides


def _field_owners(name: str) -> list[str]:
    """`section.name` for every section with a field `name` (to help with a key that forgot its section)."""
    owners = [f"{s}.{name}" for s, cls in SECTIONS.items() if name in file_fields(cls)]
    return owners + (["model.preset"] if name == "preset" else [])


def apply_override(d: dict[str, Any], override: str) -> None:
    """Set `section.field[.subfield]=value` in the nested dict `d` (in place); see `configfile.apply_override`."""
    configfile.apply_override(d, override, OVERRIDE_EXAMPLE, _field_owners)


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The `TrainConfig` of the TOML file at `path` (None: no file, all defaults) with `overrides` applied in order.
    A `ConfigError` about a field names the file (and says when --set overrides were applied to it)."""
    d = read_toml(path) if path is not None else {}
    for override in overrides:
        apply_override(d, override)
    try:
        return from_dict(d)
    except ConfigError as e:
        if path is None:
            raise
        origin = f"{path} (with --set {' '.join(overrides)})" if overrides else str(path)
        raise ConfigError(f"{origin}: {e}") from None
