"""lmforge vs transformers: training-step and prefill throughput on the same random Llama.

Both models hold identical weights: a random `LlamaForCausalLM` (sdpa attention, fp32, sized like
lmforge's "llama-20m" preset) is saved with `save_pretrained` and loaded back with `lmforge.load`.
The logits are checked to agree before anything is timed. Each measurement is the median over
`--iters` timed iterations after `--warmup` untimed ones, the two implementations interleaved
(alternating which goes first) so that machine drift hits both alike.

    train step = forward, cross entropy on shifted labels, backward, zero grads (no optimizer)
    prefill    = forward under torch.no_grad (no KV cache on either side)

    python benchmarks/forward.py [--batch 8] [--seq 256] [--iters 5] [--warmup 2] [--no-compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import transformers
from torch import nn
from torch.nn import functional as F

import lmforge

# lmforge's "llama-20m" preset, written out as a transformers config
LLAMA_20M = dict(
    vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip


def make_steps(model: nn.Module, ids: torch.Tensor, hf: bool) -> dict[str, Callable[[], None]]:
    """The two timed workloads for one model; `hf` selects the transformers calling convention."""

    def logits() -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits if hf else model(ids)

    def train() -> None:
        model.train()
        out = logits()
        loss = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)

    def prefill() -> None:
        model.eval()
        with torch.no_grad():
            logits()

    return {"train step (fwd+bwd)": train, "prefill (fwd, no grad)": prefill}


def median_seconds(fns: list[Callable[[], None]], iters: int, warmup: int) -> list[float]:
    """Median wall time of each fn, the fns interleaved and their order alternated every iteration."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + iters):
        order = list(range(len(fns)))
        if i % 2:
            order.reverse()
        for j in order:
            start = time.perf_counter()
            fns[j]()
            if i >= warmup:
                times[j].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=5, help="timed iterations per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (compilation happens here)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    hf_cfg = transformers.LlamaConfig(**LLAMA_20M, attn_implementation="sdpa")
    hf_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        lm_model, _ = lmforge.load(tmp)
    ids = torch.randint(0, hf_cfg.vocab_size, (args.batch, args.seq))

    with torch.no_grad():
        diff = (lm_model(ids) - hf_model(input_ids=ids, use_cache=False).logits).abs().max().item()
    if not diff <= 1e-4:
        raise SystemExit(f"ABORT: lmforge and transformers logits differ by {diff:.3g} (> 1e-4); not timing")

    n_params = lm_model.num_parameters()
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"1-min load average at start: {load:.2f} (a busy machine makes the medians noisy)")
    print(f"model: lmforge preset llama-20m ({n_params / 1e6:.1f}M parameters), fp32, sdpa attention")
    print(f"batch {args.batch} x seq {args.seq}; median of {args.iters} iters after {args.warmup} warmup")
    print(f"logits max |lmforge - transformers| = {diff:.2e}\n")

    modes = [("eager", lm_model, hf_model)]
    if not args.no_compile:
        modes.append(("compile", torch.compile(lm_model), torch.compile(hf_model)))
    tokens = args.batch * args.seq
    header = f"{'workload':<24} {'mode':<8} {'lmforge tok/s':>14} {'transformers tok/s':>19} {'ratio lm/hf':>12}"
    rows = []
    for mode, lm, hf in modes:
        lm_steps, hf_steps = make_steps(lm, ids, hf=False), make_steps(hf, ids, hf=True)
        for name in lm_steps:
            t_lm, t_hf = median_seconds([lm_steps[name], hf_steps[name]], args.iters, args.warmup)
            rows.append(f"{name:<24} {mode:<8} {tokens / t_lm:>14,.0f} {tokens / t_hf:>19,.0f} {t_hf / t_lm:>11.2f}x")
            print(f"  done: {name}, {mode}", flush=True)
    print("\n" + header + "\n" + "-" * len(header) + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
