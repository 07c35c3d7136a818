"""Fuzz lmforge's readers of untrusted input by the thousand, with the engine of tests/fuzz.

    python benchmarks/fuzz.py --format all --cases 2000          # counts per format and outcome, failures listed
    python benchmarks/fuzz.py --format gguf --seed 0 --case 17   # replay one case (files kept, full message)

Each case is one seeded mutation of a file lmforge wrote (GGUF, safetensors + config.json + index, tokenizer.json,
.tiktoken, vocab.json + merges.txt, chat templates, train TOML, training checkpoints, generation parameters),
run in a forked child under a time limit and a 4 GiB address-space limit. The outcomes and the oracle are
described in tests/fuzz/engine.py and tests/fuzz/targets.py; the exit status is 1 when any case failed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # before benchmarks/: `fuzz` is tests/fuzz

from fuzz.engine import GOOD, run_cases
from fuzz.targets import TARGETS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="all", choices=["all", *TARGETS], help="which target (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=200, help="cases per format (default 200)")
    parser.add_argument("--case", type=int, default=None, help="replay this one case (keeps its files)")
    parser.add_argument("--workers", type=int, default=2, help="cases run side by side (default 2)")
    parser.add_argument("--show", type=int, default=5, help="failures printed per format and kind (default 5)")
    parser.add_argument("--workdir", type=Path, default=None, help="where files go (default: a temporary folder)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lmforge-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    names = list(TARGETS) if args.format == "all" else [args.format]
    cases = [args.case] if args.case is not None else range(args.cases)
    failed = 0
    print(f"{'format':<16}{'cases':>7}{'error':>7}{'success':>9}  failures by kind{'':>20}seconds")
    for name in names:
        target = TARGETS[name]
        start = time.monotonic()
        try:  # building the base files, drawing the cases, the warm-up on the unmutated input: all must work
            base = target.build(_fresh(workdir / f"{name}-base"))
            results = run_cases(target, base, args.seed, cases, workdir, args.workers, keep=args.case is not None)
        except Exception as e:
            print(f"{name:<16}  the target itself failed: {type(e).__name__}: {e}")
            failed += 1
            continue
        counts = Counter(r.outcome.kind for r in results)
        bad = {k: v for k, v in sorted(counts.items()) if k not in GOOD}
        failed += sum(bad.values())
        print(f"{name:<16}{len(results):>7}{counts['error']:>7}{counts['success']:>9}  "
              f"{', '.join(f'{k} {v}' for k, v in bad.items()) or '-':<36}{time.monotonic() - start:7.1f}")  # fmt: skip
        shown: Counter[str] = Counter()
        for r in results:
            if args.case is not None:
                print(f"  {r.description}\n  -> [{r.outcome.kind}] {r.outcome.detail}\n  files: {workdir}")
            elif r.failed and shown[r.outcome.kind] < args.show:
                shown[r.outcome.kind] += 1
                print("  " + str(r).replace("\n", "\n  "))
    if args.workdir is None and args.case is None:  # a replay keeps its files to inspect
        shutil.rmtree(workdir, ignore_errors=True)
    return int(failed > 0)


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
