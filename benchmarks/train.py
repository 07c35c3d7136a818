"""Training throughput and peak memory: lmforge's Trainer vs transformers + torch.optim.AdamW, same model and batch.

Both sides train the same random Llama (lmforge's "llama-20m" preset written as a transformers config, fp32,
sdpa attention) on the same (batch x seq) token batch with AdamW (lr 3e-4, wd 0.1, clip 1.0):

    lmforge       Trainer.train_step: forward, cross entropy, backward, clipping, lmforge.train.optim.AdamW
    transformers  model(input_ids, labels=...).loss.backward(), clip_grad_norm_, torch.optim.AdamW (foreach)

Throughput is the median of `--iters` optimizer steps after `--warmup`, the two interleaved (forward.py's
`median_seconds`), eager and under torch.compile, lmforge also with chunked cross entropy (the LM head fused
into the loss). The "floor" is the time the step spends in matrix products and attention kernels alone
(aten mm/addmm/bmm and SDPA, forward and backward, summed by torch.profiler over one lmforge step): work any
implementation of this model must do, so `transformers / floor` bounds the speedup any implementation can
reach on this machine. Peak memory is measured in a fresh process per setting as
the growth of the peak resident set (VmHWM) over the model's own footprint, for plain training, activation
checkpointing (transformers: gradient_checkpointing_enable) and chunked cross entropy.

    python benchmarks/train.py [--batch 8] [--seq 256] [--iters 5] [--warmup 2] [--no-compile] [--no-memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import torch
import transformers

import lmforge
from forward import LLAMA_20M, median_seconds  # benchmarks/ is the script's directory
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import Schedule
from lmforge.train.trainer import Trainer

LR, WD, CLIP = 3e-4, 0.1, 1.0


class FixedBatch:
    def __init__(self, ids: torch.Tensor) -> None:
        self.data = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return self.data


def models(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_20M, attn_implementation="sdpa"))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours, _ = lmforge.load(tmp)
    return ours, hf.train()


def lmforge_step(model, ids: torch.Tensor, **options):
    optimizer = build_optimizer("adamw", model, lr=LR, weight_decay=WD)
    trainer = Trainer(model, optimizer, Schedule("constant"), FixedBatch(ids), max_steps=10**9, grad_clip=CLIP,
                      progress=False, **options)  # fmt: skip
    return lambda: trainer.train_step(0)


def transformers_step(model, ids: torch.Tensor, compile: bool = False):
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    forward = torch.compile(model) if compile else model

    def step() -> None:
        loss = forward(input_ids=ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss  # shifted inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


FLOOR_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward")  # fmt: skip


def kernel_floor_seconds(step) -> float:
    """Seconds one call of `step` spends in FLOOR_OPS (their own time, as torch.profiler measures it)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in FLOOR_OPS) / 1e6


def peak_rss_growth(setting: str, batch: int, seq: int) -> float:
    """MB of peak-RSS growth for two training steps of `setting`, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--child", setting, "--batch", str(batch), "--seq", str(seq)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["mb"]


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(setting: str, batch: int, seq: int) -> None:
    ours, hf = models()
    ids = torch.randint(0, LLAMA_20M["vocab_size"], (batch, seq + 1))
    lib, _, option = setting.partition(":")
    if lib == "lmforge":
        del hf
        kw = {"activation_checkpointing": "ckpt" in option, "chunked_ce": "chunked" in option}
        step = lmforge_step(ours, ids, **kw)
    else:
        del ours
        if "ckpt" in option:
            hf.gradient_checkpointing_enable()
        step = transformers_step(hf, ids)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    base = _vm_hwm_mb()
    step()
    step()
    print(json.dumps({"mb": _vm_hwm_mb() - base}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.batch, args.seq)

    ours, hf = models()
    ids = torch.randint(0, LLAMA_20M["vocab_size"], (args.batch, args.seq + 1))
    tokens = args.batch * args.seq
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"model llama-20m ({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M), fp32, batch {args.batch} x "
          f"seq {args.seq}, AdamW; median of {args.iters} steps after {args.warmup}\n")  # fmt: skip
    print("| mode | lmforge tok/s | lmforge + chunked CE tok/s | transformers tok/s | ratio (best lmforge) |")
    print("|---|---|---|---|---|")
    for mode in ("eager", "compile")[: 1 if args.no_compile else 2]:
        compile = mode == "compile"
        steps = [lmforge_step(ours, ids, compile=compile), lmforge_step(ours, ids, compile=compile, chunked_ce=True),
                 transformers_step(hf, ids, compile=compile)]  # fmt: skip
        t_lm, t_chunked, t_hf = median_seconds(steps, args.iters, args.warmup)
        best = min(t_lm, t_chunked)
        print(f"| {mode} | {tokens / t_lm:,.0f} | {tokens / t_chunked:,.0f} | {tokens / t_hf:,.0f} | "
              f"{t_hf / best:.2f}x |", flush=True)  # fmt: skip
        if mode == "eager":
            floor = kernel_floor_seconds(lmforge_step(ours, ids))
            print(f"| floor (matmul + attention kernels) | {tokens / floor:,.0f} | | | transformers / floor: "
                  f"{t_hf / floor:.2f}x |", flush=True)  # fmt: skip
    if args.no_memory:
        return
    print("\n| setting | peak memory growth (MB) |\n|---|---|")
    for setting in ("lmforge", "lmforge:ckpt", "lmforge:chunked", "lmforge:ckpt+chunked", "transformers",
                    "transformers:ckpt"):  # fmt: skip
        print(f"| {setting} | {peak_rss_growth(setting, args.batch, args.seq):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
