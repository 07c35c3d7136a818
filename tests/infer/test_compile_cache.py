"""Compiled functions kept on disk (infer/compile_cache.py): keyed by what the graph depends on, loaded in a fresh
process without tracing, and never trusted blindly (a corrupt or foreign file is ignored with a warning).

One test really compiles (a tiny function, then a fresh process loads it); the others replace the ahead-of-time
compilation with a stub entry, since they test what lmforge does around it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.infer import compile_cache
from lmforge.infer.compile_cache import PersistentCompiled, cached_compile, fingerprint, persist, strip_dynamic_marks

IMPORT_ROOT = Path(__file__).resolve().parents[__name__.count(".")]  # where this module imports under its own name
RUN_IN_FRESH_PROCESS = "import importlib, sys; sys.path.insert(0, sys.argv[1]); importlib.import_module(sys.argv[2])"


class Stepper:
    """Like the static decoder: a bound method that writes into a store of its own, marked dynamic on its slot
    dimension (as infer/static_cache.py marks its tensors), and reads all of it."""

    def __init__(self, slots: int) -> None:
        self.store = marked(slots, 8)

    def step(self, model: nn.Module, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.store.index_copy_(0, pos, model(x))
        return self.store.sum(0)


def marked(*shape: int) -> torch.Tensor:
    """Zeros with dimension 0 marked dynamic."""
    t = torch.zeros(*shape)
    torch._dynamo.mark_dynamic(t, 0)
    return t


def tiny(seed: int, width: int = 8, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 8)).to(dtype)


def step_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 8, generator=torch.Generator().manual_seed(seed)), torch.tensor([1, 3])


def eager(model: nn.Module, slots: int, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return Stepper(slots).step(model, x, pos)


def fresh_process_run(store: str) -> None:
    """In a new process: load the saved compilation for other weights; print what happened as JSON."""
    from torch._dynamo.utils import counters

    model, (x, pos) = tiny(seed=7), step_inputs(seed=8)
    stepper = Stepper(16)
    with persist(store):
        compiled = cached_compile(stepper.step, fullgraph=True, name="step", key=(16,))
    with torch.no_grad():
        got = compiled(model, x, pos)
        want = eager(model, 16, x, pos)
    stats = counters["stats"]
    result = {"loaded": compiled.loaded, "compiled": compiled.compiled, "max_error": (got - want).abs().max().item()}
    print(json.dumps({**result, "frames_traced": stats["calls_captured"], "graphs": stats["unique_graphs"]}))


def test_a_fresh_process_loads_the_compilation_without_tracing_or_compiling(tmp_path):
    model, (x, pos) = tiny(seed=0), step_inputs(seed=1)
    stepper = Stepper(16)
    lines: list[str] = []
    with persist(tmp_path, report=lines.append):
        compiled = cached_compile(stepper.step, fullgraph=True, name="step", key=(16,))
    assert isinstance(compiled, PersistentCompiled)
    with torch.no_grad():
        torch.testing.assert_close(compiled(model, x, pos), eager(model, 16, x, pos), rtol=0, atol=1e-6)
        stepper.store = marked(16, 8)  # a cache reset and allocated again: its new tensor is marked
        torch.testing.assert_close(compiled(model, x, pos), eager(model, 16, x, pos), rtol=0, atol=1e-6)
    assert (compiled.compiled, compiled.loaded, len(compiled.entries)) == (1, 0, 1)  # the new marks did not recompile
    saved = list(tmp_path.iterdir())
    assert len(saved) == 1 and saved[0].suffix == ".compiled" and "saved to" in lines[0]

    code = RUN_IN_FRESH_PROCESS + ".fresh_process_run(sys.argv[3])"
    args = [str(IMPORT_ROOT), __name__, str(tmp_path)]  # the same module name: the function's identity is in the key
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == 1 and result["compiled"] == 0
    assert result["frames_traced"] == 0 and result["graphs"] == 0  # dynamo traced nothing in the new process
    assert result["max_error"] <= 1e-6  # other weights than the compiling process's: they are inputs, not constants

    with pytest.warns(UserWarning, match="guards reject"):  # a file whose guards refuse the arguments is foreign
        other = PersistentCompiled(Stepper(16).step, compile_cache.Store(tmp_path, print), "step", (16,))
        assert other._load(saved[0], (other._bound, model, torch.randn(3, 8), pos)) is None


class StubEntry:
    """Stands in for torch's AOTCompiledFunction: accepts every argument, returns a constant, writes `payload`."""

    def __init__(self, payload: bytes = b"compiled", fail_after_writing: bool = False) -> None:
        self.payload, self.fail_after_writing = payload, fail_after_writing

    def guard_check(self, *args) -> bool:
        return True

    def fn(self, *args) -> str:
        return "stub result"

    def disable_guard_check(self) -> None:
        pass

    def save_compiled_function(self, path: str) -> None:
        Path(path).write_bytes(self.payload)
        if self.fail_after_writing:
            raise OSError("disk full")


def stub_compiled(monkeypatch, directory: Path, entry: StubEntry) -> PersistentCompiled:
    monkeypatch.setattr(compile_cache, "aot_compile", lambda fn, args: entry)
    with persist(directory):
        return cached_compile(Stepper(4).step, fullgraph=True, name="step", key=(4,))


def call(compiled: PersistentCompiled) -> str:
    return compiled(tiny(0), *step_inputs(0))


def test_the_key_changes_with_the_model_torch_version_and_decoder_size(monkeypatch):
    fn, (x, pos) = Stepper(4).step, step_inputs(0)

    def key(model=None, size=64, name="step"):
        return fingerprint(fn, (model or tiny(0), x, pos), name, (size,))

    assert key() == key(tiny(seed=1))  # weights are graph inputs: another checkpoint of the same shape shares it
    assert key() != key(tiny(0, width=16))  # another architecture (a different model file)
    assert key() != key(tiny(0, dtype=torch.float64))
    assert key() != key(size=128)  # another decoder size
    assert key() != key(name="other")
    assert key() != fingerprint(fn, (tiny(0), torch.randn(3, 8), pos), "step", (64,))  # another batch
    before = key()
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert key() != before


@pytest.mark.parametrize("content", [b"", b"not a pickle at all", b"\x80\x04\x95garbage"])
def test_a_corrupt_file_is_ignored_with_a_warning_and_replaced(monkeypatch, tmp_path, content):
    compiled = stub_compiled(monkeypatch, tmp_path, StubEntry(b"fresh"))
    path = tmp_path / f"step-{compiled.digest((compiled._bound, tiny(0), *step_inputs(0)))[:32]}.compiled"
    path.write_bytes(content)
    with pytest.warns(UserWarning, match="not a usable compiled function"):
        assert call(compiled) == "stub result"
    assert (compiled.loaded, compiled.compiled) == (0, 1)
    assert path.read_bytes() == b"fresh"


def test_a_file_others_could_have_written_is_never_loaded(monkeypatch, tmp_path):
    """A compiled function is code: one that another user could have planted (a group- or world-writable file or
    store directory) is refused with a warning and compiled again, its content never read."""
    compiled = stub_compiled(monkeypatch, tmp_path, StubEntry(b"fresh"))
    path = tmp_path / f"step-{compiled.digest((compiled._bound, tiny(0), *step_inputs(0)))[:32]}.compiled"
    path.write_bytes(b"planted")
    path.chmod(0o666)
    monkeypatch.setattr(torch.compiler, "load_compiled_function", lambda f: pytest.fail("an untrusted file was read"))
    with pytest.warns(UserWarning, match="writable by other users"):
        assert call(compiled) == "stub result"
    assert (compiled.loaded, compiled.compiled) == (0, 1)


def test_a_failed_save_leaves_no_file_and_the_function_still_runs(monkeypatch, tmp_path):
    compiled = stub_compiled(monkeypatch, tmp_path, StubEntry(b"half a fi", fail_after_writing=True))
    with pytest.warns(UserWarning, match="was not saved"):
        assert call(compiled) == "stub result"
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file

    compiled = stub_compiled(monkeypatch, tmp_path, StubEntry(b"whole"))
    assert call(compiled) == "stub result"
    assert [p.read_bytes() for p in tmp_path.iterdir()] == [b"whole"]


def test_the_store_keeps_only_the_most_recently_used_files_per_name(tmp_path):
    for i in range(5):
        (tmp_path / f"step-{i}.compiled").write_bytes(b"")
        os.utime(tmp_path / f"step-{i}.compiled", (i, i))
    (tmp_path / "other-0.compiled").write_bytes(b"")
    compile_cache.prune(tmp_path, "step", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-0.compiled", "step-3.compiled", "step-4.compiled"]


def test_an_unwritable_store_warns_and_the_function_still_runs(monkeypatch, tmp_path):
    (tmp_path / "a file").write_text("")
    compiled = stub_compiled(monkeypatch, tmp_path / "a file", StubEntry())
    with pytest.warns(UserWarning, match="was not saved"):
        assert call(compiled) == "stub result"


def test_a_function_torch_cannot_compile_ahead_of_time_warns_and_runs_compiled_in_process(monkeypatch, tmp_path):
    def refuse(fn, args):
        raise RuntimeError("unsupported guard")

    monkeypatch.setattr(compile_cache, "aot_compile", refuse)
    monkeypatch.setattr(torch, "compile", lambda fn, fullgraph: fn)  # no real compilation in this test
    with persist(tmp_path):
        compiled = cached_compile(Stepper(4).step, fullgraph=True, name="step", key=(4,))
    model, (x, pos) = tiny(0), step_inputs(0)
    with pytest.warns(UserWarning, match="not compiled ahead of time"):
        torch.testing.assert_close(compiled(model, x, pos), eager(model, 4, x, pos), rtol=0, atol=0)
    assert list(tmp_path.iterdir()) == [] and compiled.compiled == 0


def test_without_a_store_or_with_graph_breaks_it_is_plain_torch_compile(tmp_path):
    fn = Stepper(4).step
    assert not isinstance(cached_compile(fn, fullgraph=True), PersistentCompiled)
    with persist(tmp_path):
        assert not isinstance(cached_compile(fn, fullgraph=False), PersistentCompiled)
        assert isinstance(cached_compile(fn, fullgraph=True), PersistentCompiled)
    assert compile_cache._STORE.get() is None


def test_dimension_marks_are_stripped_through_objects_but_not_modules():
    stepper, model, deep, in_dict = Stepper(4), tiny(0), marked(3, 2), marked(5)
    torch._dynamo.mark_dynamic(model[0].weight, 0)
    stepper.extra = [{"t": deep}]
    strip_dynamic_marks((stepper, model, {"a": (in_dict,)}))
    for t in (stepper.store, deep, in_dict):
        assert not any(hasattr(t, attr) for attr in compile_cache._MARKS)
    assert hasattr(model[0].weight, "_dynamo_dynamic_indices")  # a module's tensors are not walked


def test_the_cli_keeps_compilations_in_the_user_cache_unless_turned_off(monkeypatch, tmp_path):
    import lmforge.cli.generate as cli
    import lmforge.infer.generate as gen

    seen = []

    def fake_generate(model, tokenizer, prompt, params, compile):
        store = compile_cache._STORE.get()
        seen.append(store and store.directory)
        if store:
            store.report("reused the compilation saved in X")
        return iter(())

    monkeypatch.setattr(cli, "load_model_for_cli", lambda path, dtype, adapter=None, quantized=False: (None, None))
    monkeypatch.setattr(gen, "generate", fake_generate)
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    args = ["generate", "model.gguf", "--prompt", "Hi", "--compile"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen == [tmp_path / "compiled"]
    assert (
        "--compile: the first step compiles the decoder" in result.stderr and "reused the compilation" in result.stderr
    )

    monkeypatch.setenv("LMFORGE_COMPILE_CACHE", "0")
    assert CliRunner().invoke(app, args).exit_code == 0
    assert CliRunner().invoke(app, [*args[:-1], "--no-compile"]).exit_code == 0
    assert seen[1:] == [None, None]
