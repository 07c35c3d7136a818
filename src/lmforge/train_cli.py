"""`lmforge train RUN.toml --set optim.lr=3e-4`: pre-train a model on token shards.

Several processes: `torchrun --standalone --nproc_per_node=N -m lmforge train RUN.toml` (DDP by default,
`--set dist.strategy=fsdp` for FSDP2; see `lmforge.train.distributed`).

The run directory (`train.out_dir`) receives config.toml (the resolved config), log.jsonl, loss.png,
checkpoints/ (the run resumes from the newest one), and at the end the model as a Hugging Face directory
(`hf/`) and, when the format can hold it, a GGUF file (`model.gguf`).

A mistake in the config, a checkpoint that cannot be resumed (corrupt, foreign, or not safe to unpickle) and a
run that diverges (a non-finite loss) end the command with one `error:` line and exit status 1: they are
`LmforgeError`s, which `lmforge.cli` reports (`cli_errors.reports_errors`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

err = Console(stderr=True)


def build_trainer(cfg: Any, progress: bool = True) -> tuple[Any, Any]:
    """(Trainer, tokenizer or None) for a `TrainConfig` whose data.shards names a shard directory.

    Under torchrun it joins the process group first: each rank loads `data.batch_size * data.grad_accum` rows of
    the global batch, and the model is wrapped for `dist.strategy` before the optimizer sees its parameters."""
    import torch

    import lmforge
    from lmforge.config import ConfigError
    from lmforge.data.loader import RandomWindowLoader, SequentialLoader, TokenDataset
    from lmforge.train import distributed
    from lmforge.train.loss import ModelLoss
    from lmforge.train.optim import build_optimizer
    from lmforge.train.trainer import Trainer

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
    tokenizer = lmforge.load_tokenizer(data.tokenizer) if data.tokenizer else None

    torch.manual_seed(loop.seed)
    model = lmforge.Transformer(cfg.model).to(info.device)
    parallel = distributed.parallelize(ModelLoss(model), cfg.dist.strategy, info)
    opt = cfg.optim
    optimizer = build_optimizer(opt.name, model, opt.lr, opt.weight_decay, **opt.optimizer_kwargs())
    trainer = Trainer(
        model, optimizer, cfg.lr_schedule(), train_data,
        max_steps=loop.max_steps, val_data=val_data, run_dir=loop.out_dir, grad_accum=data.grad_accum,
        grad_clip=opt.grad_clip or 0.0, precision=loop.precision, compile=loop.compile,
        activation_checkpointing=loop.activation_checkpointing, chunked_ce=loop.chunked_ce, z_loss=loop.z_loss,
        label_smoothing=loop.label_smoothing, log_every=loop.log_every, eval_every=loop.eval_every,
        eval_steps=loop.eval_steps, checkpoint_every=loop.checkpoint_every, keep_last=loop.keep_last,
        tokenizer=tokenizer, sample_every=loop.sample_every,
        time_budget_s=loop.time_budget_min * 60 if loop.time_budget_min else None, progress=progress,
        tensorboard=loop.tensorboard, skip_nonfinite=loop.skip_nonfinite,
        max_consecutive_skips=loop.max_consecutive_skips, dist=info, parallel=parallel,
    )  # fmt: skip
    return trainer, tokenizer


def export_run(model: Any, tokenizer: Any, run_dir: Path) -> list[Path]:
    """The trained model as `run_dir/hf` (Hugging Face) and `run_dir/model.gguf` (F16) when GGUF can hold it."""
    import lmforge

    model = model.cpu().eval()
    lmforge.save(model, run_dir / "hf", tokenizer)
    written = [run_dir / "hf"]
    if tokenizer is not None:
        try:
            lmforge.save(model, run_dir / "model.gguf", tokenizer, qtype="f16")
            written.append(run_dir / "model.gguf")
        except ValueError as e:  # a config or tokenizer GGUF cannot represent: the HF directory is enough
            warnings.warn(f"no GGUF export: {e}", stacklevel=2)
    return written


def train_command(
    config: Annotated[Path | None, typer.Argument(help="A TOML run file (omitted: all defaults).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override one field, e.g. --set optim.lr=3e-4 (repeatable)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in the run directory.")] = True,
) -> None:
    """Pre-train a model on token shards; logs, checkpoints and the exported model go to train.out_dir."""
    from lmforge import Transformer
    from lmforge.config import ConfigError
    from lmforge.train import distributed
    from lmforge.train.checkpoint import gather_model
    from lmforge.train.config import load_train_config, save_resolved
    from lmforge.utils.errors import LmforgeError

    cfg = load_train_config(config, set_ or [])
    try:
        trainer, tokenizer = build_trainer(cfg)
    except LmforgeError:
        raise
    except ValueError as e:  # the trainer's and the data loader's checks of values the config set
        raise ConfigError(str(e)) from None
    run_dir = Path(cfg.train.out_dir)
    if trainer.dist.is_main:
        save_resolved(cfg, run_dir)
    last = trainer.fit(resume=resume)
    model = gather_model(trainer.model, lambda: Transformer(cfg.model))  # FSDP2: the shards gathered on rank 0
    if trainer.dist.is_main:
        for path in export_run(model, tokenizer, run_dir):
            err.print(f"wrote {path}", highlight=False)
        summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
        err.print(f"step {trainer.step}: {summary}", highlight=False)
    distributed.shutdown(trainer.dist)  # multi-process runs end here (exit code 0)
