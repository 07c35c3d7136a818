"""Stage wiring for a training run: a `TrainConfig` becomes loaders, a model, an optimizer, a schedule and a
`Trainer`; at the end the trained model is exported next to its logs.

    build_trainer   TrainConfig (+ the tokenizer data.tokenizer names) -> Trainer: token shards -> train/val
                    loaders (the global batch split over torchrun's ranks), the model's language-model objective
                    wrapped for dist.strategy, the optimizer over its parameters (sharded for zero1), the
                    schedule; [train] goes to the Trainer whole, the rest through `TrainConfig.trainer_options`;
                    [quant] swaps the blocks' projections for QAT or BitNet layers first (`quantization_aware`);
                    with a [distill] teacher the objective is `DistillationObjective` (train/distill.py) against
                    that model (loaded as `initial_model` loads one), and on-policy rows are drawn by
                    `OnPolicyBatches`
    export_run      the trained model -> run_dir/hf (Hugging Face) and run_dir/model.gguf (F16, when GGUF can
                    hold it); after [quant] training, with the quantized weights baked in (`baked`)
    run_training    both, with the resolved config saved and the run resumed from its newest checkpoint: what
                    `lmforge train` runs (`lmforge.cli.train` only parses flags and prints the result)
    initial_model   `--init MODEL`: the weights a run starts from (continued pre-training): a Hugging Face
                    directory or GGUF file (`lmforge.load`), or an lmforge run directory (its config.toml and
                    newest checkpoint) or one of its checkpoint files. The run's [model] becomes that model's
                    config, and its tokenizer is the run's when data.tokenizer is not given

A mistake in the config (including a value the trainer or the loaders refuse) raises a `ConfigError` naming the
config key; a checkpoint that cannot be resumed and a run that diverges raise their own `LmforgeError`s.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmforge.config import ConfigError
from lmforge.data.loader import RandomWindowLoader, SequentialLoader, TokenDataset
from lmforge.io.gguf_export import save_gguf
from lmforge.io.hf import save_hf
from lmforge.io.load import load_model, load_tokenizer
from lmforge.model.transformer import Transformer
from lmforge.quant.bitnet import BitLinear, bitnet_model, convert_bitnet
from lmforge.quant.qat import FakeQuantLinear, convert_qat, prepare_qat
from lmforge.train import distributed
from lmforge.train.checkpoint import gather_model, latest_checkpoint, list_checkpoints, load_checkpoint
from lmforge.train.config import CONFIG_FILE, QuantConfig, TrainConfig, load_train_config, save_resolved
from lmforge.train.distill import DistillationObjective, OnPolicyBatches
from lmforge.train.distributed import DistInfo
from lmforge.train.objective import LanguageModelObjective
from lmforge.train.optim import build_optimizer
from lmforge.train.trainer import Trainer
from lmforge.utils.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.tokenizer import Tokenizer


@dataclasses.dataclass
class TrainResult:
    """What a finished run leaves: its last step and metrics, the exported paths (rank 0 only) and the process
    group to leave (`distributed.shutdown(result.dist)` ends a multi-process run)."""

    step: int
    metrics: dict[str, Any]
    written: list[Path]
    dist: DistInfo


def build_trainer(
    cfg: TrainConfig, tokenizer: Tokenizer | None = None, progress: bool = True, model: Transformer | None = None
) -> Trainer:
    """The Trainer for a `TrainConfig` whose data.shards names a shard directory; `tokenizer` is the one
    data.tokenizer names (for bits per byte, samples and the export), loaded by the caller; `model` the weights
    to start from (of config cfg.model; default: a new model, initialised with train.seed).

    Under torchrun it joins the process group first: each rank loads `data.batch_size * data.grad_accum` rows of
    the global batch, and the model is wrapped for `dist.strategy` before the optimizer sees its parameters. A
    value the trainer or the loaders refuse is a mistake in the config: it is raised as a ConfigError."""
    try:
        return _wire(cfg, tokenizer, progress, model)
    except LmforgeError:
        raise
    except ValueError as e:  # the trainer's and the data loader's checks of values the config set
        raise ConfigError(str(e)) from None


def _wire(cfg: TrainConfig, tokenizer: Tokenizer | None, progress: bool, model: Transformer | None) -> Trainer:
    """build_trainer without the translation of the stages' ValueErrors."""
    data, loop = cfg.data, cfg.train
    if data.shards is None:
        raise ConfigError("data.shards: no token shards given (make them with `lmforge tokenizer encode`)")
    dataset = TokenDataset(data.shards)
    if dataset.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the shards' {dataset.vocab_size}")
    train_split, val_split = dataset.split(data.val_fraction)
    info = distributed.setup(cfg.dist.backend, loop.device)
    rows = data.batch_size * data.grad_accum * info.world_size  # the global batch of one optimizer step
    loader = RandomWindowLoader if data.loader == "random" else SequentialLoader
    seed_kw = {"seed": data.seed} if data.loader == "random" else {}
    train_data = loader(train_split, rows, data.seq_len, **seed_kw, rank=info.rank, world_size=info.world_size)
    val_data = SequentialLoader(val_split, data.batch_size, data.seq_len) if data.val_fraction > 0 else None

    torch.manual_seed(loop.seed)
    model = (Transformer(cfg.model) if model is None else model).to(info.device)
    quantization_aware(model, cfg.quant)
    strategy = cfg.dist.strategy
    objective = distributed.parallelize(_objective(cfg, model, tokenizer, info), strategy, info,
                                        **cfg.dist.parallel_options())  # fmt: skip
    if cfg.distill.on_policy_fraction > 0:
        train_data = OnPolicyBatches(train_data, cfg.distill.on_policy_fraction, data.seed)
    opt = cfg.optim
    optimizer = build_optimizer(opt.name, model, opt.lr, opt.weight_decay, **opt.optimizer_kwargs())
    optimizer = distributed.shard_optimizer(optimizer, strategy, info)
    return Trainer(model, optimizer, cfg.lr_schedule(), train_data, objective, loop, val_data=val_data,
                   tokenizer=tokenizer, progress=progress, dist=info, **cfg.trainer_options())  # fmt: skip


def _objective(cfg: TrainConfig, model: Transformer, tokenizer: Tokenizer | None,
               info: DistInfo) -> LanguageModelObjective:  # fmt: skip
    """The language-model objective of [train], or with a [distill] teacher the distillation objective."""
    if cfg.distill.teacher is None:
        return LanguageModelObjective.from_loop(model, cfg.train)
    teacher = initial_model(cfg.distill.teacher)[0].to(info.device)
    return DistillationObjective.from_config(model, teacher, cfg.distill, cfg.train, tokenizer)


def quantization_aware(model: Transformer, quant: QuantConfig) -> None:
    """Swap the blocks' projections for [quant]'s training layers, over their own parameters (config.py)."""
    if quant.method == "qat":
        prepare_qat(model, quant.bits, quant.group_size, quant.activations)
    elif quant.method == "bitnet":
        bitnet_model(model)


def baked(model: Transformer, quant: QuantConfig) -> Transformer:
    """The model an export holds: [quant]'s quantized weights baked into plain linears (a gathered FSDP2 model,
    plain again, is swapped first), so the exported model computes what training computed, activations aside."""
    if quant.method == "none":
        return model
    if not any(isinstance(m, FakeQuantLinear | BitLinear) for m in model.modules()):
        quantization_aware(model, quant)
    return convert_qat(model) if quant.method == "qat" else convert_bitnet(model)


def export_run(model: torch.nn.Module, tokenizer: Tokenizer | None, run_dir: Path) -> list[Path]:
    """The trained model as `run_dir/hf` (Hugging Face) and `run_dir/model.gguf` (F16) when GGUF can hold it."""
    model = model.cpu().eval()
    save_hf(model, run_dir / "hf", tokenizer=tokenizer)
    written = [run_dir / "hf"]
    if tokenizer is not None:
        try:
            save_gguf(model, tokenizer, run_dir / "model.gguf", "f16")
            written.append(run_dir / "model.gguf")
        except ValueError as e:  # a config or tokenizer GGUF cannot represent: the HF directory is enough
            warnings.warn(f"no GGUF export: {e}", stacklevel=2)
    return written


def initial_model(path: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """The float32 model (and tokenizer, or None) `--init path` names (module docstring)."""
    path = Path(path)
    run_dir = path.parent.parent if path.is_file() and path.parent.name == "checkpoints" else path
    if not (run_dir / CONFIG_FILE).is_file() or not list_checkpoints(run_dir):
        return load_model(path, torch.float32)
    run = load_train_config(run_dir / CONFIG_FILE)
    model = Transformer(run.model)
    load_checkpoint(path if path.is_file() else latest_checkpoint(run_dir), model, restore_rng=False)
    tokenizer = load_tokenizer(run.data.tokenizer) if run.data.tokenizer else None
    return model.float(), tokenizer


def run_training(
    cfg: TrainConfig, tokenizer: Tokenizer | None = None, resume: bool = True, init: str | Path | None = None
) -> TrainResult:
    """Train as `cfg` says (module doc): rank 0 saves the resolved config to train.out_dir, the run continues from
    its newest checkpoint when `resume`, and rank 0 exports the model (FSDP2: the shards gathered first). With
    `init`, the run starts from that model (`initial_model`): its config replaces cfg.model, and its tokenizer
    serves when `tokenizer` is None."""
    model = None
    if init is not None:
        model, init_tokenizer = initial_model(init)
        if cfg.model not in (TrainConfig().model, model.config):
            raise ConfigError(f"model: the run sets the architecture, and --init {init} defines it too; drop the "
                              "[model] section (and --set model.* overrides) when starting from a model")  # fmt: skip
        cfg = dataclasses.replace(cfg, model=model.config)
        tokenizer = tokenizer if tokenizer is not None else init_tokenizer
    trainer = build_trainer(cfg, tokenizer, model=model)
    run_dir = Path(cfg.train.out_dir)
    if trainer.dist.is_main:
        save_resolved(cfg, run_dir)
    last = trainer.fit(resume=resume)
    model = gather_model(trainer.model, lambda: Transformer(cfg.model))  # FSDP2: the shards gathered on rank 0
    model = baked(model, cfg.quant)
    written = export_run(model, tokenizer, run_dir) if trainer.dist.is_main else []
    return TrainResult(step=trainer.step, metrics=last, written=written, dist=trainer.dist)
