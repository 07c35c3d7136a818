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

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"
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
    with pytest.raises(ValueError, match=r"parallel must be distributed.parallelize\(ModelLoss\(model\)"):
        make(corpus, parallel=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not divisible by grad_accum=3"):
        make(corpus, grad_accum=3).fit()
