"""The fuzz engine: seeded mutations, each case run in a forked child under a time and an address-space limit.

A *target* (see `targets.py`) builds its base files once in the parent, then for case K of seed S draws one mutation
from ``random.Random(f"{target}:{S}:{K}")`` (so any case replays alone) and writes the mutated files to a fresh
directory. A forked child (lmforge, torch and the base objects are already imported and built, so a case costs a
few milliseconds of setup) sets ``RLIMIT_AS`` and an alarm, runs the target's check, and reports one `Outcome` over
a pipe. The verdict:

    error            an `LmforgeError` or `OSError` whose message is one line and names the file (or the field)
    success          the load worked and the result is sane (the target's check decides what sane means)
    wrong-exception  any other exception escaped (a bug: KeyError, TypeError, RuntimeError, ...)
    unnamed-error    an lmforge error whose message names neither the file nor the field
    multiline-error  an lmforge error whose message is more than one line
    insane           the load "worked" but the result is wrong (NaN logits, a lost character, a file read outside
                     the model directory, a marker file created by a pickle)
    timeout          the case ran past its time limit (killed by SIGALRM, or by the parent after a grace period)
    memory           MemoryError, or an allocation refused under the address-space limit
    crash            the child died without a report (a signal, a hard exit)

Everything but error and success is a failure, reported with its replay command.
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import random
import resource
import select
import shutil
import signal
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.utils.errors import LmforgeError

GOOD = ("error", "success")
TIME_LIMIT_S = 10.0
# torch alone maps ~0.7 GiB of address space once imported (measured: VmSize 730 MB with a tiny model built);
# 4 GiB leaves room for every legitimate case and stops a runaway allocation long before the machine suffers.
MEMORY_LIMIT = 4 * 1024**3
GRACE_S = 5.0  # how long past the alarm the parent waits before it SIGKILLs a child itself


class Insane(Exception):
    """Raised by a target's check: the load succeeded but its result is wrong."""


@dataclass(frozen=True)
class Mutation:
    """One case's input: the files to write (relative path -> bytes), what was done, and what the loader gets.

    `names`: strings of which an error message must contain one (the mutated file's name or a field name for
    non-file inputs; the case directory, which holds the path the user passed, is added); empty means any lmforge
    error is accepted (a chat template string has no file to name).
    `payload`: extra, picklable data for the check (e.g. sampling parameters); inherited by the fork."""

    description: str
    files: dict[str, bytes]
    names: tuple[str, ...] = ()
    payload: Any = None


@dataclass(frozen=True)
class Outcome:
    kind: str
    detail: str = ""


@dataclass(frozen=True)
class Result:
    target: str
    seed: int
    case: int
    description: str
    outcome: Outcome
    seconds: float

    @property
    def failed(self) -> bool:
        return self.outcome.kind not in GOOD

    def replay(self) -> str:
        return f"python benchmarks/fuzz.py --format {self.target} --seed {self.seed} --case {self.case}"

    def __str__(self) -> str:
        detail = self.outcome.detail if len(self.outcome.detail) < 600 else self.outcome.detail[:600] + "..."
        return f"[{self.outcome.kind}] {self.target} case {self.case}: {self.description}\n    {detail}\n" \
               f"    replay: {self.replay()}"  # fmt: skip


def case_rng(target: str, seed: int, case: int) -> random.Random:
    """The random stream of one case: independent of every other case, so any case replays alone."""
    return random.Random(f"{target}:{seed}:{case}")


# ----------------------------------------------------------------------------------------------------------------
# Classifying what a check did (in the child)
# ----------------------------------------------------------------------------------------------------------------


def _where(error: BaseException) -> str:
    """The innermost frame of lmforge's own code in the traceback (file:line), where a raw exception came from."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/lmforge/" in f.filename]
    frame = frames[-1] if frames else (traceback.extract_tb(error.__traceback__) or [None])[-1]
    return f" (at {frame.filename.split('/src/')[-1]}:{frame.lineno})" if frame else ""


def classify(check: Callable[[], None], names: Sequence[str]) -> Outcome:
    """Run `check` and judge what it did (see the module docstring)."""
    try:
        check()
    except Insane as e:
        return Outcome("insane", str(e))
    except MemoryError as e:
        return Outcome("memory", f"MemoryError: {e}{_where(e)}")
    except (LmforgeError, OSError) as e:
        message = f"{type(e).__name__}: {e}"
        if "\n" in str(e).strip():
            return Outcome("multiline-error", message)
        if names and not any(name in str(e) for name in names):
            return Outcome("unnamed-error", f"{message} (names none of {list(names)})")
        return Outcome("error", message)
    except RecursionError as e:
        return Outcome("wrong-exception", f"RecursionError: {str(e)[:200]}{_where(e)}")
    except Exception as e:
        message = f"{type(e).__name__}: {e}"
        kind = "memory" if "alloc" in str(e).lower() and "memory" in str(e).lower() else "wrong-exception"
        return Outcome(kind, f"{message}{_where(e)}")
    return Outcome("success")


# ----------------------------------------------------------------------------------------------------------------
# Running cases in forked children
# ----------------------------------------------------------------------------------------------------------------


def _child(check: Callable[[], None], names: Sequence[str], write_fd: int, time_limit: float, memory: int) -> None:
    """In the forked child: limits, the check, the report; never returns."""
    code = 0
    try:
        faulthandler.disable()  # a crash is reported by its signal; replay the case to debug it
        warnings.simplefilter("ignore")  # a warning does not change the verdict; thousands would bury the report
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the alarm kills the process: no handler to swallow it
        signal.setitimer(signal.ITIMER_REAL, time_limit)
        import torch

        torch.set_num_threads(1)  # two cases run side by side on two cores; no OpenMP pool to inherit
        outcome = classify(check, names)
        signal.setitimer(signal.ITIMER_REAL, 0)
        os.write(write_fd, json.dumps({"kind": outcome.kind, "detail": outcome.detail[:2000]}).encode())
    except BaseException:  # the report itself failed (e.g. out of memory): the parent sees a crash
        code = 3
    finally:
        os._exit(code)


@dataclass
class _Running:
    pid: int
    fd: int
    index: int
    started: float
    chunks: list[bytes]


def _verdict(status: int, report: bytes, elapsed: float, time_limit: float) -> Outcome:
    if report:
        try:
            data = json.loads(report.decode())
            return Outcome(data["kind"], data["detail"])
        except ValueError:  # killed while writing its report
            pass
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGALRM or (sig == signal.SIGKILL and elapsed >= time_limit):
            return Outcome("timeout", f"no result after {time_limit:g} s")
        return Outcome("crash", f"killed by {signal.Signals(sig).name}")
    return Outcome("crash", f"exited with status {os.WEXITSTATUS(status)} without a report")


def run_isolated(
    jobs: Sequence[tuple[Callable[[], None], Sequence[str]]],
    workers: int = 2,
    time_limit: float = TIME_LIMIT_S,
    memory: int = MEMORY_LIMIT,
) -> list[tuple[Outcome, float]]:
    """Run each (check, names) in its own forked child, `workers` at a time; (outcome, seconds) per job, in order."""
    results: list[tuple[Outcome, float] | None] = [None] * len(jobs)
    pending = list(range(len(jobs)))[::-1]
    running: dict[int, _Running] = {}
    while pending or running:
        while pending and len(running) < workers:
            index = pending.pop()
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                _child(*jobs[index], write_fd, time_limit, memory)
            os.close(write_fd)
            running[read_fd] = _Running(pid, read_fd, index, time.monotonic(), [])
        ready, _, _ = select.select(list(running), [], [], 0.2)
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if chunk:
                running[fd].chunks.append(chunk)
                continue
            job = running.pop(fd)
            os.close(fd)
            _, status = os.waitpid(job.pid, 0)
            elapsed = time.monotonic() - job.started
            results[job.index] = (_verdict(status, b"".join(job.chunks), elapsed, time_limit), elapsed)
        for job in running.values():  # a child stuck where the alarm cannot reach it
            if time.monotonic() - job.started > time_limit + GRACE_S:
                os.kill(job.pid, signal.SIGKILL)
    return [r for r in results if r is not None]


def run_cases(
    target: Any,
    base: Any,
    seed: int,
    cases: Iterable[int],
    workdir: Path,
    workers: int = 2,
    time_limit: float = TIME_LIMIT_S,
    keep: bool = False,
) -> list[Result]:
    """Draw, write and run the cases of `target` (whose base files are `base`) for `seed`; one Result per case.

    The case directories are removed afterwards unless `keep` (to inspect a replayed case)."""
    cases = list(cases)
    warm_up(target, base, workdir)
    drawn = []
    for case in cases:
        mutation = target.mutate(base, case_rng(target.name, seed, case))
        drawn.append((mutation, write_case(workdir / f"{target.name}-{seed}-{case}", mutation)))
    jobs = [(_bind(target.check, base, d, m), (*m.names, str(d)) if m.names else ()) for m, d in drawn]
    outcomes = run_isolated(jobs, workers=workers, time_limit=getattr(target, "time_limit", time_limit))
    if not keep:
        for _, case_dir in drawn:
            shutil.rmtree(case_dir, ignore_errors=True)
    return [
        Result(target.name, seed, case, m.description, outcome, seconds)
        for case, (m, _), (outcome, seconds) in zip(cases, drawn, outcomes, strict=True)
    ]


def write_case(case_dir: Path, mutation: Mutation) -> Path:
    """A fresh `case_dir` holding the mutation's files."""
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    for rel, data in mutation.files.items():
        (case_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (case_dir / rel).write_bytes(data)
    return case_dir


def warm_up(target: Any, base: Any, workdir: Path) -> None:
    """Run the check on the unmutated input in this process, so every lazy import, compiled regex and cache the
    check needs exists before the fork: a child then spends its time limit on the case, not on start-up."""
    mutation = target.unmutated(base)
    case_dir = write_case(workdir / f"{target.name}-warm-up", mutation)
    target.check(base, case_dir, mutation)
    shutil.rmtree(case_dir, ignore_errors=True)


def _bind(check: Callable[..., None], base: Any, case_dir: Path, mutation: Mutation) -> Callable[[], None]:
    """The check of one case, run inside its directory (so a relative path a hostile file names lands there)."""

    def run() -> None:
        os.chdir(case_dir)
        check(base, case_dir, mutation)

    return run


# ----------------------------------------------------------------------------------------------------------------
# Generic mutations
# ----------------------------------------------------------------------------------------------------------------

INT_EXTREMES = (0, -1, 1, 2, 3, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63))
FLOAT_EXTREMES = (0.0, -0.0, -1.0, 1e-45, 1e-300, 1e30, 1e308, -1e308, math.nan, math.inf, -math.inf)
ODD_VALUES = (None, True, False, "", "12", "nan", "\x00", "a" * 5000, [], {}, [1, 2], {"a": 1}, 3.5)


def extreme_number(rng: random.Random) -> int | float:
    return rng.choice(INT_EXTREMES + FLOAT_EXTREMES)


def odd_value(rng: random.Random, value: Any = None) -> Any:
    """A replacement for `value`: an extreme number, a value of another type, or `value` nested one level deeper."""
    choice = rng.random()
    if choice < 0.4:
        return extreme_number(rng)
    if choice < 0.85:
        return rng.choice(ODD_VALUES)
    return rng.choice(([value], {"value": value}))


def flip_bytes(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> tuple[bytes, str]:
    """Flip 1-4 random bits, or set 1-4 bytes to random values, inside data[lo:hi]."""
    hi = len(data) if hi is None else min(hi, len(data))
    if hi <= lo:
        return data, "no bytes to flip"
    out = bytearray(data)
    spots = sorted(rng.randrange(lo, hi) for _ in range(rng.randint(1, 4)))
    if rng.random() < 0.5:
        for i in spots:
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out), f"bit flips at {spots}"
    for i in spots:
        out[i] = rng.randrange(256)
    return bytes(out), f"random bytes at {spots}"


def truncate(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> tuple[bytes, str]:
    """Cut the file at a random length in [lo, hi)."""
    hi = len(data) if hi is None else min(hi, len(data))
    at = rng.randrange(lo, max(hi, lo + 1))
    return data[:at], f"truncated to {at} of {len(data)} bytes"


def insert_bytes(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> tuple[bytes, str]:
    """Insert 1-16 random bytes, or a copy of a slice of the file, at a random position in [lo, hi]."""
    hi = len(data) if hi is None else min(hi, len(data))
    at = rng.randint(lo, hi)
    if rng.random() < 0.5:
        extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        start = rng.randrange(len(data))
        extra = data[start : start + rng.randint(1, 64)]
    return data[:at] + extra + data[at:], f"inserted {len(extra)} bytes at {at}"


def byte_mutation(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> tuple[bytes, str]:
    """A flip or insertion inside [lo, hi) (the file's structure), or a truncation anywhere."""
    kind = rng.choice(("flip", "flip", "truncate", "insert"))
    if kind == "truncate":
        return truncate(data, rng)
    return (flip_bytes if kind == "flip" else insert_bytes)(data, rng, lo, hi)


# ----------------------------------------------------------------------------------------------------------------
# Structure-aware mutations of trees (JSON, TOML, checkpoint payloads)
# ----------------------------------------------------------------------------------------------------------------


def pick_path(tree: Any, rng: random.Random, stop: float = 0.3) -> list[Any]:
    """A random path (keys / indices) from the root: a walk that stops at each node with probability `stop`, so
    shallow keys (a config's own fields) come up as often as deep ones; it stops at the root itself (the whole
    document replaced) only a sixth as often."""
    path: list[Any] = []
    node = tree
    while isinstance(node, dict | list) and node and rng.random() >= (stop if path else stop / 6):
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
        node = node[key]
    return path


def _get(tree: Any, path: Sequence[Any]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def mutate_tree(
    tree: Any, rng: random.Random, replacement: Callable[[random.Random, Any], Any] = odd_value
) -> tuple[Any, str]:
    """One structure-aware edit of a JSON-like tree (mutated in place; the new root is returned): delete a key or
    an element, replace a value with an extreme number / another type / a nested copy, or wrap the whole root."""
    path = pick_path(tree, rng)
    if not path:
        new = rng.choice(([tree], "text", 0, None, {"nested": tree}))
        return new, f"root replaced by a {type(new).__name__}"
    parent, key = _get(tree, path[:-1]), path[-1]
    where = "".join(f"[{k!r}]" for k in path)
    if rng.random() < 0.25:
        del parent[key]
        return tree, f"deleted {where}"
    old = parent[key]
    value = replacement(rng, old)
    parent[key] = value
    return tree, f"{where}: {short_repr(old)} -> {short_repr(value)}"


def short_repr(value: Any) -> str:
    """repr(value), cut to 60 characters for a case's description."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def json_bytes(tree: Any) -> bytes:
    """JSON as Python writes it, NaN and Infinity included (a hostile file may contain them)."""
    return json.dumps(tree, indent=1, ensure_ascii=False).encode("utf-8", "surrogatepass")


def mutate_json(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A tree edit (most of the time) or a byte-level edit of a JSON file."""
    if rng.random() < 0.7:
        tree, description = mutate_tree(json.loads(data), rng)
        return json_bytes(tree), description
    return byte_mutation(data, rng)


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if value is None:
        return '""'  # TOML has no null
    if isinstance(value, list):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_scalar(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value), ensure_ascii=False)


def toml_text(tree: dict, prefix: str = "") -> str:
    """A dict as TOML: scalars, inline arrays and tables first, then one [table] per nested dict."""
    lines = [f"{json.dumps(str(k))} = {_toml_scalar(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tree.items():
        if isinstance(value, dict):
            name = f"{prefix}.{json.dumps(str(key))}" if prefix else json.dumps(str(key))
            text += f"\n[{name}]\n" + toml_text(value, name)
    return text


def mutate_lines(data: bytes, rng: random.Random, field_sep: str = " ") -> tuple[bytes, str]:
    """A line-level edit of a text file: delete, duplicate or swap lines, replace one field of a line with an odd
    token, or add a line with a wrong number of fields."""
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    kind = rng.choice(("delete", "duplicate", "swap", "field", "field", "extra"))
    if kind == "delete":
        del lines[i]
    elif kind == "duplicate":
        lines.insert(j, lines[i])
    elif kind == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == "field":
        fields = lines[i].split(field_sep)
        k = rng.randrange(len(fields))
        fields[k] = str(rng.choice((*INT_EXTREMES, "nan", "1.5", "", "abc", "====", "-0", "\u0100", "a b")))
        lines[i] = field_sep.join(fields)
    else:
        lines.insert(i, rng.choice(("x", "a b c", "#version: 0.2", " ", "\t", "Zm9v 1 2", "\x00 \x00")))
    text = "\n".join(lines).encode("utf-8", "surrogateescape")
    return text, f"line {i}: {kind}" + (f" (with line {j})" if kind in ("duplicate", "swap") else "")
