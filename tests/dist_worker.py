"""Run by tests/test_distributed.py under torchrun (or alone): a few training steps, the history to a JSON file.

    python dist_worker.py STRATEGY OUT [--chunked] [--dir DIR] [--steps N]

--dir DIR adds checkpoints (every 3 steps, resumed from), validation and samples (byte tokenizer)."""

from __future__ import annotations

import argparse
import json

import torch

from lmforge import ModelConfig, Transformer
from lmforge.tokenizer.bpe import train_bpe
from lmforge.train import distributed
from lmforge.train.loss import ModelLoss
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import Schedule
from lmforge.train.trainer import Trainer

ROWS, SEQ, VOCAB = 8, 16, 256


class Sharded:
    """Random token batches, the same global batch for any world size; each rank takes its rows."""

    def __init__(self, rank: int, world: int, seed: int = 0) -> None:
        self.rank, self.world, self.seed = rank, world, seed

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed + step)
        rows = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
        targets = rows[:, 1:].clone()
        targets[: step % 3 + 1, :5] = -100  # uneven counted tokens across ranks
        per = ROWS // self.world
        mine = slice(self.rank * per, (self.rank + 1) * per)
        return {"input_ids": rows[mine, :-1], "targets": targets[mine]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("strategy")
    p.add_argument("out")
    p.add_argument("--chunked", action="store_true")
    p.add_argument("--dir", default=None)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    info = distributed.setup("gloo", "cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=SEQ)
    model = Transformer(cfg)
    parallel = distributed.parallelize(ModelLoss(model), args.strategy, info)
    if args.strategy == "fsdp" and info.enabled:  # optimizers that cannot update shards say so up front
        for name in ("adafactor", "adamw8bit"):
            try:
                Trainer(model, build_optimizer(name, model, 1e-3, 0.0), Schedule("constant"), Sharded(0, 1),
                        max_steps=1, dist=info, parallel=parallel)  # fmt: skip
                raise AssertionError(f"{name} was accepted for FSDP2-sharded parameters")
            except ValueError as e:
                assert "cannot update FSDP2-sharded parameters" in str(e), e
    # SGD, no clipping: unlike Adam, its update scales with the gradient, so a wrong loss scale shows
    optimizer = build_optimizer("sgd", model, lr=0.5, weight_decay=0.0, momentum=0.9)
    schedule = Schedule("cosine", total_steps=6, warmup_steps=1)
    extra = {}
    if args.dir:
        tokenizer = train_bpe(texts=["bytes"], vocab_size=256, progress=False, workers=1)
        extra = dict(run_dir=args.dir, checkpoint_every=3, val_data=Sharded(0, 1, seed=1000), eval_every=3,
                     eval_steps=1, tokenizer=tokenizer, sample_every=3, sample_prompt="ab")  # fmt: skip
    trainer = Trainer(
        model, optimizer, schedule, Sharded(info.rank, info.world_size), max_steps=args.steps, grad_accum=2,
        grad_clip=0.0, log_every=1, progress=False, dist=info, parallel=parallel, chunked_ce=args.chunked, **extra,
    )  # fmt: skip
    trainer.fit()
    if info.is_main:
        with open(args.out, "w") as f:
            json.dump(trainer.history, f)
    distributed.shutdown(info)


if __name__ == "__main__":
    main()
