"""DDP, FSDP2 and DDP + ZeRO-1 on 2 CPU processes (gloo, torchrun) reproduce single-process training on the same
global batch, for the language model and for any module objective; FSDP2 and ZeRO-1 checkpoints gather the whole
model (and optimizer state) and resume exactly."""

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
    return launch(out, nproc, strategy, *options)


def launch(out: Path, nproc: int, strategy: str, *options: str) -> list | dict:
    """dist_worker.py on `nproc` processes (1: plain python, else torchrun); what it wrote to `out`."""
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


def custom_run(tmp_path: Path, nproc: int) -> dict:
    """dist_worker's "custom" suite (one launch); its run directories go to tmp_path/custom-<nproc>."""
    return launch(tmp_path / f"custom-{nproc}.json", nproc, "custom", "--dir", str(tmp_path / f"custom-{nproc}"))


@pytest.mark.slow
def test_any_module_with_tied_and_frozen_weights_on_every_strategy(tmp_path):
    """A non-Transformer model (tied output layer, frozen parameters) with a masked objective: DDP, FSDP2 and
    DDP + ZeRO-1 on 2 processes end with the weights one process reaches on the same global batch; ZeRO-1's
    checkpoint holds the whole optimizer state (equal to one process') and resumes exactly; FSDP2's bf16 policy
    computes in bf16 and keeps fp32 shards; full_state_dict gathers whole tensors on every rank or on rank 0."""
    from dist_worker import Tagger

    single, double = custom_run(tmp_path, 1), custom_run(tmp_path, 2)
    torch.manual_seed(0)
    init = Tagger().state_dict()
    reference = {k: torch.tensor(v) for k, v in single["ddp"].items()}
    assert reference.keys() == init.keys() and "embed.weight" in reference  # tied: one tensor, whole
    for name in ("pos", "blocks.0.1.bias"):  # frozen: never moved
        assert torch.equal(reference[name], init[name]), name
    assert not torch.allclose(reference["embed.weight"], init["embed.weight"])  # the rest trained
    for case in ("ddp", "fsdp", "zero1", "zero1_resumed"):
        got = {k: torch.tensor(v) for k, v in double[case].items()}
        assert got.keys() == reference.keys(), case
        for name in reference:
            torch.testing.assert_close(got[name], reference[name], rtol=0, atol=1e-5, msg=f"{case}: {name}")
    for case in ("ddp", "fsdp", "zero1"):
        assert double[f"{case}_losses"] == pytest.approx(single["ddp_losses"], abs=1e-5), case
    ckpt = "zero1/checkpoints/step_00000004.pt"
    one, two = (torch.load(tmp_path / f"custom-{n}" / ckpt, weights_only=True)["optimizer"] for n in (1, 2))
    assert two["param_groups"] == one["param_groups"] and two["state"].keys() == one["state"].keys()
    for index, state in one["state"].items():
        torch.testing.assert_close(two["state"][index]["momentum_buffer"], state["momentum_buffer"], rtol=0, atol=1e-5)
    assert (double["mp_compute_dtype"], double["mp_shard_dtype"]) == ("torch.bfloat16", "torch.float32")
    mixed = {k: torch.tensor(v) for k, v in double["mp"].items()}
    assert max((mixed[k] - reference[k]).abs().max().item() for k in reference) < 0.05  # bf16 rounding, no more
    assert any(not torch.equal(mixed[k], reference[k]) for k in reference)  # ... but it did compute in bf16
