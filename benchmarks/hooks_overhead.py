"""What hook points cost: the plain forward and decode with no hooks, with one hook, and with every point hooked.

A hook point is a `tap` attribute read and compared with None in the module's forward (model/hookpoints.py), so
with no hook installed the forward pays those checks and nothing else. Rows, each the median of `--iters` runs,
the variants interleaved (forward.py's `median_seconds`):

    prefill   logits of a (batch, seq) prompt under torch.no_grad
    decode    `--new` greedy steps over a KV cache (infer.generate's `last_logits`), batch 1

    none      no hook installed (what training, generate, the engine and compiled decoders run)
    one       a single observing hook, on ln_final.hook_normalized (one module has a tap)
    every     an observing hook (returns None) on every point except attn scores / pattern / result, whose
              hooks switch a layer to the explicit softmax or per-head sum (different arithmetic, not overhead)

and the cost of the checks themselves: (points + modules) x the time of one `module.tap is not None`, an upper
bound of what the absent hooks add to a forward, beside a decode step.

    python benchmarks/hooks_overhead.py [--preset llama-20m] [--batch 4] [--seq 256] [--new 32] [--iters 5]
"""

from __future__ import annotations

import argparse
import contextlib
import timeit

import torch

from forward import median_seconds
from lmforge.config import ModelConfig
from lmforge.infer.generate import last_logits
from lmforge.infer.kv_cache import KVCache
from lmforge.interp import hook_names, hooks
from lmforge.model.transformer import Transformer

SWITCHING = ("hook_attn_scores", "hook_pattern", "hook_result")


def variants(model: Transformer) -> dict[str, list]:
    """fwd_hooks per variant."""
    observe = lambda x, name: None
    return {"none": [], "one": [("ln_final.hook_normalized", observe)],
            "every": [(lambda name: not name.endswith(SWITCHING), observe)]}  # fmt: skip


def check_seconds(model: Transformer) -> tuple[int, float]:
    """(number of tap checks bounded above, seconds for that many `tap is not None` checks)."""
    block = model.blocks[0]
    n = len(hook_names(model)) + sum(1 for m in model.modules() if hasattr(m, "tap"))
    per_check = min(timeit.repeat(lambda: block.tap is not None, number=100_000, repeat=5)) / 100_000
    return n, n * per_check


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-20m", help="a ModelConfig preset (random weights)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--new", type=int, default=32, help="decode steps")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(args.preset)).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    prompt = ids[:1, : max(1, args.seq // 4)]

    def prefill() -> None:
        with torch.no_grad():
            model(ids)

    def decode() -> None:
        cache = KVCache(prompt.shape[1] + args.new)
        with torch.no_grad():
            token = last_logits(model, prompt, cache).argmax(-1, keepdim=True)
            for _ in range(args.new - 1):
                token = last_logits(model, token, cache).argmax(-1, keepdim=True)

    def under(fwd_hooks: list, fn):
        def run() -> None:
            with hooks(model, fwd_hooks) if fwd_hooks else contextlib.nullcontext():
                fn()

        return run

    names = list(variants(model))
    print(f"{args.preset}: {model.num_parameters() / 1e6:.1f}M parameters, {len(hook_names(model))} hook points, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'workload':<34}" + "".join(f"{n:>10}" for n in names) + f"{'one/none':>10}{'every/none':>12}")
    decode_step = 0.0
    for label, fn in ((f"prefill {args.batch}x{args.seq} (s)", prefill), (f"decode {args.new} tokens (s)", decode)):
        times = median_seconds([under(h, fn) for h in variants(model).values()], args.iters, args.warmup)
        print(f"{label:<34}" + "".join(f"{t:>10.4f}" for t in times) + f"{times[1] / times[0]:>10.3f}"
              f"{times[2] / times[0]:>12.3f}")  # fmt: skip
        decode_step = times[0] / args.new
    n, seconds = check_seconds(model)
    print(f"absent hooks: at most {n} checks per forward, {seconds * 1e6:.1f} us = "
          f"{100 * seconds / decode_step:.3f}% of a decode step ({decode_step * 1e3:.2f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
