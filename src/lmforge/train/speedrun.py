"""The speedrun pipeline (`lmforge speedrun`): raw text to a chatting model, in one call and a few minutes.

    corpus     stories from the grammar of `data/stories.py` (its entropy in bits per byte is known exactly),
               or the user's text files (--data)
    tokenizer  byte-level BPE trained on the corpus                                   -> tokenizer/
    shards     the corpus encoded once, memory-mapped by the loaders                   -> shards/
    model      a small Llama-style model (GQA + RoPE + SwiGLU + RMSNorm)
    train      `Trainer` (AdamW, warmup + cosine, validation every few hundred steps), time-driven: the lr
               schedule is a function of elapsed time over the --minutes budget and the run ends when the
               budget is spent, at the decayed rate (trainer.py)                      -> log.jsonl, loss.png
    chat       (story corpus) the pre-trained model fine-tuned to answer questions about a story
               (`finetune.chat_stage`: SFT on conversations rendered with the tokenizer's ChatML template, the
               loss on the answers; exact-match accuracy on held-out questions before and after) -> pretrained/,
               chat/
    export     Hugging Face directory and GGUF of the final model (the chat model when there is a chat stage),
               with the tokenizer and its chat template                              -> hf/, model.gguf
    report     validation bits per byte against the corpus' entropy floor, how much of the budget and of the
               schedule ran and why the run ended, samples, the chat stage's accuracy and dialogues,
               throughput, MFU, the config, timings of every stage                    -> report.md

Time-driven training replaces a step count calibrated from a few timed steps, which a machine busy at that moment
got wrong (30 steps instead of ~900, the run over at 70% of its budget): however the speed drifts, the warmup is
the first 5% of the budget and the cosine decay reaches its minimum as the budget ends; a step count is only a
cap (`MAX_STEPS`), and the report says if that cap, not the budget, ended the run. The budget is the training
loop's wall time, its evaluations included; the final evaluation, the export and the samples come after it.

`lmforge generate runs/speedrun/model.gguf --prompt "Once upon a time"` then continues a story, and
`lmforge chat runs/speedrun/model.gguf` (or `lmforge serve`) answers questions about one pasted in.

`run_speedrun` reports each finished stage through `on_stage(name, seconds)` (the CLI prints it), the headline
figures at the end through `on_headline(text)` (bits/byte against the floor, or the validation loss for --data;
steps, tokens, time), and raises an `LmforgeError` for a user's mistake (a bad --minutes, --stories or
--preset, a run directory already used, a missing --data file); `lmforge.cli.speedrun` only parses the flags
and calls it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.data.shards import text_files
from lmforge.finetune.chat_stage import run_chat_stage
from lmforge.io.hf import save_hf
from lmforge.tokenizer.chat import DEFAULT_CHAT_TEMPLATE
from lmforge.train.run import build_trainer, export_run
from lmforge.utils.atomic import atomic_write
from lmforge.utils.errors import LmforgeError

# model presets: "cpu" fits a 2-core laptop in minutes; "gpu" is for a real accelerator (log_every, eval_every:
# steps between log lines and between validations, for the steps a 5-minute run of that size makes)
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"model": {"d_model": 192, "n_layers": 4, "n_heads": 6, "n_kv_heads": 2, "d_ff": 512},
            "vocab": 1024, "seq_len": 128, "batch_size": 16, "stories": 30_000, "lr": 3e-3,
            "log_every": 1, "eval_every": 250},
    "gpu": {"model": {"d_model": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 2, "d_ff": 1376},
            "vocab": 4096, "seq_len": 512, "batch_size": 32, "stories": 300_000, "lr": 1e-3,
            "log_every": 10, "eval_every": 1000},
}  # fmt: skip
PROMPTS = ("Once upon a time", "One morning, Mia", "The end")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # end of story; ChatML's turn markers
CHAT_STEPS = 300  # SFT steps of the chat stage (2-3 minutes on 2 cores for the cpu preset, evaluation included)
SCHEDULE = {"kind": "cosine", "total_steps": 1000, "warmup_steps": 50, "min_lr_ratio": 0.1}  # stretched over the
# budget (Schedule.at): total_steps are thousandths of it, so warmup is its first 5%
MAX_STEPS = 1_000_000  # a cap only: the budget ends the run
StageCallback = Callable[[str, float], None]  # (stage name, its seconds), called as each stage ends
HeadlineCallback = Callable[[str], None]  # the headline block (a few lines), called once at the end


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


def _config(preset: dict[str, Any], out: Path, shards: Path, tok_dir: Path, vocab: int, minutes: float) -> Any:
    """The run's TrainConfig: the preset's model and data, `SCHEDULE`, a budget of `minutes`, `MAX_STEPS` a cap."""
    from lmforge.train.config import from_dict

    return from_dict({
        "model": {"preset": "tiny", "vocab_size": vocab, "max_seq_len": preset["seq_len"], **preset["model"]},
        "data": {"shards": str(shards), "tokenizer": str(tok_dir), "seq_len": preset["seq_len"],
                 "batch_size": preset["batch_size"], "val_fraction": 0.05},
        "optim": {"name": "adamw", "lr": preset["lr"], "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "schedule": dict(SCHEDULE),
        "train": {"max_steps": MAX_STEPS, "time_budget_min": minutes, "schedule_by": "time",
                  "eval_every": preset["eval_every"], "eval_steps": 8, "log_every": preset["log_every"],
                  "checkpoint_every": 0, "keep_last": 1, "out_dir": str(out)},
    })  # fmt: skip


def run_speedrun(
    out: Path,
    minutes: float = 5.0,
    data: list[Path] | None = None,
    preset: str = "cpu",
    stories: int | None = None,
    on_stage: StageCallback | None = None,
    on_headline: HeadlineCallback | None = None,
    chat_steps: int = CHAT_STEPS,
) -> Path:
    """The whole speedrun into `out`, training for `minutes` (time-driven), on `data` (text files or directories
    of *.txt; None: `stories` stories of the grammar, default the preset's), then (story corpus, `chat_steps` >
    0) the chat stage; returns the report's path. The values are checked first (module doc): each mistake raises
    an LmforgeError naming its flag."""
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
    tok = train_bpe(files=files, vocab_size=settings["vocab"], special_tokens=SPECIAL_TOKENS, progress=False)
    tok.eos_token, tok.eot_token, tok.chat_template = "<|endoftext|>", "<|im_end|>", DEFAULT_CHAT_TEMPLATE
    tok.save(out / "tokenizer")
    t = _stage("tokenizer", timings, t, on_stage)
    manifest = write_shards(tok, files, out / "shards", progress=False)
    t = _stage("shards", timings, t, on_stage)
    vocab = 64 * -(-tok.vocab_size // 64)  # rounded up to a multiple of 64
    cfg = _config(settings, out, out / "shards", out / "tokenizer", vocab, minutes)
    save_resolved(cfg, out)
    tokenizer = load_tokenizer(out / "tokenizer")
    trainer = build_trainer(cfg, tokenizer)
    last = trainer.fit(resume=False)
    t = _stage("train", timings, t, on_stage)
    model, chat = trainer.model.eval(), None
    if stats is not None and chat_steps > 0:
        save_hf(model.cpu(), out / "pretrained", tokenizer=tokenizer)
        chat = run_chat_stage(out / "pretrained", tokenizer, out / "chat", chat_steps, cfg.data.seq_len)
        model = chat.model
        t = _stage("chat", timings, t, on_stage)
    written = export_run(model, tokenizer, out)
    t = _stage("export", timings, t, on_stage)
    samples = [(p, generate_text(model, tokenizer, p, temperature=0.7, top_k=40, seed=i, max_tokens=64))
               for i, p in enumerate(PROMPTS)]  # fmt: skip
    t = _stage("samples", timings, t, on_stage)
    timings["total"] = time.perf_counter() - begin
    figures = _figures(cfg, last, trainer, stats, timings)
    report = _report(cfg, last, trainer, figures, corpus_bytes, manifest, samples, timings, written, torch.__version__,
                     chat)  # fmt: skip
    atomic_write(out / "report.md", report)
    if on_headline is not None:
        on_headline(headline(figures))
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


def _figures(cfg: Any, last: dict[str, Any], trainer: Any, stats: dict[str, float] | None,
             timings: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """The run's headline numbers, shared by the report and the terminal's headline block: validation loss and
    bits/byte (None when not measured), the entropy floor (None for --data), steps, tokens, the training time
    against the budget, the schedule fraction reached, why the run ended and the whole pipeline's time."""
    return {
        "val_loss": last.get("val_loss"), "bpb": last.get("val_bpb"),
        "floor": stats["bits_per_byte"] if stats is not None else None,
        "steps": trainer.step, "tokens": trainer.step * cfg.data.batch_size * cfg.data.seq_len,
        "train_s": trainer.elapsed_s, "budget_s": trainer.time_budget_s, "schedule": trainer.schedule_progress,
        "ended_by": trainer.ended_by, "total_s": timings["total"],
    }  # fmt: skip


def _ending(figures: dict[str, Any]) -> str:
    """How much of the budget and of the schedule ran, and what ended the run."""
    used = f"{figures['train_s']:.1f} s of {figures['budget_s']:.0f} s ({figures['train_s'] / figures['budget_s']:.0%})"
    if figures["ended_by"] == "time_budget":
        return f"{used}, ended by the time budget at {figures['schedule']:.0%} of the lr schedule"
    return f"{used}, ended by the max_steps cap ({MAX_STEPS:,}) at {figures['schedule']:.0%} of the lr schedule"


def _quality(figures: dict[str, Any]) -> str:
    """Bits/byte against the entropy floor, or the validation loss where the floor is unknown (--data)."""
    bpb, floor = figures["bpb"], figures["floor"]
    if bpb is not None and floor is not None:
        return f"{bpb:.4f} bits/byte, floor {floor:.4f} (+{bpb - floor:.4f}, {(bpb - floor) / floor:.0%} above)"
    if figures["val_loss"] is None:
        return "not measured (no validation data)"
    bits = f", {bpb:.4f} bits/byte" if bpb is not None else ""
    return f"validation loss {figures['val_loss']:.4f} nats/token{bits}"


def headline(figures: dict[str, Any]) -> str:
    """The block the terminal prints at the end: quality, steps, tokens, time (one figure a line)."""
    return "\n".join([
        f"result  {_quality(figures)}",
        f"steps   {figures['steps']:,}",
        f"tokens  {figures['tokens']:,}",
        f"time    training {_ending(figures)}; {figures['total_s']:.0f} s in all",
    ])  # fmt: skip


def _chat_section(chat: Any) -> list[str]:
    """The report's chat stage: SFT steps and validation loss, exact match before and after, dialogues."""
    loss = f"{chat.val_loss:.4f} nats/token" if chat.val_loss is not None else "not measured"
    lines = ["## Chat stage", "", "| | |", "|---|---|"]
    lines += [f"| SFT | {chat.steps} steps (full fine-tuning) on {chat.examples:,} conversations, validation "
              f"loss {loss} on the answers |"]  # fmt: skip
    lines += [f"| exact match, held-out questions | {chat.before:.0%} before SFT -> **{chat.after:.0%}** after |"]
    for kind, (right, asked) in sorted(chat.by_question.items()):
        lines += [f"| ... \"{kind} ...?\" | {right} of {asked} right |"]
    lines += [""]
    for user, expected, got in chat.dialogues:
        mark = "right" if got == expected else f"expected: {expected}"
        lines += ["```text", f"user: {user}", f"assistant: {got}", "```", f"({mark})", ""]
    lines += ["`lmforge chat model.gguf` or `lmforge serve model.gguf` talks to it.", ""]
    return lines


def _report(cfg, last, trainer, figures, corpus_bytes, manifest, samples, timings, written, torch_version,
            chat=None) -> str:  # fmt: skip
    from lmforge.train.config import dumps

    n_params = sum(p.numel() for p in trainer.model.parameters())
    bpb, floor = figures["bpb"], figures["floor"]
    lines = ["# lmforge speedrun", ""]
    lines += ["| | |", "|---|---|"]
    lines += [f"| corpus | {corpus_bytes / 1e6:.2f} MB, {manifest['total_tokens']:,} tokens |"]
    lines += [f"| model | {n_params / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, d={cfg.model.d_model}, "
              f"{cfg.model.n_heads} heads / {cfg.model.kv_heads} kv heads |"]  # fmt: skip
    lines += [f"| training | {figures['steps']:,} steps, {figures['tokens']:,} tokens |"]
    lines += [f"| budget | {_ending(figures)} |"]
    lines += [f"| throughput | {last.get('tok_s', 0):,.0f} tokens/s, MFU {last.get('mfu', 0):.1%} |"]
    lines += [f"| final train loss | {last.get('loss', float('nan')):.4f} nats/token |"]
    if bpb is not None:
        lines += [f"| validation | {last['val_loss']:.4f} nats/token, **{bpb:.4f} bits/byte** |"]
    if floor is not None and bpb is not None:
        gap = bpb - floor
        lines += [f"| entropy floor | {floor:.4f} bits/byte (the grammar's exact entropy) |"]
        lines += [f"| left to learn | {gap:.4f} bits/byte ({gap / floor:.0%} above the floor) |"]
    lines += [f"| time | {timings['total']:.0f} s (torch {torch_version}) |", ""]
    lines += ["![loss](loss.png)", "", "## Samples", ""]
    for prompt, text in samples:
        lines += ["```text", prompt + text, "```"]
    lines += [""] + (_chat_section(chat) if chat is not None else [])
    lines += ["## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
    lines += ["", "## Files", ""] + [f"- `{p.name}`" for p in written]
    lines += ["- `config.toml`, `log.jsonl`, `loss.png`, `tokenizer/`, `shards/`, `checkpoints/`"]
    if chat is not None:
        lines += ["- `pretrained/` (the model before the chat stage), `chat/` (its data, log and checkpoint)"]
    lines += ["", "## Config", "", "```toml", dumps(cfg).rstrip(), "```", ""]
    return "\n".join(lines)
