"""KV cache memory per token: the formulas, per attention kind, and the bytes a cache object really holds.

Per layer and token, with b bytes per number:

    MHA   2 * n_heads * head_dim * b           keys and values of every head
    GQA   2 * n_kv_heads * head_dim * b        heads share n_heads / n_kv_heads key/value heads
    MQA   2 * 1 * head_dim * b                 one key/value head
    MLA   (kv_lora_rank + qk_rope_head_dim) * b    the compressed latent c_kv and the shared rope key k_pe

A model's bytes per token are the sum over its layers. A cache of n tokens holds n of them on a full-attention
layer; a sliding-window ring (`infer.ring_cache.RingKVCache`) holds min(n, W) on a sliding layer, so its memory
stops growing once n reaches the window. (Caches also keep one position id per token and row, 8 bytes, outside
these formulas: `held_bytes` counts everything.)
"""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig

__all__ = ["attention_kind", "cache_bytes", "held_bytes", "layer_bytes_per_token", "model_bytes_per_token"]


def attention_kind(cfg: ModelConfig) -> str:
    """The model's attention kind: MLA, MHA, MQA or GQA, plus "+sliding" when some layers use a sliding window."""
    if cfg.mla is not None:
        kind = "MLA"
    elif cfg.kv_heads == cfg.n_heads:
        kind = "MHA"
    else:
        kind = "MQA" if cfg.kv_heads == 1 else "GQA"
    sliding = any(cfg.layer_type(i) == "sliding" for i in range(cfg.n_layers))
    return kind + ("+sliding" if sliding else "")


def layer_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
    """Bytes one layer's cache holds per token (the formulas of the module docstring)."""
    if cfg.mla is not None:
        return (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) * dtype_bytes
    return 2 * cfg.kv_heads * cfg.dim_head * dtype_bytes


def model_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
    """Bytes per token over every layer, with every token kept (a contiguous or paged cache)."""
    return cfg.n_layers * layer_bytes_per_token(cfg, dtype_bytes)


def cache_bytes(cfg: ModelConfig, n_tokens: int, dtype_bytes: int, ring: bool = False) -> int:
    """Bytes of keys and values for one sequence of `n_tokens`; with `ring`, sliding layers keep only the window."""
    per_layer = layer_bytes_per_token(cfg, dtype_bytes)
    kept = [
        min(n_tokens, cfg.sliding_window) if ring and cfg.layer_type(i) == "sliding" else n_tokens
        for i in range(cfg.n_layers)
    ]
    return per_layer * sum(kept)


def held_bytes(obj: object) -> int:
    """Bytes of every tensor `obj` holds (a cache object: its attributes, recursively through containers and nested
    objects), each storage counted once."""
    storages: dict[int, int] = {}
    _collect(obj, storages, set())
    return sum(storages.values())


def _collect(obj: object, storages: dict[int, int], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    elif isinstance(obj, dict):
        for value in obj.values():
            _collect(value, storages, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _collect(value, storages, seen)
    elif hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            _collect(value, storages, seen)
