"""Run by tests/test_distributed.py under torchrun (or alone): a few training steps, losses to a JSON file."""

from __future__ import annotations

import json
import sys

import torch

from lmforge import ModelConfig, Transformer
from lmforge.train import distributed
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import Schedule
from lmforge.train.trainer import Trainer

ROWS, SEQ, VOCAB = 8, 16, 96


class Sharded:
    """Random token batches, the same global batch for any world size; each rank takes its rows."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        rows = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
        targets = rows[:, 1:].clone()
        targets[: step % 3 + 1, :5] = -100  # uneven counted tokens across ranks
        per = ROWS // self.world
        mine = slice(self.rank * per, (self.rank + 1) * per)
        return {"input_ids": rows[mine, :-1], "targets": targets[mine]}


def main(strategy: str, out: str) -> None:
    info = distributed.setup("gloo", "cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=SEQ)
    model = Transformer(cfg)
    parallel = distributed.parallelize(model, strategy, info)
    # SGD, no clipping: unlike Adam, its update scales with the gradient, so a wrong loss scale shows
    optimizer = build_optimizer("sgd", model, lr=0.5, weight_decay=0.0, momentum=0.9)
    schedule = Schedule("cosine", total_steps=6, warmup_steps=1)
    trainer = Trainer(
        model, optimizer, schedule, Sharded(info.rank, info.world_size), max_steps=6, grad_accum=2,
        grad_clip=0.0, log_every=1, progress=False, dist=info, parallel=parallel,
    )  # fmt: skip
    trainer.fit()
    if info.is_main:
        with open(out, "w") as f:
            json.dump([r["loss"] for r in trainer.history], f)
    distributed.shutdown(info)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
