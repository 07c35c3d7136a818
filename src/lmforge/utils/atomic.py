"""Atomic writes: readers see the old file (or directory) or the new one, never half of one.

A file: write to a temporary file in the same directory, flush and fsync it, `os.replace` it over the
target (atomic on POSIX), then fsync the directory so the rename itself survives a power cut.
On any failure the temporary file is removed and the target is left as it was.

A directory of several files (a Hugging Face model: config.json, shards, index, tokenizer): per-file
atomicity is not enough, since a kill between two renames would leave a directory mixing two versions
(whole files that do not belong together). `atomic_directory` fills a fresh temporary directory beside
the target and then swaps the two in one step (Linux ``renameat2(RENAME_EXCHANGE)``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` (fsynced first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private, and writers that replace it (safetensors) do too: give it the usual mode
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory's entries (renames, new files) to disk."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


@contextmanager
def atomic_directory(path: str | Path, replaces: Callable[[str], bool] = lambda name: False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path` to fill; on success it takes `path`'s place whole.

    An existing `path`'s entries that the new contents lack are carried over (hard links where possible: a
    README next to the weights stays), except those whose name `replaces(name)` claims for the writer (stale
    weight shards, an old index). The swap is one atomic exchange of the two directories where the kernel has
    it (Linux >= 3.15); elsewhere the old directory is renamed aside, the new one into place and the old one
    removed, so a kill in that instant leaves no `path` (the old one beside it as ``.NAME.*.old``), never a
    mix. On failure the temporary directory is removed and `path` is left as it was."""
    path = Path(path).resolve() if Path(path).is_symlink() else Path(path)  # replace what a link points at
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in [*path.parent.glob(f".{path.name}.*.tmp"), *path.parent.glob(f".{path.name}.*.old")]:
        shutil.rmtree(leftover, ignore_errors=True)  # from a process killed while writing
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the directory private; give it the usual mode
        yield tmp
        if path.is_dir():
            _carry_over(path, tmp, replaces)
        fsync_dir(tmp)
        _swap(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # now the old version (after an exchange), or already gone
    fsync_dir(path.parent)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _carry_over(old: Path, new: Path, replaces: Callable[[str], bool]) -> None:
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or replaces(entry.name) or (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        if Path(src).is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _swap(new: Path, path: Path) -> None:
    """Put directory `new` at `path`; afterwards `new` holds the old version (or is gone)."""
    if not path.exists():
        os.rename(new, path)
        return
    if _exchange(new, path):
        return
    aside = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old")
    os.rename(path, aside)  # onto the empty directory just made: a name no one else holds
    os.rename(new, path)
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
