"""`lmforge distill TEACHER --student RUN.toml [--loss forward_kl|reverse_kl|jsd] [--beta 0.5] [--temperature 1]
[--alpha 1] [--on-policy-fraction 0] [--set ...]`: train the student a `lmforge train` config describes on the
distributions of a frozen teacher (knowledge distillation, train/distill.py; docs/distillation.md).

TEACHER is a Hugging Face directory, a GGUF file or an lmforge run directory, with the student's vocabulary (any
size or architecture). The flags set the config's [distill] section (they override the file and --set); the run
is `lmforge train`'s (`lmforge.train.run.run_training`): the same run directory, logs, checkpoints, resume and
export, with validation bits per byte of the student's plain cross entropy.

Checked before any training, each with one `error:` line naming what is wrong: a TEACHER path that does not
exist, a flag out of range (--beta outside [0, 1], --beta without --loss jsd, --temperature <= 0, --alpha or
--on-policy-fraction outside [0, 1]), a teacher whose vocab_size differs from the student's model.vocab_size.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lmforge.configfile import ConfigError

err = Console(stderr=True)
FLAGS = {"loss": "--loss", "beta": "--beta", "temperature": "--temperature", "alpha": "--alpha",
         "on_policy_fraction": "--on-policy-fraction"}  # [distill] field -> its flag  # fmt: skip
TEACHER_HELP = "The teacher: a Hugging Face directory, .gguf file or lmforge run, with the student's vocabulary."
LOSS_HELP = "forward_kl (KL(teacher || student)), reverse_kl, or jsd (generalized JSD, --beta). [default: forward_kl]"
ALPHA_HELP = "Weight of the divergence against the hard-label cross entropy, in [0, 1]. [default: 1.0]"
ON_POLICY_HELP = "Share of rows the student generates itself (GKD's lambda), in [0, 1]. [default: 0]"


def distill_command(
    teacher: Annotated[Path, typer.Argument(help=TEACHER_HELP)],
    student: Annotated[Path | None, typer.Option(help="The student's `lmforge train` TOML config.")] = None,
    loss: Annotated[str | None, typer.Option(help=LOSS_HELP)] = None,
    beta: Annotated[float | None, typer.Option(help="--loss jsd: beta in [0, 1]. [default: 0.5]")] = None,
    temperature: Annotated[float | None, typer.Option(help="Softmax temperature, > 0. [default: 1.0]")] = None,
    alpha: Annotated[float | None, typer.Option(help=ALPHA_HELP)] = None,
    on_policy_fraction: Annotated[float | None, typer.Option(help=ON_POLICY_HELP)] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override one field, e.g. --set optim.lr=3e-4 (repeatable)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in the run directory.")] = True,
) -> None:
    """Distill TEACHER into the student of --student; logs, checkpoints and the exported model go to train.out_dir."""
    import lmforge
    from lmforge.train import distributed
    from lmforge.train.config import load_train_config
    from lmforge.train.run import run_training

    if not teacher.exists():
        raise ConfigError(f"TEACHER {teacher}: no such file or directory")
    cfg = load_train_config(student, [*(set_ or []), f"distill.teacher={json.dumps(str(teacher))}"])
    given = {name: value for name, value in (("loss", loss), ("beta", beta), ("temperature", temperature),
             ("alpha", alpha), ("on_policy_fraction", on_policy_fraction)) if value is not None}  # fmt: skip
    try:
        cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, **given))
    except ConfigError as e:
        message = str(e)
        for name in given:
            message = message.replace(f"distill.{name}=", f"{FLAGS[name]}=")
        raise ConfigError(message) from None
    tokenizer = lmforge.load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
    result = run_training(cfg, tokenizer, resume=resume)
    if result.dist.is_main:
        for path in result.written:
            err.print(f"wrote {path}", highlight=False)
        summary = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if isinstance(v, float))
        err.print(f"step {result.step}: {summary}", highlight=False)
    distributed.shutdown(result.dist)
