"""The engine's compiled decode step: the (B, 1) forward of the decoding rows, one `torch.compile`d graph per batch
bucket.

A decode step feeds every decoding sequence its last token: at batch 1 on a CPU the eager forward's Python (a
few hundred small ops per layer) costs as much as reading the weights. As `infer.static_decode` does for one
stream, the step here is the model's own `hidden_states` over the engine's `BlockTableCache`, compiled: the
cache's `prepare` / `store` are tensor work only (slot indices from the bound block tables, padding to the scratch
block), so the whole step is one graph, run on `matvec_view(model)` (a one-row step's linears as the
multiply-and-sum inductor fuses into one pass over the weights; at B > 1 they stay `linear`), the head on every
row's last position.

Shape buckets, as vLLM and nano-vllm capture one CUDA graph per batch size: the runner pads B to the next power of
two (`bucket`; the padded rows decode token 0 at position 0 through block tables that are all the scratch block, so
they never touch a real block, and their logits are dropped). The batch size is compiled static (one graph per
bucket: at most log2(max rows) + 1 graphs) and the block-table width W symbolic (at least 2 blocks), so a bucket's
graph serves every width: after each bucket's first step a long run compiles nothing more. W is not padded: every
row gathers W * block_size key slots per layer, so a padded width is copied and attended for nothing (at 32 rows of
~300 tokens, the power-of-two width cost 15% of the throughput). The pool's block count is symbolic too, so engines
of one model share the graphs (in one process: the step is not kept on disk by `infer.compile_cache`, whose
`cached_compile` takes no `recompile_limit` and drops symbolic sizes). The graphs are called without dynamo's
checks on the module tree (`infer.step_compile`: ~1 ms a step), so the model must not change while it serves.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.finetune.multi_lora import selector_of
from lmforge.infer.matvec import matvec, matvec_view
from lmforge.infer.paged_cache import BlockTableCache
from lmforge.infer.step_compile import check_unchanged, compile_step, fingerprint

MIN_WIDTH = 2  # blocks: a symbolic size must not be 1 (torch specializes sizes 0 and 1)
RECOMPILE_LIMIT = 64  # graphs of the step (batch buckets x models of different shapes) before compiling fails


def bucket(n: int, least: int = 1) -> int:
    """The bucket of a size `n`: the next power of two, at least `least`."""
    return max(least, 1 << (n - 1).bit_length())


class DecodeStep:
    """`step(ids, positions, tables, starts)` -> (B, V) fp32 logits of one token per row over `cache`, compiled.

    ids, positions: (B, 1); tables (B, W), starts (B,): what `BlockTableCache.bind` takes. B and W should be
    buckets (`bucket`; W >= MIN_WIDTH), or each new size compiles another graph.
    """

    def __init__(self, model: nn.Module, cache: BlockTableCache) -> None:
        self.cache = cache
        self.view = matvec_view(model)
        self.adapters = selector_of(self.view)  # stacked LoRA adapters: the rows' index is an input of the graph
        fullgraph = model.config.moe is None  # MoE routing is data-dependent: graph breaks there
        self._step = compile_step(self._forward, model, fullgraph=fullgraph, recompile_limit=RECOMPILE_LIMIT)
        self._seen = fingerprint(model)

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor, starts: torch.Tensor,
        adapters: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """`adapters` (B,): each row's LoRA adapter, for a model with stacked adapters (`finetune.multi_lora`)."""
        if (adapters is None) != (self.adapters is None):
            raise ValueError("a model with stacked LoRA adapters takes an adapter index per row, others none")
        for t in (ids, positions, tables, starts, *([] if adapters is None else [adapters])):
            torch._dynamo.mark_static(t, 0)  # one graph per batch bucket
        torch._dynamo.mark_dynamic(tables, 1)  # one graph for every block-table width
        check_unchanged(self.view, self._seen)
        self.cache.bind(tables, starts)
        return self._step(self.view, ids, positions, adapters)

    def _forward(
        self, model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, adapters: torch.Tensor | None
    ) -> torch.Tensor:
        if adapters is not None:  # set inside the graph: the layers read the step's input, not a constant
            self.adapters.index = adapters
        h = model.hidden_states(ids, position_ids=positions, cache=self.cache)
        return model.logits(h[:, -1], matvec).float()
