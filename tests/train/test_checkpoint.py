"""Checkpoints: exact resume, keep-last-N, and a process SIGKILLed while writing one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge import ModelConfig, Transformer
from lmforge.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import Schedule, set_lr

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
SCHEDULE = Schedule("cosine", total_steps=20, warmup_steps=4, min_lr_ratio=0.1)


def fresh(seed: int = 0) -> tuple[Transformer, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Transformer(CFG)
    return model, build_optimizer("adamw", model, lr=3e-3, weight_decay=0.1)


def train(model, optimizer, steps: range) -> list[float]:
    """Steps whose batches come from the global torch RNG, so resuming must restore it too."""
    losses = []
    for step in steps:
        set_lr(optimizer, SCHEDULE, step)
        ids = torch.randint(0, CFG.vocab_size, (4, 17))
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_resume_is_bit_exact(tmp_path):
    straight_model, opt = fresh()
    torch.manual_seed(123)
    straight = train(straight_model, opt, range(20))

    model, opt = fresh()
    torch.manual_seed(123)
    first = train(model, opt, range(10))
    save_checkpoint(tmp_path, 10, model, opt, extra={"data_step": 10})
    torch.manual_seed(999)  # whatever happens in between must not matter
    model, opt = fresh(seed=7)  # a new process would start from different weights
    step, extra = load_checkpoint(latest_checkpoint(tmp_path), model, opt)
    assert (step, extra) == (10, {"data_step": 10})
    second = train(model, opt, range(step, 20))
    assert first + second == straight
    for (name, p), q in zip(model.state_dict().items(), straight_model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_keep_last_n(tmp_path):
    model, opt = fresh()
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, step, model, opt, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    for step in (6, 7):
        save_checkpoint(tmp_path, step, model, opt, keep_last=0)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="keep_last=-1"):
        save_checkpoint(tmp_path, 8, model, keep_last=-1)


def test_bad_files_are_clear_errors(tmp_path):
    model, opt = fresh()
    path = save_checkpoint(tmp_path, 1, model, opt)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", model)
    other = Transformer(CFG.replace(d_model=48, d_ff=96))
    with pytest.raises(CheckpointError, match=r"01\.pt: model\[.embed\.weight.\] has shape \(64, 32\), the model"):
        load_checkpoint(path, other)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: not a readable checkpoint"):
        load_checkpoint(truncated, model)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(CheckpointError, match="not an lmforge checkpoint"):
        load_checkpoint(foreign, model)


KILLED_WRITER = """
import sys, time
import torch
import lmforge.train.checkpoint as ck
from lmforge import ModelConfig, Transformer

run = sys.argv[1]
torch.manual_seed(0)
cfg = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)  # = CFG
model = Transformer(ModelConfig(**cfg))
ck.save_checkpoint(run, 1, model)
real_save = torch.save

def half_then_hang(obj, f):  # write half of the real bytes, then wait to be killed mid-write
    import io
    buf = io.BytesIO()
    real_save(obj, buf)
    with open(f, "wb") as out:
        out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    print("midway", flush=True)
    time.sleep(120)

ck.torch.save = half_then_hang
with torch.no_grad():
    model.embed.weight.add_(1.0)
ck.save_checkpoint(run, 2, model)
"""


def test_sigkill_while_writing_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(run)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )
    try:
        assert proc.stdout.readline().strip() == "midway"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1  # the half-written step 2, under its temporary name
    assert latest_checkpoint(run).name == "step_00000001.pt"
    model, opt = fresh(seed=5)
    step, _ = load_checkpoint(latest_checkpoint(run), model)  # the previous checkpoint is intact
    torch.manual_seed(0)
    assert step == 1 and torch.equal(model.embed.weight, Transformer(CFG).embed.weight)  # not the +1 of step 2
    save_checkpoint(run, 2, model, opt)  # the run goes on; the next save sweeps the leftover away
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001.pt", "step_00000002.pt"]
