"""Memory the allocators keep: freed pages given back to the operating system, and the cyclic garbage collector
paused while a loader builds its many small objects.

Loading a quantized model allocates and frees many mid-sized buffers (unpacked codes, a kernel's repacking) between
the tensors it keeps. glibc's allocator serves buffers under its mmap threshold (grown up to 32 MB by earlier frees)
from its heap, and a freed heap page that sits below a live allocation stays resident: the process's RSS keeps the
garbage of the load. `malloc_trim(0)` returns every whole free page of the heap (madvise), so the resident memory is
what the model holds. On other C libraries it is a no-op.

Building a tokenizer makes ~10^5 tuples, lists and dicts in a few hundred milliseconds. Each 700 new containers
start a collection of the young generation and, every so often, of everything (with torch imported, ~2e5 objects):
most of a GGUF tokenizer's build time. None of these objects form cycles the loader leaves behind, so loaders run
with the collector paused (`paused_gc`), and it runs again, as before, after.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Iterator

__all__ = ["paused_gc", "release_freed_memory"]


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off inside (and as a decorator, over a call), on again after if it was on."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Return the allocator's free pages to the operating system (glibc's `malloc_trim`), where it can."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
