"""Run by tests/train/test_distributed.py under torchrun (or alone): a few training steps, the history to a JSON file.

    python dist_worker.py STRATEGY OUT [--chunked] [--dir DIR] [--steps N]
    python dist_worker.py custom OUT --dir DIR

--dir DIR adds checkpoints (every 3 steps, resumed from), validation and samples (byte tokenizer).
"custom" trains `Tagger` (not a Transformer: tied and frozen weights) with the masked objective `MaskedTagging`
under ddp, fsdp and zero1, and writes the final weights of each (gathered with `full_state_dict` on every rank),
zero1's checkpointed run resumed, and FSDP2 with a bf16 mixed-precision policy; alone, every strategy is the
plain single-process run: the reference."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import ModelConfig, Transformer
from lmforge.tokenizer.bpe import train_bpe
from lmforge.train import distributed
from lmforge.train.objective import LanguageModelObjective, Objective, ObjectiveOutput
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import Schedule
from lmforge.train.trainer import Trainer

ROWS, SEQ, VOCAB = 8, 16, 256


def lm_batch(step: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A global batch of random tokens, some targets not counted (uneven counts across ranks)."""
    g = torch.Generator().manual_seed(seed + step)
    rows = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
    targets = rows[:, 1:].clone()
    targets[: step % 3 + 1, :5] = -100
    return {"input_ids": rows[:, :-1], "targets": targets}


def tag_batch(step: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A global tagging batch: labels a fixed function of the tokens, a random loss mask (uneven counts)."""
    g = torch.Generator().manual_seed(seed + step)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    mask = (torch.rand(ROWS, SEQ, generator=g) < 0.5).long()
    mask[: step % 3 + 1] = 0  # whole rows without a counted token
    return {"input_ids": ids, "labels": (ids * 7 + 3) % VOCAB, "loss_mask": mask}


class Sharded:
    """The same global batch for any world size (`make(step)`); each rank takes its rows of every tensor."""

    def __init__(self, rank: int, world: int, seed: int = 0, make: Callable = lm_batch) -> None:
        self.rank, self.world, self.seed, self.make = rank, world, seed, make

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        per = ROWS // self.world
        return {k: v[self.rank * per : (self.rank + 1) * per] for k, v in self.make(step, self.seed).items()}


class Tagger(nn.Module):
    """A token tagger that is not a Transformer: embeddings plus a frozen position table, a ModuleList of residual
    MLP blocks (one frozen bias inside), and an output layer tied to the embedding."""

    def __init__(self, d: int = 16, n_blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(SEQ, d) * 0.1, requires_grad=False)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(n_blocks)
        )
        self.blocks[0][1].bias.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = x + block(x)
        return x @ self.embed.weight.t()


class MaskedTagging(Objective):
    """Cross entropy of model(input_ids) against "labels", counted only where "loss_mask" is 1."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["loss_mask"].sum()

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        logits = self.model(batch["input_ids"]).float()
        ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        return ObjectiveOutput(loss=(ce * batch["loss_mask"].flatten()).sum(), tokens=batch["loss_mask"].sum())


def tagger_run(info, strategy: str, steps: int = 4, run_dir: Path | None = None, fit: bool = True,
               **parallel_kw) -> Trainer:  # fmt: skip
    """`steps` steps of the masked tagging objective on `Tagger` under `strategy` (SGD with momentum: state for
    ZeRO to shard, and an update that scales with the gradient, so a wrong loss scale shows); trained if `fit`."""
    torch.manual_seed(0)
    model = Tagger()
    objective = distributed.parallelize(MaskedTagging(model), strategy, info, **parallel_kw)
    optimizer = build_optimizer("sgd", model, lr=0.5, weight_decay=0.0, momentum=0.9)
    optimizer = distributed.shard_optimizer(optimizer, strategy, info)
    trainer = Trainer(model, optimizer, Schedule("constant"), Sharded(info.rank, info.world_size, make=tag_batch),
                      objective, max_steps=steps, grad_accum=2, grad_clip=0.0, log_every=1, progress=False,
                      dist=info, run_dir=run_dir, checkpoint_every=2, keep_last=0)  # fmt: skip
    if fit:
        trainer.fit()
    return trainer


def plain(state: dict[str, torch.Tensor]) -> dict[str, list]:
    return {k: v.float().tolist() for k, v in state.items()}


def custom_suite(info, out_dir: Path) -> dict:
    """The checks of the "custom" mode, in one launch (see the module docstring)."""
    result: dict = {}
    for strategy in ("ddp", "fsdp", "zero1"):
        trainer = tagger_run(info, strategy, run_dir=out_dir / strategy)
        full = distributed.full_state_dict(trainer.objective.model)
        on_rank0 = distributed.full_state_dict(trainer.objective.model, rank0_only=True)
        assert (set(on_rank0) == set(full)) if info.is_main else on_rank0 == {}, strategy
        result[strategy] = plain(full)
        result[f"{strategy}_losses"] = [r["loss"] for r in trainer.history if "loss" in r]
    resumed_dir = out_dir / "zero1-resumed"
    tagger_run(info, "zero1", steps=2, run_dir=resumed_dir)
    resumed = tagger_run(info, "zero1", steps=4, run_dir=resumed_dir)  # a fresh model and optimizer, from step 2
    result["zero1_resumed"] = plain(distributed.full_state_dict(resumed.objective.model))
    if info.enabled:  # FSDP2 with a mixed-precision policy: blocks compute in bf16, the shards stay fp32
        seen = []
        trainer = tagger_run(info, "fsdp", fit=False, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        linear = trainer.objective.model.blocks[1][1]
        linear.register_forward_pre_hook(lambda m, _: seen.append(m.weight.dtype))
        trainer.fit()
        result["mp_compute_dtype"] = str(seen[0])
        result["mp_shard_dtype"] = str(next(trainer.objective.model.parameters()).dtype)
        result["mp"] = plain(distributed.full_state_dict(trainer.objective.model))
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("strategy")
    p.add_argument("out")
    p.add_argument("--chunked", action="store_true")
    p.add_argument("--dir", default=None)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    info = distributed.setup("gloo", "cpu")
    if args.strategy == "custom":
        result = custom_suite(info, Path(args.dir))
        if info.is_main:
            Path(args.out).write_text(json.dumps(result))
        distributed.shutdown(info)
        return
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=SEQ)
    model = Transformer(cfg)
    parallel = distributed.parallelize(LanguageModelObjective(model, chunked=args.chunked), args.strategy, info)
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
        model, optimizer, schedule, Sharded(info.rank, info.world_size), parallel, max_steps=args.steps,
        grad_accum=2, grad_clip=0.0, log_every=1, progress=False, dist=info, chunked_ce=args.chunked, **extra,
    )  # fmt: skip
    trainer.fit()
    if info.is_main:
        with open(args.out, "w") as f:
            json.dump(trainer.history, f)
    distributed.shutdown(info)


if __name__ == "__main__":
    main()
