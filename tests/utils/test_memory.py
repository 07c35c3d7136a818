"""utils/memory.py: the collector paused around a call and on again after; freed pages handed back; and a model
built on the meta device (every loader's) without importing torch._dynamo (a second of every load)."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from lmforge.utils.memory import paused_gc, release_freed_memory


def test_paused_gc_restores_the_collector_state():
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()

    @paused_gc()
    def fails() -> None:
        assert not gc.isenabled()
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        fails()
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # off before: left off
    finally:
        gc.enable()


def test_release_freed_memory_runs():
    blocks = [bytearray(1 << 20) for _ in range(64)]
    del blocks
    release_freed_memory()  # glibc's malloc_trim, or nothing: never an error


def test_a_meta_build_does_not_import_dynamo():
    code = (
        "import sys, torch\n"
        "from lmforge.config import ModelConfig\n"
        "from lmforge.model.transformer import Transformer\n"
        "with torch.device('meta'):\n"
        "    Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=16,"
        " position='learned'))\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
