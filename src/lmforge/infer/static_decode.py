"""A static-shape decode path: the model's own forward over a `StaticKVCache`, one compiled graph per step.

The plain path (`KVCache` + `Transformer.hidden_states`) grows the keys it attends over by one slot per step
and does its bookkeeping in Python every time. That is fine for reading, but at batch 1 on a CPU the per-step
Python work costs as much as the weight reads. Here, as in gpt-fast, the decoder is the same
`Transformer.hidden_states` over a different cache (infer/static_cache.py): fixed shapes, positions as tensors,
attention over all `max_len` slots with the empty ones masked by position, so `torch.compile` traces the
single-token step once and never recompiles. The head runs on the last position only.

Matrix-vector products (infer/matvec.py): a decode step multiplies one row by every weight matrix, pure memory
traffic; the compiled step runs on `matvec_view(model)` (the module tree copied, every parameter shared), whose
`nn.Linear`s and head use the multiply-and-sum form inductor fuses into one pass over the weights; eager runs and
prefill keep `linear`. The model itself is not changed.

Since the modules and the forward are the model's, the fast path computes what the plain path does; only the
attention also sees masked-out empty slots, which add exactly zero weight. Supported: absolute/learned/
sinusoidal/no positions and RoPE (except dynamic NTK, whose frequencies depend on the sequence length), sliding
windows, soft-capping, MLA, MoE; not ALiBi. Batch rows share positions (no padding).

The compiled step goes through `compile_cache.cached_compile`: when the caller made a store active (the CLI's
`--compile` does), the whole compiled step is saved to disk and a later process loads it instead of tracing
and compiling again (seconds instead of a minute); otherwise it is called without dynamo's checks on the module
tree (`infer.step_compile`, ~1 ms a step), and `decoder_for` builds a new decoder for a model cast or moved.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from lmforge.infer import compile_cache
from lmforge.infer.matvec import matvec, matvec_view
from lmforge.infer.static_cache import StaticKVCache
from lmforge.infer.step_compile import check_unchanged, fingerprint
from lmforge.model.cache import CacheFullError

__all__ = ["CacheFullError", "StaticDecoder", "decoder_for", "supports"]


def supports(model: nn.Module) -> bool:
    """Whether `StaticDecoder` can run this model (otherwise use the plain path)."""
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.position == "alibi":
        return False
    return cfg.position != "rope" or cfg.rope_scaling is None or cfg.rope_scaling.kind != "dynamic"


class StaticDecoder:
    """Prefill (eager) and single-token decode steps (compiled when `compile`) over a `StaticKVCache`.

    dec = StaticDecoder(model, max_len=256, compile=True)
    logits = dec.prefill(ids)      # ids (B, T) -> (B, V) fp32 logits of the last position
    logits = dec.step(token)       # token (B, 1) at the next slot -> (B, V)

    The decoder holds the model weakly (a cached decoder must not keep its model alive).
    """

    def __init__(self, model: nn.Module, max_len: int, compile: bool = False) -> None:
        if not supports(model):
            raise ValueError("StaticDecoder does not support this model (ALiBi or dynamic-NTK RoPE)")
        cfg = model.config
        if max_len > cfg.max_seq_len and cfg.position in ("learned",):
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        self._model, self.max_len, self.compiled = weakref.ref(model), max_len, compile
        self._step_model = matvec_view(model) if compile else None
        self.cache = StaticKVCache(max_len, next(model.parameters()).device)
        self.length = 0  # slots filled (host-side bookkeeping only; the graph reads `cache.position`)
        self._token = torch.zeros(1, 1, dtype=torch.long)  # replaced by prefill
        # one graph per step shape; MoE routing is data-dependent (graph breaks allowed there)
        fullgraph = cfg.moe is None
        self._step = (  # kept on disk (a later process loads it) when the caller made a store active, as the CLI does
            compile_cache.cached_compile(
                self._forward, fullgraph=fullgraph, name="decode-step", key=(max_len,), model=model
            )
            if compile
            else self._forward
        )
        self.warm = not compile  # False until the first step has compiled the graph
        self.seen = fingerprint(model)  # the model as compiled for (`infer.step_compile`)

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this StaticDecoder no longer exists")
        return model

    def reset(self) -> None:
        self.cache.reset()
        self.length = 0

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start a new sequence with `ids` (B, T); return the (B, V) fp32 logits of its last token."""
        self.reset()
        t = ids.shape[1]
        if t > self.max_len:
            raise CacheFullError(f"static KV cache holds {self.max_len} tokens; the prompt has {t}")
        logits = self._forward(self.model, ids, self.cache.key_positions[:t])
        self._token = ids.new_zeros(ids.shape[0], 1)  # the step's input: one tensor, so its strides never change
        self.length = t
        self.cache.position.fill_(t)
        return logits

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token (B, 1) at the next slot; return the (B, V) fp32 logits that follow it."""
        if self.length >= self.max_len:
            raise CacheFullError(f"static KV cache holds {self.max_len} tokens; all are used")
        self._token.copy_(token)
        if self.compiled:
            check_unchanged(self.model, self.seen)
        logits = self._step(self._step_model or self.model, self._token, self.cache.position)
        self.warm = True
        self.length += 1
        self.cache.position.add_(1)
        return logits

    def _forward(self, model: nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits of the last of `ids` (B, T) at positions (= slots) `pos` (T,): the model's own forward over the
        static cache, then the head on the last position (as matrix-vector products when compiled)."""
        h = model.hidden_states(ids, position_ids=pos[None].expand(ids.shape), cache=self.cache)
        return model.logits(h[:, -1], matvec).float()


_DECODERS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, bool], StaticDecoder]] = weakref.WeakKeyDictionary()


def decoder_for(model: nn.Module, n_tokens: int, compile: bool = False) -> StaticDecoder:
    """A cached `StaticDecoder` for `model` with room for `n_tokens`, its size rounded up to a power of
    two (at least 64) so that sequences of similar length reuse one compiled graph. The decoder holds
    one sequence: a new `prefill` starts over (one stream per model at a time)."""
    max_len = max(64, 1 << (n_tokens - 1).bit_length())
    if model.config.position == "learned":
        max_len = min(max_len, model.config.max_seq_len)
    per_model = _DECODERS.setdefault(model, {})
    key = (max_len, compile)
    if key not in per_model or per_model[key].seen != fingerprint(model):  # new, or the model cast or moved since
        per_model[key] = StaticDecoder(model, max_len, compile)
    return per_model[key]
