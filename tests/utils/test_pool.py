"""utils/pool.py: a process map equals the plain loop, and its shared arguments reach every worker."""

import os

from lmforge.utils.pool import cpu_count, map_in_pool


def scaled_with_pid(item: int, factor: int) -> tuple[int, int]:
    return item * factor, os.getpid()


def test_map_in_pool_equals_the_loop_and_runs_in_other_processes():
    items = list(range(40))
    out = map_in_pool(scaled_with_pid, items, 2, 3)
    assert [value for value, _ in out] == [i * 3 for i in items]  # in order, with the shared argument
    assert os.getpid() not in {pid for _, pid in out}


def test_cpu_count_is_the_cores_this_process_may_use():
    assert 1 <= cpu_count() <= (os.cpu_count() or 1)
