"""Compiled functions that outlive their process: `torch.compile`'s whole result saved to disk and loaded back.

`torch.compile` in a new process pays three costs before a compiled decode step runs: dynamo traces the Python
(about 8 s for a 30-layer model on a small CPU: every layer's code is interpreted op by op), AOTAutograd and
inductor lower the graph to C++ (a minute or more; inductor's on-disk cache removes most of this after the first
process), and the generated code is loaded. Inductor's disk cache, and torch's portable "mega-cache" artifacts
(`torch.compiler.save_cache_artifacts`: inductor's and AOTAutograd's caches; their experimental dynamo part,
`caching_precompile`, fails on this decoder in torch 2.13), cannot remove the tracing: dynamo's result, the
transformed bytecode and its guards, lives in the process. Here the whole compiled function is kept:

* `cached_compile(fn, fullgraph=True, name=..., key=...)` returns a callable with `fn`'s signature. With a store
  active (`persist(directory)`, as the CLI does), its first call looks for a file named after a *key*: sha256 of
  the environment (torch, Python, CPU capability, thread count), lmforge's own source files (a changed forward
  must never run an old graph), `fn`'s qualified name and source file, the caller's `name`/`key` parts (e.g. the
  decoder's size) and the structure of the arguments (a module: its type, config, runtime options, submodule
  types and parameter names/shapes/dtypes; a tensor: shape, dtype, device). Found: the function is deserialized
  (`torch.compiler.load_compiled_function`, no tracing, no lowering) and torch's own guards are checked against
  the real arguments. Not found: it is compiled ahead of time (`torch.compile(fn, fullgraph=True).aot_compile`),
  saved atomically, then called. Weights are inputs of the graph, not constants (no freezing), so one file serves
  every checkpoint of the same architecture and size; the key holds no weight values.
* Safety: a compiled function is code (loading it runs it), so a file is loaded only when it and its directory
  belong to this user and no one else may write them (`untrusted`); a file that cannot be read, is corrupt, was
  written by another torch or machine (torch checks its system info), or whose guards reject the arguments is
  ignored with a warning and replaced by a fresh compile;
  a store that cannot be written warns and the compiled function is still used in this process; a function
  torch cannot compile ahead of time warns and is compiled by plain `torch.compile` for this process. Without an
  active store, or for a function with graph breaks (`fullgraph=False`: ahead-of-time compilation needs one
  graph), `cached_compile` is plain `torch.compile`. A store keeps the `KEEP` most recently used files per name.
* Every call checks the guards of the compiled entries (torch's C++ guard manager) and runs the first that
  accepts the arguments; arguments no entry accepts (another batch size) get another entry, found or compiled
  the same way.
* Dimension marks (`torch._dynamo.mark_dynamic`) are removed from the tensors reachable from the arguments when
  no entry accepts them, before looking again and before compiling: a saved guard cannot carry them (torch 2.13
  restores a marked tensor's guard as "not marked", so a marked argument would never match a loaded entry). The
  compiled graph is then specialized to the sizes it saw, which the key names (the decoder size is a key part).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.infer.step_compile import compile_step
from lmforge.utils.atomic import atomic_path

SUFFIX = ".compiled"
KEEP = 8  # compiled files kept per name (the most recently used)
_MARKS = (  # the attributes torch._dynamo.mark_dynamic and its siblings set on a tensor
    "_dynamo_dynamic_indices",
    "_dynamo_weak_dynamic_indices",
    "_dynamo_unbacked_indices",
    "_dynamo_strict_unbacked_indices",
    "_dynamo_static_indices",
    "_has_dynamo_dim_marking",
)


def default_directory() -> Path:
    """Where compiled functions are kept: $LMFORGE_CACHE_DIR/compiled, else $XDG_CACHE_HOME/lmforge/compiled,
    else ~/.cache/lmforge/compiled (a user directory: never inside a model's or package's install directory)."""
    if root := os.environ.get("LMFORGE_CACHE_DIR"):
        return Path(root) / "compiled"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge" / "compiled"


@dataclass(frozen=True)
class Store:
    """An active store: the directory of compiled functions and whom to tell what happens (one line each)."""

    directory: Path
    report: Callable[[str], None]


_STORE: ContextVar[Store | None] = ContextVar("lmforge_compile_store", default=None)


@contextlib.contextmanager
def persist(directory: str | Path | None = None, report: Callable[[str], None] | None = None) -> Iterator[Store]:
    """Within this block, `cached_compile` keeps compiled functions in `directory` (default_directory()).
    `report(line)` hears when a saved compilation is reused and when one is compiled and saved."""
    store = Store(Path(directory) if directory is not None else default_directory(), report or (lambda line: None))
    token = _STORE.set(store)
    try:
        yield store
    finally:
        _STORE.reset(token)


def cached_compile(
    fn: Callable, *, fullgraph: bool = False, name: str | None = None, key: tuple = (), model: nn.Module | None = None
) -> Callable:
    """`torch.compile(fn, fullgraph=fullgraph)`, kept on disk when a store is active and `fullgraph` (see module
    docstring). `name` (default: fn's qualified name) names the files; `key` holds what the caller knows the
    graph depends on beyond the arguments' structure (e.g. a cache size the graph is specialized to). Not kept
    on disk and given `model` (`fn` a bound method stepping it), it is `step_compile.compile_step`: no guards on
    the module tree per call."""
    store = _STORE.get()
    if store is None or not fullgraph:
        if model is not None:
            return compile_step(fn, model, fullgraph=fullgraph)
        return torch.compile(fn, fullgraph=fullgraph)
    return PersistentCompiled(fn, store, name or fn.__qualname__, key)


class PersistentCompiled:
    """A function compiled ahead of time, its entries loaded from or saved to a store (see module docstring)."""

    def __init__(self, fn: Callable, store: Store, name: str, key: tuple) -> None:
        self._func, self._bound = (fn.__func__, fn.__self__) if inspect.ismethod(fn) else (fn, None)
        self.store, self.name, self.key = store, name, key
        self.entries: list[Any] = []  # torch._dynamo.aot_compile.AOTCompiledFunction, guards checked per call
        self.loaded = self.compiled = 0  # how many entries came from disk / were compiled here

    def __call__(self, *args: Any) -> Any:
        full = args if self._bound is None else (self._bound, *args)
        entry = self._accepting(full)
        if entry is None:
            strip_dynamic_marks(full)  # e.g. a cache re-allocated since: its new tensors are marked again
            entry = self._accepting(full) or self._add_entry(full)
        return entry.fn(*full)

    def _accepting(self, full: tuple) -> Any:
        return next((entry for entry in self.entries if entry.guard_check(*full)), None)

    def _add_entry(self, full: tuple) -> Any:
        path = self.store.directory / f"{_safe(self.name)}-{self.digest(full)[:32]}{SUFFIX}"
        entry = self._load(path, full)
        if entry is None:
            entry = self._compile(path, full)
        entry.disable_guard_check()  # checked once per call in _accepting instead of twice
        self.entries.append(entry)
        return entry

    def digest(self, full: tuple) -> str:
        """The key of a compilation for these arguments (hex sha256)."""
        return fingerprint(self._func, full, self.name, self.key)

    def _load(self, path: Path, full: tuple) -> Any:
        if not path.is_file():
            return None
        if why := untrusted(path):
            warnings.warn(f"{path}: not loaded ({why}: a compiled function is code); compiling again", stacklevel=4)
            return None
        start = time.perf_counter()
        try:
            with open(path, "rb") as f:
                entry = torch.compiler.load_compiled_function(f)
            accepted = entry.guard_check(*full)
        except Exception as e:  # a corrupt, truncated, foreign or incompatible file: compile again instead
            warnings.warn(f"{path}: not a usable compiled function ({type(e).__name__}: {e}); compiling again",
                          stacklevel=4)  # fmt: skip
            return None
        if not accepted:
            warnings.warn(f"{path}: its guards reject these arguments; compiling again", stacklevel=4)
            return None
        self.loaded += 1
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used: kept by `prune`
        self.store.report(f"reused the compilation saved in {path} (loaded in {time.perf_counter() - start:.1f} s)")
        return entry

    def _compile(self, path: Path, full: tuple) -> Any:
        self.store.report(f"compiling {self.name}; it is saved to {path} for later runs")
        try:
            entry = aot_compile(self._func, full)
        except Exception as e:  # something torch can compile but not ahead of time: compile for this process only
            warnings.warn(f"{self.name}: not compiled ahead of time ({type(e).__name__}: {e}); compiling it for this "
                          "process only", stacklevel=4)  # fmt: skip
            return InProcess(torch.compile(self._func, fullgraph=True))
        self.compiled += 1
        try:
            with atomic_path(path) as tmp:
                entry.save_compiled_function(str(tmp))
        except Exception as e:  # read-only or full disk, an argument torch cannot serialize: still run it here
            warnings.warn(f"{path}: the compiled function was not saved ({type(e).__name__}: {e})", stacklevel=4)
        else:
            prune(path.parent, path.name.rsplit("-", 1)[0])
        return entry


class InProcess:
    """An entry that is plain `torch.compile` (its own guards and recompilations), for a function that could not
    be compiled ahead of time."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def guard_check(self, *args: Any) -> bool:
        return True

    def disable_guard_check(self) -> None:
        """Nothing to disable: torch.compile checks its guards itself."""


def untrusted(path: Path) -> str | None:
    """Why the compiled-function file `path` must not be loaded, or None. Loading one runs its code (it is a
    pickle of bytecode and a compiled graph), so it and its directory must belong to this user and be writable by
    no one else: only lmforge, run by this user, wrote it (POSIX; elsewhere nothing is checked)."""
    if not hasattr(os, "getuid"):
        return None
    for item in (path, path.parent):
        info = item.stat()
        if info.st_uid != os.getuid():
            return f"{item} belongs to another user"
        if info.st_mode & 0o022:
            return f"{item} is writable by other users"
    return None


def prune(directory: Path, name: str, keep: int = KEEP) -> None:
    """Delete all but the `keep` most recently used files of `name` in `directory` (every lmforge or torch upgrade,
    model size or edit of lmforge's source makes a new key; the old files would only accumulate)."""
    files = sorted(directory.glob(f"{name}-*{SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[keep:]:
        old.unlink(missing_ok=True)


def aot_compile(fn: Callable, args: tuple) -> Any:
    """`fn` compiled ahead of time for `args` into one graph: an `AOTCompiledFunction` (guards, bytecode, the
    inductor graph), which `save_compiled_function` writes and `torch.compiler.load_compiled_function` reads."""
    return torch.compile(fn, fullgraph=True).aot_compile((args, {}))


def fingerprint(fn: Callable, args: tuple, name: str = "", key: tuple = ()) -> str:
    """sha256 (hex) of what a compilation of `fn` for `args` depends on: the environment, lmforge's source, `fn`,
    `name` and `key`, and the arguments' structure (no tensor values)."""
    h = hashlib.sha256()
    for part in (_environment(), _lmforge_source_digest(), _function_identity(fn), name, repr(key)):
        h.update(part.encode())
        h.update(b"\0")
    for arg in args:
        h.update(repr(_describe(arg)).encode())
        h.update(b"\0")
    return h.hexdigest()


def _environment() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    return (f"torch {torch.__version__}; python {sys.version}; {platform.machine()} {capability}; "
            f"threads {torch.get_num_threads()}")  # fmt: skip


@functools.cache
def _lmforge_source_digest() -> str:
    """sha256 of every .py file of the lmforge package (paths and contents): the code a graph was traced from."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _function_identity(fn: Callable) -> str:
    """`fn`'s module and qualified name, and its source file's sha256 when it lives outside lmforge."""
    identity = f"{fn.__module__}.{fn.__qualname__}"
    source = inspect.getsourcefile(fn)
    if source and not Path(source).resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        identity += " " + hashlib.sha256(Path(source).read_bytes()).hexdigest()
    return identity


def _describe(arg: Any) -> Any:
    """The structure of one argument: what a compiled graph is specialized to, without values."""
    if isinstance(arg, torch.Tensor):
        return ("tensor", tuple(arg.shape), str(arg.dtype), arg.device.type)
    if isinstance(arg, nn.Module):
        return _module_structure(arg)
    if isinstance(arg, (list, tuple)):
        return tuple(_describe(a) for a in arg)
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    return type(arg).__module__ + "." + type(arg).__qualname__  # an object: its state is checked by the guards


def _module_structure(module: nn.Module) -> tuple:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return (
        type(module).__module__ + "." + type(module).__qualname__,
        repr(getattr(module, "config", None)),
        repr(getattr(module, "runtime", None)),
        tuple((n, type(m).__qualname__) for n, m in module.named_modules()),
        tuple((n, tuple(t.shape), str(t.dtype), t.device.type, t.requires_grad) for n, t in tensors),
    )


def strip_dynamic_marks(obj: Any) -> None:
    """Remove dimension marks from every tensor reachable from `obj` through tuples, lists, dicts and plain
    objects' attributes (not modules, callables or weak references): see the module docstring."""
    _strip(obj, set())


def _strip(obj: Any, seen: set[int]) -> None:
    if id(obj) in seen or isinstance(obj, (nn.Module, type)) or callable(obj) or obj is None:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        for attr in _MARKS:
            if hasattr(obj, attr):
                delattr(obj, attr)
    elif isinstance(obj, (list, tuple, set)):
        for item in obj:
            _strip(item, seen)
    elif isinstance(obj, dict):
        for item in obj.values():
            _strip(item, seen)
    elif hasattr(obj, "__dict__"):
        for item in vars(obj).values():
            _strip(item, seen)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
