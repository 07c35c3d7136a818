"""Process pools for the data stages (pre-token counting, batch encoding, sharding): the cores this process may
use, the start method, and a map that sends its shared arguments once per worker instead of once per item."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence


def cpu_count() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pool_context() -> multiprocessing.context.BaseContext:
    """The start method for worker processes: fork where it exists (workers start in milliseconds; spawn would
    re-import torch through lmforge/__init__)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


_SHARED: tuple = ()


def _init_shared(*shared) -> None:
    global _SHARED
    _SHARED = shared


def _call_shared(fn_item: tuple[Callable, object]):
    fn, item = fn_item
    return fn(item, *_SHARED)


def map_in_pool(fn: Callable, items: Sequence, workers: int, *shared) -> list:
    """``[fn(item, *shared) for item in items]`` in ``workers`` processes; ``shared`` is sent once per worker."""
    with pool_context().Pool(min(workers, len(items)), _init_shared, shared) as pool:
        return pool.map(_call_shared, [(fn, item) for item in items], chunksize=max(1, len(items) // (4 * workers)))
