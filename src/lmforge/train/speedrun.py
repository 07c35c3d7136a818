"""The speedrun pipeline (`lmforge speedrun`): raw text to a chatting model, in one call and a few minutes.

    corpus     stories from the grammar of `data/stories.py` (its entropy in bits per byte is known exactly),
               or the user's text files (--data)
    tokenizer  byte-level BPE trained on the corpus                                   -> tokenizer/
    shards     the corpus encoded once, memory-mapped by the loaders                   -> shards/
    model      a small Llama-style model (GQA + RoPE + SwiGLU + RMSNorm)
    calibrate  a few steps measure tokens/s, which sets the number of steps that fits --minutes, so the
               cosine schedule ends exactly when the time does
    train      `Trainer` (AdamW, warmup + cosine, validation every few hundred steps) -> log.jsonl, loss.png
    export     Hugging Face directory and GGUF                                        -> hf/, model.gguf
    report     validation bits per byte against the corpus' entropy floor, samples, throughput, MFU, the
               config, timings of every stage                                         -> report.md

`lmforge generate runs/speedrun/model.gguf --prompt "Once upon a time"` then continues a story.

`run_speedrun` reports each finished stage through `on_stage(name, seconds)` (the CLI prints it) and raises an
`LmforgeError` for a user's mistake (a bad --minutes, --stories or --preset, a run directory already used, a
missing --data file); `lmforge.cli.speedrun` only parses the flags and calls it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.data.shards import text_files
from lmforge.train.run import build_trainer, export_run
from lmforge.utils.atomic import atomic_write
from lmforge.utils.errors import LmforgeError

# model presets: "cpu" fits a 2-core laptop in minutes; "gpu" is for a real accelerator
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"model": {"d_model": 192, "n_layers": 4, "n_heads": 6, "n_kv_heads": 2, "d_ff": 512},
            "vocab": 1024, "seq_len": 128, "batch_size": 16, "stories": 30_000, "lr": 3e-3},
    "gpu": {"model": {"d_model": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 2, "d_ff": 1376},
            "vocab": 4096, "seq_len": 512, "batch_size": 32, "stories": 300_000, "lr": 1e-3},
}  # fmt: skip
PROMPTS = ("Once upon a time", "One morning, Mia", "The end")
StageCallback = Callable[[str, float], None]  # (stage name, its seconds), called as each stage ends


def _stage(name: str, timings: dict[str, float], start: float, on_stage: StageCallback | None) -> float:
    """Record the stage that began at `start` (perf_counter) as ending now, report it, return now."""
    now = time.perf_counter()
    timings[name] = now - start
    if on_stage is not None:
        on_stage(name, now - start)
    return now


def _corpus(out: Path, data: list[Path] | None, n_stories: int) -> tuple[list[Path], dict[str, float] | None]:
    from lmforge.data.stories import write_corpus

    if not data:
        stats = write_corpus(out / "corpus", n_stories, seed=0)
        return text_files([out / "corpus"]), stats
    return text_files(data), None


def _config(preset: dict[str, Any], out: Path, shards: Path, tok_dir: Path, vocab: int, max_steps: int) -> Any:
    from lmforge.train.config import from_dict

    return from_dict({
        "model": {"preset": "tiny", "vocab_size": vocab, "max_seq_len": preset["seq_len"], **preset["model"]},
        "data": {"shards": str(shards), "tokenizer": str(tok_dir), "seq_len": preset["seq_len"],
                 "batch_size": preset["batch_size"], "val_fraction": 0.05},
        "optim": {"name": "adamw", "lr": preset["lr"], "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "schedule": {"kind": "cosine", "warmup_steps": max(1, max_steps // 20), "min_lr_ratio": 0.1},
        "train": {"max_steps": max_steps, "eval_every": max(1, max_steps // 4), "eval_steps": 8,
                  "log_every": max(1, max_steps // 100), "checkpoint_every": 0, "keep_last": 1,
                  "out_dir": str(out)},
    })  # fmt: skip


def _steps_for(cfg: Any, seconds: float) -> int:
    """Optimizer steps that fit in `seconds`, from the speed of 3 timed steps (after 1 warm-up) on a scratch copy."""
    scratch = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, out_dir=str(Path(cfg.train.out_dir) / ".calibrate"))
    )
    trainer = build_trainer(scratch, progress=False)
    trainer.train_step(0)
    start = time.perf_counter()
    for step in range(1, 4):
        trainer.train_step(step)
    per_step = (time.perf_counter() - start) / 3
    return max(10, int(seconds * 0.92 / per_step))  # 8% for evaluations


def run_speedrun(
    out: Path,
    minutes: float = 5.0,
    data: list[Path] | None = None,
    preset: str = "cpu",
    stories: int | None = None,
    on_stage: StageCallback | None = None,
) -> Path:
    """The whole speedrun into `out`, training for about `minutes`, on `data` (text files or directories of
    *.txt; None: `stories` stories of the grammar, default the preset's); returns the report's path. The values
    are checked first (module doc): each mistake raises an LmforgeError naming its flag."""
    import torch

    from lmforge.data.shards import write_shards
    from lmforge.infer.generate import generate_text
    from lmforge.tokenizer import train_bpe
    from lmforge.tokenizer.formats import load_tokenizer
    from lmforge.train.config import save_resolved

    settings = _check(out, minutes, preset, stories)
    timings: dict[str, float] = {}
    begin = t = time.perf_counter()
    files, stats = _corpus(out, data, stories or settings["stories"])
    corpus_bytes = sum(f.stat().st_size for f in files)
    t = _stage("corpus", timings, t, on_stage)
    tok = train_bpe(files=files, vocab_size=settings["vocab"], special_tokens=["<|endoftext|>"], progress=False)
    tok.eos_token = "<|endoftext|>"
    tok.save(out / "tokenizer")
    t = _stage("tokenizer", timings, t, on_stage)
    manifest = write_shards(tok, files, out / "shards", progress=False)
    t = _stage("shards", timings, t, on_stage)
    vocab = 64 * -(-tok.vocab_size // 64)  # rounded up to a multiple of 64
    cfg = _config(settings, out, out / "shards", out / "tokenizer", vocab, max_steps=10)
    max_steps = _steps_for(cfg, minutes * 60)
    cfg = _config(settings, out, out / "shards", out / "tokenizer", vocab, max_steps)
    t = _stage("calibrate", timings, t, on_stage)
    save_resolved(cfg, out)
    tokenizer = load_tokenizer(out / "tokenizer")
    trainer = build_trainer(cfg, tokenizer)
    trainer.time_budget_s = minutes * 60 * 1.1  # a safety net; the step count is what normally ends the run
    last = trainer.fit(resume=False)
    t = _stage("train", timings, t, on_stage)
    written = export_run(trainer.model, tokenizer, out)
    t = _stage("export", timings, t, on_stage)
    model = trainer.model.eval()
    samples = [(p, generate_text(model, tokenizer, p, temperature=0.7, top_k=40, seed=i, max_tokens=64))
               for i, p in enumerate(PROMPTS)]  # fmt: skip
    t = _stage("samples", timings, t, on_stage)
    timings["total"] = time.perf_counter() - begin
    report = _report(cfg, last, trainer, stats, corpus_bytes, manifest, samples, timings, written, torch.__version__)
    atomic_write(out / "report.md", report)
    return out / "report.md"


def _check(out: Path, minutes: float, preset: str, stories: int | None) -> dict[str, Any]:
    """The preset's settings, once the values a user gives are known to be usable: --minutes finite and > 0,
    --stories >= 1, a known --preset, and an `out` that holds no run yet (a run is never overwritten)."""
    if not (math.isfinite(minutes) and minutes > 0):
        raise LmforgeError(f"--minutes={minutes}: must be a finite number > 0")
    if stories is not None and stories < 1:
        raise LmforgeError(f"--stories={stories}: must be an integer >= 1")
    if preset not in PRESETS:
        raise LmforgeError(f"unknown --preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if (out / "checkpoints").exists():
        raise LmforgeError(f"{out}: already holds a run; choose another --out or delete it")
    return PRESETS[preset]


def _report(cfg, last, trainer, stats, corpus_bytes, manifest, samples, timings, written, torch_version) -> str:
    from lmforge.train.config import dumps

    n_params = sum(p.numel() for p in trainer.model.parameters())
    bpb = last.get("val_bpb")
    lines = ["# lmforge speedrun", ""]
    lines += ["| | |", "|---|---|"]
    lines += [f"| corpus | {corpus_bytes / 1e6:.2f} MB, {manifest['total_tokens']:,} tokens |"]
    lines += [f"| model | {n_params / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, d={cfg.model.d_model}, "
              f"{cfg.model.n_heads} heads / {cfg.model.kv_heads} kv heads |"]  # fmt: skip
    lines += [f"| training | {trainer.step} steps, {trainer.step * cfg.data.batch_size * cfg.data.seq_len:,} tokens |"]
    lines += [f"| throughput | {last.get('tok_s', 0):,.0f} tokens/s, MFU {last.get('mfu', 0):.1%} |"]
    lines += [f"| final train loss | {last.get('loss', float('nan')):.4f} nats/token |"]
    if bpb is not None:
        lines += [f"| validation | {last['val_loss']:.4f} nats/token, **{bpb:.4f} bits/byte** |"]
    if stats is not None and bpb is not None:
        gap = bpb - stats["bits_per_byte"]
        lines += [f"| entropy floor | {stats['bits_per_byte']:.4f} bits/byte (the grammar's exact entropy) |"]
        lines += [f"| left to learn | {gap:.4f} bits/byte ({gap / stats['bits_per_byte']:.0%} above the floor) |"]
    lines += [f"| time | {timings['total']:.0f} s (torch {torch_version}) |", ""]
    lines += ["![loss](loss.png)", "", "## Samples", ""]
    for prompt, text in samples:
        lines += ["```text", prompt + text, "```"]
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
    lines += ["", "## Files", ""] + [f"- `{p.name}`" for p in written]
    lines += ["- `config.toml`, `log.jsonl`, `loss.png`, `tokenizer/`, `shards/`, `checkpoints/`"]
    lines += ["", "## Config", "", "```toml", dumps(cfg).rstrip(), "```", ""]
    return "\n".join(lines)
