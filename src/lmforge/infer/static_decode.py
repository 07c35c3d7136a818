"""A static-shape decode path: preallocated KV cache, positions as tensors, one compiled graph per step.

The plain path (`KVCache` + `Transformer.hidden_states`) grows the keys it attends over by one slot per
step and rebuilds RoPE tables and masks in Python every time. That is fine for reading, but at batch 1
on a CPU the per-step Python work costs as much as the weight reads. Here, as in gpt-fast:

* `StaticKVCache` holds every layer's keys and values in buffers of a fixed `max_len` slots; a step
  writes its token at a position given as a *tensor* (`index_copy_`), and attention always reads all
  `max_len` slots, with a boolean mask hiding the slots not filled yet. Shapes never change, so
  `torch.compile` traces the single-token step once and never recompiles.
* RoPE cos/sin for every slot are computed once (the same arithmetic as `rope_cos_sin`) and gathered
  by position; the mask is one comparison `slot <= position` inside the graph.
* The head runs on the last position only.
* Matrix-vector products. A decode step multiplies one row by every weight matrix: pure memory
  traffic (2 flops per 4 bytes in fp32). On CPU, BLAS's row-by-matrix `linear` streams the weights
  at about half the machine's read bandwidth. Written as a broadcast multiply and a sum,
  `y_o = sum_i x_i W_oi`, inductor fuses it into one vectorized pass over W's rows (accumulating in
  float32) that runs near memory speed (see benchmarks/decode.py). The compiled step uses that form
  for every `nn.Linear` and the head (`matvec`); eager runs and prefill keep `linear`. It runs on a view of
  the model (its module tree copied, every parameter shared), so the model itself is not changed.

Otherwise the model's own modules do the work (each `Attention` calls `cache.update`, reads `inputs.masks`), so
the fast path computes what the plain path does; only the attention sees masked-out empty slots, which
add exactly zero weight. Supported: absolute/learned/sinusoidal/no positions and RoPE (except dynamic
NTK, whose frequencies depend on the sequence length), sliding windows, soft-capping, MLA, MoE; not ALiBi.
Batch rows share positions (no padding).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from lmforge.infer.kv_cache import CacheFullError
from lmforge.infer.matvec import matvec, matvec_view
from lmforge.model.attention import AttentionInputs, build_mask
from lmforge.model.position import rope_cos_sin


def _slots_dim(t: torch.Tensor) -> torch.Tensor:
    """Compile the slot dimension (-2, or 0 of a vector) as symbolic: one graph serves every cache size."""
    torch._dynamo.mark_dynamic(t, t.dim() - 2 if t.dim() > 1 else 0)
    return t


class StaticKVCache:
    """Per-layer tensors of `max_len` slots (sequence on dim -2), written at `self.slots`, read whole."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.slots: torch.Tensor | None = None  # (T,) long: where this forward writes; set by the caller
        self._layers: dict[int, tuple[torch.Tensor, ...]] = {}

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if layer not in self._layers:  # first (eager) prefill allocates; compiled steps only write
            self._layers[layer] = tuple(_slots_dim(t.new_zeros(*t.shape[:-2], self.max_len, t.shape[-1])) for t in new)
        stores = self._layers[layer]
        for store, t in zip(stores, new, strict=True):
            store.index_copy_(store.dim() - 2, self.slots, t)
        return stores

    def reset(self) -> None:
        self._layers.clear()


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
        self.cache = StaticKVCache(max_len)
        device = next(model.parameters()).device
        self.k_slots = _slots_dim(torch.arange(max_len, device=device))
        self.cos = self.sin = None
        if cfg.position == "rope":  # (1, 1, max_len, rot/2): the exact values rope_cos_sin gives per step
            self.cos, self.sin = map(_slots_dim, rope_cos_sin(cfg, self.k_slots[None]))
        self.windows = {}
        for i in range(cfg.n_layers):
            kind = cfg.layer_type(i)
            self.windows[kind] = cfg.sliding_window if kind == "sliding" else None
        self.length = 0  # slots filled (host-side bookkeeping only; the graph reads `position`)
        self._token = torch.zeros(1, 1, dtype=torch.long)  # replaced by prefill
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # the next slot, as a tensor
        # one graph per step shape; MoE routing is data-dependent (graph breaks allowed there)
        fullgraph = cfg.moe is None
        self._step = torch.compile(self._forward, fullgraph=fullgraph) if compile else self._forward
        self.warm = not compile  # False until the first step has compiled the graph

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this StaticDecoder no longer exists")
        return model

    def reset(self) -> None:
        self.cache.reset()
        self.length = 0
        self.position.zero_()

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start a new sequence with `ids` (B, T); return the (B, V) fp32 logits of its last token."""
        self.reset()
        t = ids.shape[1]
        if t > self.max_len:
            raise CacheFullError(f"static KV cache holds {self.max_len} tokens; the prompt has {t}")
        logits = self._forward(self.model, ids, self.k_slots[:t])
        self._token = ids.new_zeros(ids.shape[0], 1)  # the step's input: one tensor, so its strides never change
        self.length = t
        self.position.fill_(t)
        return logits

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token (B, 1) at the next slot; return the (B, V) fp32 logits that follow it."""
        if self.length >= self.max_len:
            raise CacheFullError(f"static KV cache holds {self.max_len} tokens; all are used")
        self._token.copy_(token)
        logits = self._step(self._step_model or self.model, self._token, self.position)
        self.warm = True
        self.length += 1
        self.position.add_(1)
        return logits

    def _forward(self, model: nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits of the last of `ids` (B, T) written at slots `pos` (T,): one traceable function."""
        x = model.embed_tokens(ids, pos[None].expand(ids.shape))
        inputs = AttentionInputs(cache=self.cache)
        if self.cos is not None:
            inputs.cos, inputs.sin = self.cos.index_select(2, pos), self.sin.index_select(2, pos)
        for kind, window in self.windows.items():
            inputs.masks[kind] = build_mask(pos, self.k_slots, None, window)  # (1, 1, T, max_len)
        self.cache.slots = pos
        for block in model.blocks:
            x = block(x, inputs)
        return model.logits(model.norm(x[:, -1]), matvec).float()


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
    if key not in per_model:
        per_model[key] = StaticDecoder(model, max_len, compile)
    return per_model[key]
