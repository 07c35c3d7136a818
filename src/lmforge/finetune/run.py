"""`lmforge finetune`'s stages: a pretrained model + SFT JSONL -> the one trainer -> an adapter (or a model) in DIR.

    load      the model (float32, any file `lmforge.load` reads) and its tokenizer; the data (`data.sft`): chat
              records rendered with the tokenizer's chat template, the loss on the assistant's tokens alone;
              prompt/completion pairs likewise on the completion
    method    full      every parameter trains
              lora      `finetune.lora` adapters (rank, alpha, dropout, rsLoRA, target patterns); the rest frozen
              dora      the same with DoRA's magnitude
              qlora     LoRA on a 4-bit base: every linear layer of the blocks stored in NF4 (`quant.nf4`, block
                        64, double-quantized scales), computed in bf16; float32 adapters
              prompt    prompt tuning: `num_virtual_tokens` trainable input embeddings (`finetune.prompt_tuning`)
              prefix    prefix tuning: per-layer trainable keys and values (`finetune.prefix_tuning`; with
                        `prefix_projection`, PEFT's reparameterisation MLP)
                        (prompt, prefix: one example per row, padded, `PromptLearningObjective`; the virtual
                        tokens take num_virtual_tokens places of the context)
    train     the shared `Trainer` with the language-model objective under the document mask (packed examples
              never attend to each other; the LM head fused into a chunked cross entropy, so the (tokens, vocab)
              logits never exist), AdamW (no weight decay by default, as PEFT's recipes), a cosine schedule with
              warmup; steps = --max-steps, else ceil(epochs x steps per epoch); validation loss
              on --val every eval_every steps (the whole file, in order); progress bar and DIR/log.jsonl,
              DIR/loss.png; checkpoints in DIR/checkpoints (adapters: the trainable tensors alone), from which a
              rerun of the same command resumes bit for bit
    write     adapters: DIR/adapter_config.json + DIR/adapter_model.safetensors (PEFT's format: `peft` and
              `lmforge.load(base, adapter=DIR)` read them); full: DIR/hf (a Hugging Face directory with the
              tokenizer). `merge=True` also writes the merged model to DIR/merged, `gguf=True` to DIR/model.gguf
              (QLoRA: merged into the float base model, reloaded, not into its 4-bit copy)

The run's settings are saved in DIR/finetune.json; a rerun with other settings than the checkpoints were made
with is refused (start a new DIR, or delete its checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.configfile import ConfigError, check, check_finite, check_integer, check_positive
from lmforge.data.sft import SFTLoader, load_sft, pad_token_id
from lmforge.finetune.adapter_files import load_adapter, save_adapter
from lmforge.finetune.lora import DEFAULT_TARGETS, LoraConfig, add_adapter, merge_and_unload, train_only_adapter
from lmforge.finetune.prefix_tuning import add_prefix_tuning
from lmforge.finetune.prompt_files import save_prompt
from lmforge.finetune.prompt_tuning import PromptLearningObjective, add_prompt_tuning, train_only_prompt
from lmforge.io.gguf_export import save_gguf
from lmforge.io.hf import save_hf
from lmforge.io.load import load_model
from lmforge.quant.nf4 import quantize_model_nf4
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.config import LoopConfig, ScheduleConfig
from lmforge.train.objective import LanguageModelObjective
from lmforge.train.optim import build_optimizer
from lmforge.train.trainer import Trainer
from lmforge.utils.atomic import atomic_write

__all__ = ["METHODS", "FinetuneConfig", "FinetuneResult", "finetune"]

METHODS = ("full", "lora", "dora", "qlora", "prompt", "prefix")
LORA_METHODS = ("lora", "dora", "qlora")
SETTINGS_FILE = "finetune.json"


@dataclass(frozen=True)
class FinetuneConfig:
    """What `lmforge finetune` does; each field is the flag of the same name (`--help` explains them)."""

    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target: Sequence[str] = DEFAULT_TARGETS
    rslora: bool = False
    lr: float | None = None  # None: 2e-4 with adapters, 2e-5 for full fine-tuning
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    seq_len: int = 512
    packing: bool = True
    warmup_steps: int | None = None  # None: 5% of the steps
    grad_clip: float = 1.0
    precision: str = "fp32"
    eval_every: int = 50
    log_every: int = 5
    checkpoint_every: int = 100
    seed: int = 0
    skip_invalid: bool = False
    chunked_ce: bool = True  # the LM head fused into the loss: the (tokens, vocab) logits never exist (train/loss.py)
    num_virtual_tokens: int = 20  # prompt, prefix
    prefix_projection: bool = False  # prefix: PEFT's reparameterisation MLP

    def __post_init__(self) -> None:
        check(self.method in METHODS, "method", self.method, f"must be one of {', '.join(METHODS)}")
        for name in ("batch_size", "seq_len", "log_every"):
            check_positive(name, getattr(self, name))
        check_finite("epochs", self.epochs, at_least=0.0)
        check(self.epochs > 0 or self.max_steps is not None, "epochs", self.epochs, "must be > 0 (or give max_steps)")
        if self.max_steps is not None:
            check_positive("max_steps", self.max_steps)
        if self.lr is not None:
            check(math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "must be a number > 0")
        check_integer("eval_every", self.eval_every, 0)
        check_integer("checkpoint_every", self.checkpoint_every, 0)
        object.__setattr__(self, "target", (self.target,) if isinstance(self.target, str) else tuple(self.target))
        check_positive("num_virtual_tokens", self.num_virtual_tokens)
        if self.method in LORA_METHODS:
            self.lora()  # its own checks (rank, alpha, dropout, target)

    @property
    def adapter(self) -> bool:
        return self.method != "full"

    @property
    def prompt_learning(self) -> bool:
        return self.method in ("prompt", "prefix")

    @property
    def learning_rate(self) -> float:
        default = {"full": 2e-5, "prompt": 3e-2, "prefix": 1e-2}.get(self.method, 2e-4)
        return self.lr if self.lr is not None else default

    def lora(self) -> LoraConfig:
        return LoraConfig(r=self.rank, alpha=self.alpha, dropout=self.dropout, target=self.target,
                          rslora=self.rslora, dora=self.method == "dora")  # fmt: skip

    def settings(self) -> dict[str, Any]:
        """The fields that shape the trained result (compared on resume), as JSON values."""
        d = dataclasses.asdict(self)
        d["target"] = list(self.target)
        return {k: v for k, v in d.items() if k not in ("eval_every", "log_every", "checkpoint_every")}


@dataclass
class FinetuneResult:
    """What a finished run leaves: its last step and metrics, the trainable parameter count, what it wrote."""

    step: int
    metrics: dict[str, Any]
    trainable: int
    examples: int
    skipped: int
    written: list[Path]


def finetune(
    model_path: str | Path, data: str | Path, out: str | Path, config: FinetuneConfig | None = None, *,
    val: str | Path | None = None, merge: bool = False, gguf: bool = False, progress: bool = True,
) -> FinetuneResult:  # fmt: skip
    """Fine-tune the model at `model_path` on the SFT JSONL `data` into `out` (module docstring)."""
    config = config or FinetuneConfig()
    out = Path(out)
    _check_settings(out, config, model_path, data)
    model, tokenizer = load_model(model_path, torch.float32)
    if tokenizer is None:
        raise ConfigError(f"{model_path}: has no tokenizer; fine-tuning renders the data with it")
    virtual = config.num_virtual_tokens if config.prompt_learning else 0
    check(config.seq_len + virtual <= model.config.max_seq_len, "seq_len", config.seq_len,
          f"must be <= the model's context ({model.config.max_seq_len}"
          + (f" less the {virtual} virtual tokens)" if virtual else ")"))  # fmt: skip
    if config.prompt_learning and (merge or gguf):
        raise ConfigError(f"--merge / --gguf: a {config.method}-tuned model's virtual tokens are not weights to "
                          "merge; load it with lmforge.load(base, adapter=DIR)")  # fmt: skip
    packing = config.packing and not config.prompt_learning  # virtual tokens lead each row: one example a row
    examples = load_sft(data, tokenizer, config.seq_len, skip_invalid=config.skip_invalid)
    pad = pad_token_id(tokenizer)
    loader = SFTLoader(examples, config.batch_size, config.seq_len, packing=packing, seed=config.seed, pad_id=pad)
    val_loader = None
    if val is not None:
        val_examples = load_sft(val, tokenizer, config.seq_len, skip_invalid=config.skip_invalid)
        val_loader = SFTLoader(val_examples, config.batch_size, config.seq_len, packing=packing, shuffle=False,
                               pad_id=pad)  # fmt: skip

    torch.manual_seed(config.seed)  # the adapter's initial A (a resumed run loads the checkpoint's over it)
    objective = LanguageModelObjective(model, document_mask=True, chunked=config.chunked_ce)
    if config.method == "qlora":
        quantize_model_nf4(model)
    if config.method in LORA_METHODS:
        add_adapter(model, config.lora())
        trainable = train_only_adapter(model)
    elif config.prompt_learning:
        if config.method == "prompt":
            add_prompt_tuning(model, config.num_virtual_tokens)
        else:
            add_prefix_tuning(model, config.num_virtual_tokens, projection=config.prefix_projection)
        trainable = train_only_prompt(model)
        objective = PromptLearningObjective(model)
    else:
        trainable = sum(p.numel() for p in model.parameters())
    steps = config.max_steps or max(1, math.ceil(config.epochs * len(loader)))
    warmup = config.warmup_steps if config.warmup_steps is not None else steps // 20
    loop = LoopConfig(
        max_steps=steps, precision=config.precision, document_mask=not config.prompt_learning, out_dir=str(out),
        seed=config.seed, chunked_ce=config.chunked_ce and not config.prompt_learning,
        eval_every=config.eval_every if val_loader is not None else 0,
        eval_steps=len(val_loader) if val_loader is not None else 1, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, keep_last=2,
    )  # fmt: skip
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    optimizer = build_optimizer("adamw", model, config.learning_rate, config.weight_decay)
    schedule = ScheduleConfig(kind="cosine", warmup_steps=min(warmup, steps - 1)).build(steps)
    trainer = Trainer(model, optimizer, schedule, loader, objective, loop,
                      val_data=val_loader, run_dir=out, grad_clip=config.grad_clip, tokenizer=tokenizer,
                      progress=progress, trainable_checkpoints=config.adapter)  # fmt: skip
    metrics = trainer.fit(resume=True)
    written = _write(model.eval(), tokenizer, out, config, model_path, merge, gguf)
    return FinetuneResult(trainer.step, metrics, trainable, len(examples), examples.skipped, written)


def _write(model: Any, tokenizer: Any, out: Path, config: FinetuneConfig, base: str | Path, merge: bool,
           gguf: bool) -> list[Path]:  # fmt: skip
    """The adapter (or the full model) and, if asked, the merged model as HF and GGUF (module docstring)."""
    written = []
    if config.prompt_learning:
        save_prompt(model, out, base_model=str(base))
        return [out / "adapter_model.safetensors"]
    if config.adapter:
        save_adapter(model, out, base_model=str(base))
        written.append(out / "adapter_model.safetensors")
        if (merge or gguf) and config.method == "qlora":
            model, _ = load_model(base, torch.float32)
            load_adapter(model, out)
        if merge or gguf:
            model = merge_and_unload(model)
    if not config.adapter or merge:
        path = out / ("merged" if config.adapter else "hf")
        save_hf(model, path, tokenizer=tokenizer)
        written.append(path)
    if gguf:
        save_gguf(model, tokenizer, out / "model.gguf", "f16")
        written.append(out / "model.gguf")
    return written


def _check_settings(out: Path, config: FinetuneConfig, model_path: str | Path, data: str | Path) -> None:
    """Save the run's settings in out/finetune.json; refuse to resume checkpoints made with other ones."""
    settings = config.settings() | {"model": str(model_path), "data": str(data)}
    path = out / SETTINGS_FILE
    if list_checkpoints(out) and path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
        if changed:
            raise ConfigError(f"{out}: its checkpoints were made with other settings ({', '.join(changed)}: "
                              f"{before.get(changed[0])!r}, now {settings.get(changed[0])!r}); use another --out "
                              "or delete its checkpoints to start over")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
