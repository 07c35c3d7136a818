"""utils/atomic.py: whole-directory replacement (the SIGKILL tests are in test_durability.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge import ModelConfig, Transformer
from lmforge.io.hf import save_hf
from lmforge.utils import atomic
from lmforge.utils.atomic import atomic_directory

CFG = dict(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=32)


def model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**CFG))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_a_save_replaces_the_directory_whole_and_keeps_other_files(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "m"
    save_hf(model(0), out, shard_bytes=2_000)  # sharded: several model-*.safetensors and an index
    assert (out / "model.safetensors.index.json").exists()
    (out / "README.md").write_text("notes")
    (out / "extra").mkdir()
    (out / "extra" / "a.txt").write_text("a")
    new = model(1)
    save_hf(new, out)  # one file now: the old shards and index must go, or they would shadow it
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "extra", "model.safetensors"]
    assert (out / "README.md").read_text() == "notes" and (out / "extra" / "a.txt").read_text() == "a"
    assert same_weights(lmforge.load(out)[0], new)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or old directory left


def test_a_failed_save_leaves_the_old_directory_untouched(tmp_path):
    out = tmp_path / "m"
    old = model(0)
    save_hf(old, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="disk full"), atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_leftover_from_a_killed_save_is_swept_and_a_file_is_not_replaced(tmp_path):
    out = tmp_path / "m"
    (tmp_path / ".m.abc123.tmp").mkdir()  # what a SIGKILL mid-save leaves
    save_hf(model(0), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    (tmp_path / "f").write_text("a file")
    with pytest.raises(FileExistsError, match="is not a directory"):
        save_hf(model(0), tmp_path / "f")
    assert (tmp_path / "f").read_text() == "a file"


def test_a_symlinked_directory_is_replaced_where_it_points(tmp_path):
    real = tmp_path / "real"
    save_hf(model(0), real)
    os.symlink(real, tmp_path / "link")
    new = model(1)
    save_hf(new, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and same_weights(lmforge.load(Path(real))[0], new)


def test_files_get_the_usual_mode_even_when_the_writer_replaces_them(tmp_path):
    """safetensors writes through its own private temporary file; the saved weights are still readable by others."""
    umask = os.umask(0o022)
    try:
        save_hf(model(0), tmp_path / "m")
    finally:
        os.umask(umask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "m").iterdir()} == {
        "config.json": "0o644", "model.safetensors": "0o644"
    }
