"""The training loop: accumulation equals one big batch, exact resume, options that must not change the math."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.tokenizer import train_bpe
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import Schedule
from lmforge.train.trainer import Trainer

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"
SEQ = 32


class Windows:
    """Random windows of a token tensor: batch(step) is a pure function of (seed, step)."""

    def __init__(self, tokens: torch.Tensor, rows: int, seed: int = 0) -> None:
        self.tokens, self.rows, self.seed = tokens, rows, seed

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - SEQ - 1, (self.rows,), generator=g)
        rows = torch.stack([self.tokens[s : s + SEQ + 1] for s in starts.tolist()])
        targets = rows[:, 1:].clone()
        targets[:, :3] = -100  # some targets not counted: accumulation must weigh tokens, not micro-batches
        return {"input_ids": rows[:, :-1], "targets": targets}


@pytest.fixture(scope="module")
def corpus():
    text = (DATA / "hamlet_gut.txt").read_text()[:60_000]
    tok = train_bpe([text], vocab_size=320, special_tokens=["<|endoftext|>"], progress=False, workers=1)
    ids = torch.tensor(tok.encode_ordinary(text))
    split = int(len(ids) * 0.9)
    return tok, ids[:split], ids[split:]


def make(corpus, run_dir=None, *, rows=8, max_steps=12, seed=0, **kw) -> Trainer:
    tok, train_ids, val_ids = corpus
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                      max_seq_len=SEQ)  # fmt: skip
    model = Transformer(cfg)
    optimizer = build_optimizer("adamw", model, lr=3e-3, weight_decay=0.1)
    schedule = Schedule("cosine", total_steps=max_steps, warmup_steps=2, min_lr_ratio=0.1)
    return Trainer(
        model, optimizer, schedule, Windows(train_ids, rows), val_data=Windows(val_ids, 4, seed=1),
        max_steps=max_steps, run_dir=run_dir, log_every=1, progress=False, tokenizer=tok, **kw,
    )  # fmt: skip


def losses(trainer: Trainer) -> list[float]:
    return [r["loss"] for r in trainer.history if "loss" in r]


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def test_loss_goes_down_and_the_run_directory_has_everything(corpus, tmp_path):
    trainer = make(corpus, tmp_path, max_steps=30, eval_every=15, eval_steps=2, sample_every=30, checkpoint_every=10)
    trainer.sample_prompt = "HAMLET."
    last = trainer.fit()
    train = losses(trainer)
    assert train[-1] < train[0] - 1.0
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))
    for key in ("loss", "lr", "grad_norm", "tok_s", "mfu"):
        assert all(key in r for r in records if "loss" in r), key
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [15, 30] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert 0 < evals[1]["val_bpb"] < evals[1]["val_loss"] / 0.693  # a token is more than one byte
    assert isinstance(evals[1]["sample"], str) and "sample" not in evals[0]
    assert last["val_loss"] == evals[1]["val_loss"] and 0 < last["mfu"] < 1
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000010.pt", "step_00000020.pt", "step_00000030.pt",
    ]  # fmt: skip


def test_tensorboard_logs_the_same_scalars_and_resume_purges_later_steps(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = make(corpus, tmp_path, max_steps=8, eval_every=4, eval_steps=1, sample_every=4, checkpoint_every=4,
                 tensorboard=True)  # fmt: skip
    first.max_steps = 6  # killed after logging steps 5-6 past the step-4 checkpoint
    first.fit()
    (tmp_path / "checkpoints" / "step_00000006.pt").unlink()
    second = make(corpus, tmp_path, max_steps=8, eval_every=4, eval_steps=1, sample_every=4, checkpoint_every=4,
                  tensorboard=True)  # fmt: skip
    second.fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9))  # steps 5-6 of the first run were purged, not doubled
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in second.history if "loss" in r], rel=1e-6)
    assert {"train/lr", "train/grad_norm", "train/tok_s", "train/mfu", "val/loss", "val/bpb"} <= set(
        events.Tags()["scalars"]
    )
    assert [e.step for e in events.Scalars("val/bpb")] == [4, 8]
    assert "sample/text_summary" in events.Tags()["tensors"]


def test_tensorboard_needs_a_run_directory(corpus):
    with pytest.raises(ValueError, match="tensorboard=True needs a run_dir"):
        make(corpus, tensorboard=True)


def test_gradient_accumulation_equals_one_big_batch(corpus):
    one, four = make(corpus), make(corpus, grad_accum=4)
    one.fit()
    four.fit()
    assert losses(one) == pytest.approx(losses(four), rel=1e-5)
    assert_same_weights(weights(one), weights(four), atol=1e-5)


def test_resume_is_bit_exact(corpus, tmp_path):
    straight = make(corpus, tmp_path / "straight", max_steps=12)
    straight.fit()
    first = make(corpus, tmp_path / "resumed", max_steps=12)
    first.max_steps = 6  # stop half way (same schedule), as a killed run would
    first.fit()
    second = make(corpus, tmp_path / "resumed", max_steps=12, seed=123)  # a new process, other initial weights
    second.fit()
    assert second.history[5]["step"] == 6 and losses(second) == losses(straight)
    assert_same_weights(weights(second), weights(straight))
    logged = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == list(range(1, 13))


def test_activation_checkpointing_and_chunked_ce_do_not_change_training(corpus):
    plain = make(corpus, max_steps=4)
    plain.fit()
    for kw in ({"activation_checkpointing": True}, {"chunked_ce": True}):
        other = make(corpus, max_steps=4, **kw)
        other.fit()
        assert losses(other) == pytest.approx(losses(plain), rel=1e-5), kw
        assert_same_weights(weights(other), weights(plain), atol=1e-5)


def test_bf16_autocast_trains(corpus):
    fp32, bf16 = make(corpus, max_steps=8), make(corpus, max_steps=8, precision="bf16")
    fp32.fit()
    bf16.fit()
    assert losses(bf16)[-1] < losses(bf16)[0]
    assert losses(bf16) == pytest.approx(losses(fp32), abs=0.05)


def test_time_budget_stops_early(corpus):
    trainer = make(corpus, max_steps=10_000, time_budget_s=0.0)
    trainer.fit()
    assert trainer.step == 1


def test_bad_arguments(corpus):
    with pytest.raises(ValueError, match="grad_accum=0"):
        make(corpus, grad_accum=0)
    with pytest.raises(ValueError, match="precision='fp8'"):
        make(corpus, precision="fp8")
    with pytest.raises(ValueError, match=r"fp16.*CUDA"):
        make(corpus, precision="fp16")
    with pytest.raises(ValueError, match=r"parallel must be distributed.parallelize\(objective, ...\) of an objective"):
        make(corpus, parallel=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not divisible by grad_accum=3"):
        make(corpus, grad_accum=3).fit()


# -- time-driven runs (schedule_by="time") -----------------------------------------------------------------------


class FakeClock:
    """A clock whose seconds pass only while a training batch is drawn (see `Timed`): a machine whose speed the
    test sets exactly, step by step."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Timed:
    """Batches whose step `s` costs `cost(s)` seconds of `clock` (powers of two: the sums are exact)."""

    def __init__(self, data: Windows, clock: FakeClock, cost) -> None:
        self.data, self.clock, self.cost = data, clock, cost

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        self.clock.now += self.cost(step)
        return self.data.batch(step)


BUDGET = 40.0
SLOWS = lambda s: 1.0 if s < 8 else 4.0  # 8 s at 1 s a step, then 32 s at 4 s: 16 steps in all
SPEEDS_UP = lambda s: 4.0 if s < 4 else 1.0  # 16 s at 4 s a step, then 24 s at 1 s: 28 steps


def timed(corpus, cost, run_dir=None, clock=None, **kw) -> Trainer:
    """A time-driven trainer on a fake clock: warmup is the first 10% of the budget, cosine to 0.1 after it."""
    clock = clock or FakeClock()
    trainer = make(corpus, run_dir, max_steps=10_000, time_budget_s=BUDGET, schedule_by="time", clock=clock, **kw)
    trainer.schedule = Schedule("cosine", total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    trainer.train_data = Timed(trainer.train_data, clock, cost)
    return trainer


def steps_of(trainer: Trainer, *keys: str) -> list[tuple]:
    return [tuple(r[k] for k in keys) for r in trainer.history if "loss" in r]


@pytest.mark.parametrize(("cost", "expected_steps"), [(SLOWS, 16), (SPEEDS_UP, 28)], ids=["slows", "speeds-up"])
def test_time_driven_run_spends_its_budget_and_ends_decayed(corpus, cost, expected_steps):
    trainer = timed(corpus, cost)
    trainer.fit()
    assert trainer.step == expected_steps  # the step count follows the machine's speed (hand-counted above)
    assert trainer.elapsed_s == BUDGET and trainer.ended_by == "time_budget"  # the whole budget, not a step more
    records = steps_of(trainer, "elapsed_s", "progress", "lr_factor")
    elapsed, progress, factors = zip(*records, strict=True)
    assert list(elapsed) == sorted(set(elapsed)) and elapsed[-1] == BUDGET
    assert list(progress) == sorted(progress) and progress[0] == 0.0 and progress[-1] == 1.0
    assert factors[0] == 0.0 and factors[-1] == pytest.approx(0.1, abs=1e-12)  # warmup from 0, ends at min_lr_ratio
    after_warmup = [f for p, f in zip(progress, factors, strict=True) if p >= 0.1]
    assert after_warmup == sorted(after_warmup, reverse=True)  # the lr only falls once warmup is over
    assert factors == pytest.approx([trainer.schedule.at(p) for p in progress], abs=1e-12)
    if cost is SLOWS:  # the first slow step was projected from the last fast one: it ends at (8 + 1) / 40
        assert progress[8] == 9 / 40 and progress[9] == (12 + 4) / 40


def test_time_driven_resume_continues_the_same_schedule(corpus, tmp_path):
    straight = timed(corpus, SLOWS)
    straight.fit()
    first = timed(corpus, SLOWS, tmp_path)
    first.max_steps = 10  # killed after step 10, in the slow part
    first.fit()
    assert first.ended_by == "max_steps" and first.schedule_progress < 1
    second = timed(corpus, SLOWS, tmp_path, clock=FakeClock(now=1e6), seed=123)  # a new process: other clock, weights
    second.fit()
    keys = ("step", "elapsed_s", "progress", "lr_factor", "loss")
    assert steps_of(second, *keys) == steps_of(straight, *keys)
    assert second.step == 16 and second.elapsed_s == BUDGET
    assert_same_weights(weights(second), weights(straight))
    again = timed(corpus, SLOWS, tmp_path)  # resuming a finished time-driven run trains nothing more
    again.fit()
    assert again.step == 16 and again.ended_by == "time_budget"


def test_a_step_driven_checkpoint_is_not_resumed_time_driven(corpus, tmp_path):
    from lmforge.train.checkpoint import CheckpointError

    plain = make(corpus, tmp_path, max_steps=3)
    plain.fit()
    assert "progress" not in plain.history[-1]  # step-driven records are as before
    with pytest.raises(CheckpointError, match="extra has no 'elapsed_s': it was not written by a time-driven run"):
        timed(corpus, SLOWS, tmp_path).fit()


def test_time_driven_bad_arguments(corpus):
    with pytest.raises(ValueError, match="invalid schedule_by='clock': must be one of step, time"):
        make(corpus, schedule_by="clock")
    with pytest.raises(ValueError, match=r"invalid time_budget_s=None: schedule_by='time' needs a finite budget"):
        make(corpus, schedule_by="time")
    with pytest.raises(ValueError, match=r"invalid time_budget_s=0: schedule_by='time'"):
        make(corpus, schedule_by="time", time_budget_s=0)
    trainer = make(corpus, schedule_by="time", time_budget_s=1.0)
    trainer.schedule = Schedule("constant")
    with pytest.raises(ValueError, match=r"invalid schedule.total_steps=None: schedule_by='time'"):
        trainer.fit()  # fit checks again: the speedrun sets these attributes after construction
