"""What every fuzz test file does with its target: the unmutated files succeed (the oracle accepts good input),
and `CASES` seeded mutations end in a clean error or a sane success."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from fuzz.engine import run_cases, run_isolated, write_case
from fuzz.targets import TARGETS

SEED = int(os.environ.get("LMFORGE_FUZZ_SEED", "0"))
CASES = int(os.environ.get("LMFORGE_FUZZ_CASES", "50"))
_BASES: dict[str, object] = {}


def base_of(name: str, workdir: Path) -> object:
    """The target's base files, built once per session."""
    if name not in _BASES:
        root = workdir / f"{name}-base"
        root.mkdir(parents=True, exist_ok=True)
        _BASES[name] = TARGETS[name].build(root)
    return _BASES[name]


def assert_unmutated_succeeds(name: str, workdir: Path) -> None:
    """The unmutated input passes the target's check in a child: the oracle accepts what lmforge wrote itself."""
    target, base = TARGETS[name], base_of(name, workdir)
    mutation = target.unmutated(base)
    case_dir = write_case(workdir / f"{name}-unmutated", mutation)

    def check() -> None:
        os.chdir(case_dir)
        target.check(base, case_dir, mutation)

    [(outcome, _)] = run_isolated([(check, ())], workers=1, time_limit=target.time_limit)
    assert outcome.kind == "success", outcome


def assert_fuzz_clean(name: str, workdir: Path) -> None:
    """`CASES` mutations (seed `SEED`; LMFORGE_FUZZ_SEED / LMFORGE_FUZZ_CASES change them) each end in a clean
    lmforge error or a sane success; the failures are listed with their replay commands."""
    results = run_cases(TARGETS[name], base_of(name, workdir), SEED, range(CASES), workdir)
    assert len(results) == CASES
    failures = [r for r in results if r.failed]
    counts = Counter(r.outcome.kind for r in results)
    assert not failures, f"{len(failures)} of {CASES} {name} cases failed ({dict(counts)}):\n" + "\n".join(
        str(r) for r in failures
    )
