"""DDP and FSDP2 on 2 CPU processes (gloo, torchrun) reproduce single-process training on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_worker.py")


def run(tmp_path: Path, strategy: str, nproc: int) -> list[float]:
    out = tmp_path / f"{strategy}-{nproc}.json"
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), strategy, str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), strategy, str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]  # a clean shutdown: every rank exits 0
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path, strategy):
    single = run(tmp_path, strategy, 1)
    double = run(tmp_path, strategy, 2)
    assert len(single) == len(double) == 6
    assert double == pytest.approx(single, abs=1e-5)
    assert single[-1] < single[0]
