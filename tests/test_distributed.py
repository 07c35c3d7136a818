"""DDP and FSDP2 on 2 CPU processes (gloo, torchrun) reproduce single-process training on the same global batch;
FSDP2 checkpoints gather the whole model and resume exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")


def run(tmp_path: Path, strategy: str, nproc: int, *options: str) -> list[dict]:
    out = tmp_path / f"{strategy}-{nproc}-{len(list(tmp_path.iterdir()))}.json"
    args = [str(WORKER), strategy, str(out), *options]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]  # a clean shutdown: every rank exits 0
    return json.loads(out.read_text())


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tok_s", "mfu")} for r in history]


def losses(history: list[dict]) -> list[float]:
    return [r["loss"] for r in history if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, chunked", [("ddp", False), ("fsdp", False), ("fsdp", True)])
def test_two_processes_equal_one(tmp_path, strategy, chunked):
    options = ["--chunked"] if chunked else []
    single = losses(run(tmp_path, strategy, 1, *options))
    double = losses(run(tmp_path, strategy, 2, *options))
    assert len(single) == len(double) == 6
    assert double == pytest.approx(single, abs=1e-5)
    assert single[-1] < single[0]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "step_00000006.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_fsdp_checkpoint_resume_is_exact(tmp_path):
    """6 FSDP2 steps straight == 3 steps, a new launch resuming from the checkpoint, 3 more; the checkpoint holds
    whole tensors (loadable in one process) and validation and samples equal a single process' (every 3 steps)."""
    straight = run(tmp_path, "fsdp", 2, "--dir", str(tmp_path / "a"))
    first = run(tmp_path, "fsdp", 2, "--dir", str(tmp_path / "b"), "--steps", "3")
    resumed = run(tmp_path, "fsdp", 2, "--dir", str(tmp_path / "b"))
    assert len(losses(first)) == 3
    assert untimed(resumed) == untimed(straight)  # losses, validation and samples; steps 1-3 from the checkpoint
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["embed.weight"].shape == (256, 32) and type(a["embed.weight"]) is torch.Tensor  # whole, not a shard
    single = run(tmp_path, "fsdp", 1, "--dir", str(tmp_path / "c"))
    evals = [(r["step"], r["val_bpb"], r["sample"]) for r in straight if "val_loss" in r]
    assert [(s, pytest.approx(bpb, abs=1e-5), text) for s, bpb, text in evals] == [
        (r["step"], r["val_bpb"], r["sample"]) for r in single if "val_loss" in r
    ]
    assert [s for s, _, _ in evals] == [3, 6]
