"""The fuzz engine itself: each verdict is reachable (so a failing case cannot pass unnoticed), cases replay
exactly, and the structure-aware editors write what the reference readers (tomllib, safetensors, gguf) read."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import time
import tomllib

import gguf
import pytest
import torch
from safetensors.torch import load, save

from fuzz.engine import Insane, case_rng, classify, mutate_tree, run_isolated, toml_text
from fuzz.helpers import base_of
from fuzz.targets import TARGETS, gguf_slots, join_safetensors, split_safetensors
from lmforge.utils.errors import LmforgeError


def _raise(error: BaseException):
    def check() -> None:
        raise error

    return check


@pytest.mark.parametrize(
    "check, kind",
    [
        (lambda: None, "success"),
        (_raise(LmforgeError("model.gguf: llama.block_count=50000 ...")), "error"),
        (_raise(FileNotFoundError("model.gguf: no such file")), "error"),
        (_raise(LmforgeError("block_count=50000 is too large")), "unnamed-error"),
        (_raise(LmforgeError("model.gguf: bad\nsecond line")), "multiline-error"),
        (_raise(KeyError("block_count")), "wrong-exception"),
        (_raise(RuntimeError("shape mismatch")), "wrong-exception"),
        (_raise(RecursionError("maximum recursion depth exceeded")), "wrong-exception"),
        (_raise(MemoryError()), "memory"),
        (_raise(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2e12")), "memory"),
        (_raise(Insane("non-finite logits")), "insane"),
    ],
)
def test_classify(check, kind):
    assert classify(check, ("model.gguf",)).kind == kind


def _sleep() -> None:
    time.sleep(60)


def _allocate() -> None:
    bytearray(8 * 1024**3)  # above the 4 GiB address-space limit


def _segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def _hard_exit() -> None:
    os._exit(7)


def test_isolated_children_report_every_kind_of_end():
    start = time.monotonic()
    jobs = [(_sleep, ()), (_allocate, ()), (_segfault, ()), (_hard_exit, ()), (lambda: None, ()),
            (_raise(KeyError("x")), ())]  # fmt: skip
    results = run_isolated(jobs, workers=2, time_limit=1.0)
    assert [outcome.kind for outcome, _ in results] == [
        "timeout", "memory", "crash", "crash", "success", "wrong-exception"
    ]  # fmt: skip
    assert time.monotonic() - start < 10


def test_cases_replay_exactly(fuzz_dir):
    for name in ("safetensors", "tokenizer_json", "checkpoint", "generation"):
        target, base = TARGETS[name], base_of(name, fuzz_dir)
        first = [target.mutate(base, case_rng(name, 7, k)) for k in range(3)]
        again = [target.mutate(base, case_rng(name, 7, k)) for k in range(3)]
        assert [(m.description, m.files) for m in first] == [(m.description, m.files) for m in again]
        assert len({m.description for m in first}) > 1  # the cases differ from one another


def _canonical(tree) -> str:
    return json.dumps(tree, sort_keys=True, default=str)


def test_tree_edits_round_trip_through_toml():
    rng = random.Random(0)
    for _ in range(200):
        tree = {"model": {"d_model": 32, "rope": {"theta": 1e4}}, "optim": {"lr": 3e-4, "betas": [0.9, 0.95]}}
        tree, _ = mutate_tree(tree, rng)
        if isinstance(tree, dict):
            text = toml_text(tree)
            assert _canonical(tomllib.loads(text)) == _canonical(tree).replace("null", '""')


def test_safetensors_header_rewrite_is_read_by_safetensors():
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    data = save(tensors)
    header, body = split_safetensors(data)
    header["a"]["shape"] = [3, 2]  # same bytes, another shape
    loaded = load(join_safetensors(header, body))
    assert loaded["a"].shape == (3, 2) and torch.equal(loaded["a"].flatten(), tensors["a"].flatten())
    assert torch.equal(loaded["b"], tensors["b"])


def test_gguf_slots_are_where_the_gguf_package_reads_them(fuzz_dir):
    base = base_of("gguf", fuzz_dir)
    groups, header_end = base.extra[:2]
    slot = [s for group in groups for s in group if s.label.startswith("llama.block_count ")][-1]  # the value
    data = bytearray(base.files["m.gguf"])
    data[slot.offset : slot.offset + 4] = struct.pack("<I", 50_000)
    path = fuzz_dir / "edited.gguf"
    path.write_bytes(bytes(data))
    reader = gguf.GGUFReader(path)
    assert int(reader.fields["llama.block_count"].parts[-1][0]) == 50_000
    assert header_end <= reader.data_offset < header_end + 32  # then only the alignment padding
    assert gguf_slots(path)[1] == header_end
