"""Knowledge distillation, measured: a small student trained from scratch against the same student distilled from a
larger teacher, with validation bits per byte of each at the same steps.

The data is the speedrun's (train/speedrun.py, through benchmarks/bitnet.py's `prepare_data`): `--stories` stories
of the grammar of data/stories.py (whose exact entropy, the floor, is printed), a byte-level BPE and token shards.
The teacher (default d 128, 4 layers, 4 heads / 2 kv heads, d_ff 320: the speedrun's "cpu" model shape, narrower)
is trained for `--teacher-steps`; the student is much smaller (default d 32, 2 layers, 2 heads, d_ff 64). Both
students are built from one `TrainConfig` (the same initial weights: train.seed; the same batches: data.seed; the
same validation windows) and trained for `--steps` with the shared Trainer (`train.run.build_trainer`, AdamW lr 3e-3,
cosine with 5% warmup, batch 8 x 64); the distilled one adds a [distill] section naming the teacher's exported model
(train/distill.py: per token alpha T^2 D + (1 - alpha) CE; default forward KL, T = 1, alpha = 1). Validation is the
student's plain cross entropy in both runs. The sizes keep the whole script to a few minutes on 2 cores; on a
machine shared with other jobs run it with OMP_NUM_THREADS=1 (PLATFORM.md: contending OpenMP threads spin; here,
with other jobs running, one thread trained 15x faster than two).

    python benchmarks/distill.py [--steps 200] [--teacher-steps 200] [--eval-every 50] [--stories 3000]
                                 [--loss forward_kl] [--beta 0.5] [--temperature 1.0] [--alpha 1.0]
                                 [--on-policy-fraction 0] [--teacher-d-model 128] [--teacher-layers 4]
                                 [--teacher-heads 4] [--student-d-model 32] [--student-layers 2] [--student-heads 2]
                                 [--seq-len 64] [--batch-size 8] [--out DIR]

Output: the teacher's final bits/byte, a table of the students' bits/byte per evaluated step (scratch, distilled,
their difference) and the training time of each run (indicative only: PLATFORM.md, other jobs slow it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bitnet import prepare_data  # benchmarks/bitnet.py: the speedrun's corpus, tokenizer and shards
from lmforge.io.hf import save_hf
from lmforge.train.config import from_dict
from lmforge.train.run import build_trainer
from lmforge.train.speedrun import PRESETS

CPU = PRESETS["cpu"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each student run (default 200)")
    p.add_argument("--teacher-steps", type=int, default=200, help="optimizer steps of the teacher (default 200)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validations (default 50)")
    p.add_argument("--eval-steps", type=int, default=8, help="validation batches per evaluation (default 8)")
    p.add_argument("--stories", type=int, default=3000, help="stories in the corpus (default 3000)")
    p.add_argument("--vocab", type=int, default=CPU["vocab"], help=f"BPE vocabulary (default {CPU['vocab']})")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=CPU["lr"], help=f"peak learning rate (default {CPU['lr']})")
    p.add_argument("--teacher-d-model", type=int, default=128)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--teacher-heads", type=int, default=4)
    p.add_argument("--student-d-model", type=int, default=32)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--student-heads", type=int, default=2)
    p.add_argument("--loss", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    p.add_argument("--beta", type=float, default=0.5, help="--loss jsd only")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--on-policy-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, default=None, help="working directory (default: a temporary one)")
    return p.parse_args()


def shape(d_model: int, layers: int, heads: int) -> dict[str, int]:
    """A speedrun-style model: 2 kv heads, d_ff ~ 8/3 d_model rounded to 64 (the "cpu" preset at d_model 192)."""
    return {"d_model": d_model, "n_layers": layers, "n_heads": heads, "n_kv_heads": 2,
            "d_ff": 64 * round(8 * d_model / 3 / 64)}  # fmt: skip


def config(args: argparse.Namespace, root: Path, out: str, model: dict[str, int], steps: int, vocab: int,
           distill: dict[str, Any] | None = None) -> Any:  # fmt: skip
    """One run's TrainConfig: the speedrun's data and optimizer, `model` over the tiny preset, step-driven."""
    sections = {
        "model": {"preset": "tiny", "vocab_size": vocab, "max_seq_len": args.seq_len, **model},
        "data": {"shards": str(root / "shards"), "tokenizer": str(root / "tokenizer"), "seq_len": args.seq_len,
                 "batch_size": args.batch_size, "val_fraction": 0.05},
        "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "schedule": {"kind": "cosine", "total_steps": steps, "warmup_steps": max(1, steps // 20), "min_lr_ratio": 0.1},
        "train": {"max_steps": steps, "eval_every": args.eval_every, "eval_steps": args.eval_steps, "log_every": 10,
                  "checkpoint_every": 0, "keep_last": 1, "out_dir": str(root / out), "seed": args.seed},
    }  # fmt: skip
    return from_dict(sections | ({"distill": distill} if distill else {}))


def train(cfg: Any, tok: Any) -> tuple[Any, dict[int, float], float]:
    """Fit one run: (its trainer, {step: validation bits/byte}, training seconds)."""
    trainer = build_trainer(cfg, tok, progress=False)
    start = time.perf_counter()
    trainer.fit(resume=False)
    return trainer, {r["step"]: r["val_bpb"] for r in trainer.history if "val_bpb" in r}, time.perf_counter() - start


def n_params(trainer: Any) -> float:
    return sum(p.numel() for p in trainer.model.parameters()) / 1e6


def main() -> None:
    args = parse()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        t = time.perf_counter()
        tok, vocab, floor = prepare_data(root, args.stories, args.vocab)
        tok.save(root / "tokenizer")
        print(f"data: {args.stories} stories, BPE vocab {tok.vocab_size}, {time.perf_counter() - t:.1f} s; "
              f"entropy floor {floor:.4f} bits/byte")  # fmt: skip
        teacher_model = shape(args.teacher_d_model, args.teacher_layers, args.teacher_heads)
        student_model = shape(args.student_d_model, args.student_layers, args.student_heads)
        teacher, teacher_bpb, teacher_s = train(config(args, root, "teacher", teacher_model, args.teacher_steps,
                                                       vocab), tok)  # fmt: skip
        save_hf(teacher.model.cpu().eval(), root / "teacher" / "hf", tokenizer=tok)
        distill = {"teacher": str(root / "teacher" / "hf"), "loss": args.loss, "temperature": args.temperature,
                   "alpha": args.alpha, "on_policy_fraction": args.on_policy_fraction}  # fmt: skip
        if args.loss == "jsd":
            distill["beta"] = args.beta
        scratch, scratch_bpb, scratch_s = train(config(args, root, "scratch", student_model, args.steps, vocab), tok)
        _, distilled_bpb, distilled_s = train(config(args, root, "distilled", student_model, args.steps,
                                                     vocab, distill), tok)  # fmt: skip
    last_t = max(teacher_bpb)
    print(f"teacher: {n_params(teacher):.2f}M parameters, {args.teacher_steps} steps, {teacher_bpb[last_t]:.4f} "
          f"bits/byte, {teacher_s:.0f} s")  # fmt: skip
    print(f"student: {n_params(scratch):.2f}M parameters, {args.steps} steps, batch {args.batch_size} x "
          f"{args.seq_len}, lr {args.lr}; distillation: {args.loss}"
          + (f" beta {args.beta}" if args.loss == "jsd" else "")
          + f", T {args.temperature}, alpha {args.alpha}, on-policy {args.on_policy_fraction}")  # fmt: skip
    print(f"\n{'step':>6}  {'scratch bpb':>11}  {'distilled bpb':>13}  {'diff':>7}")
    steps = sorted(scratch_bpb.keys() & distilled_bpb.keys())
    for step in steps:
        print(f"{step:>6}  {scratch_bpb[step]:11.4f}  {distilled_bpb[step]:13.4f}  "
              f"{distilled_bpb[step] - scratch_bpb[step]:+7.4f}")  # fmt: skip
    last = steps[-1]
    print(f"\nfinal (step {last}): scratch {scratch_bpb[last]:.4f}, distilled {distilled_bpb[last]:.4f} bits/byte "
          f"({distilled_bpb[last] / scratch_bpb[last]:.3f}x); teacher {teacher_bpb[last_t]:.4f}, floor {floor:.4f}")
    print(f"training time: teacher {teacher_s:.0f} s, scratch {scratch_s:.0f} s, distilled {distilled_s:.0f} s")


if __name__ == "__main__":
    main()
