"""Each cache's bytes per token, measured from its real tensors after a prefill, equal the textbook formula of the
model's attention kind (MHA, GQA, MQA, MLA; the sliding-window ring: W slots, whatever the length); the paged
cache of an MLA model stores the latent and the rope key (kv_lora_rank + qk_rope_head_dim numbers per token and
layer), not full keys and values, and decodes exactly."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import MLAConfig, ModelConfig
from lmforge.infer.cache_memory import attention_kind, cache_bytes, held_bytes, model_bytes_per_token
from lmforge.infer.kv_cache import KVCache
from lmforge.infer.paged_cache import PagedKVCache
from lmforge.infer.ring_cache import RingKVCache
from lmforge.model.transformer import Transformer

VOCAB, LAYERS, HEADS, HEAD_DIM, N, BATCH = 40, 3, 4, 8, 10, 2
MLA = MLAConfig(kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=12)
KINDS = {  # config fields, and the formula per token with b bytes per number (an independent hand computation)
    "MHA": (dict(), lambda b: 2 * LAYERS * HEADS * HEAD_DIM * b),
    "GQA": (dict(n_kv_heads=2), lambda b: 2 * LAYERS * 2 * HEAD_DIM * b),
    "MQA": (dict(n_kv_heads=1), lambda b: 2 * LAYERS * 1 * HEAD_DIM * b),
    "MLA": (dict(mla=MLA, rope_layout="interleaved"), lambda b: (12 + 4) * LAYERS * b),
}
DTYPES = {torch.float32: 4, torch.bfloat16: 2}


def model_for(dtype: torch.dtype = torch.float32, **fields) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=HEADS * HEAD_DIM, n_layers=LAYERS, n_heads=HEADS, d_ff=48, **fields)
    return Transformer(cfg).eval().to(dtype)


def stored(per_layer: dict[int, list[torch.Tensor]]) -> list[torch.Tensor]:
    """The tensors of the model's layers (layer >= 0; the caches keep position ids under layer -1)."""
    return [t for layer, ts in per_layer.items() if layer >= 0 for t in ts]


def prefill(model: Transformer, cache, n: int = N) -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (BATCH, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids, cache=cache)
    return ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_contiguous_and_paged_bytes_per_token_equal_the_formula(kind, dtype):
    fields, formula = KINDS[kind]
    model, b = model_for(dtype, **fields), DTYPES[dtype]
    assert attention_kind(model.config) == kind
    assert model_bytes_per_token(model.config, b) == formula(b)
    contiguous, paged = KVCache(N), PagedKVCache(n_blocks=8, block_size=4)
    prefill(model, contiguous), prefill(model, paged)
    assert paged.free_blocks == 8 - BATCH * 3  # 10 tokens per row: 3 blocks of 4
    assert sum(t.nbytes for t in stored(contiguous._layers)) == BATCH * N * formula(b)
    assert sum(t.nbytes for t in stored(paged._pools)) == paged.n_blocks * paged.block_size * formula(b)
    assert all(t.dtype == dtype for t in stored(contiguous._layers) + stored(paged._pools))


@pytest.mark.parametrize("layer_types", [None, ("sliding", "full", "sliding")])
def test_the_ring_holds_the_window_on_sliding_layers_whatever_the_length(layer_types):
    window, b = 4, 4
    model = model_for(n_kv_heads=2, sliding_window=window, layer_types=layer_types)
    n_sliding = sum(model.config.layer_type(i) == "sliding" for i in range(LAYERS))
    per_layer = 2 * 2 * HEAD_DIM * b
    sizes = []
    for n in (window, 2 * window, 5 * window):
        cache = RingKVCache(model.config, max_len=n)
        prefill(model, cache, n)
        measured = sum(t.nbytes for ts in cache._rings.values() for t in ts)
        assert measured == BATCH * n_sliding * window * per_layer  # bounded: W slots, not n
        full = stored(cache.full._layers) if cache.full is not None else []
        assert measured + sum(t.nbytes for t in full) == BATCH * cache_bytes(model.config, n, b, ring=True)
        sizes.append(measured)
    assert len(set(sizes)) == 1
    assert cache_bytes(model.config, 5 * window, b) == 5 * window * LAYERS * per_layer  # without the ring


def test_paged_mla_cache_stores_the_latent_and_rope_key_and_decodes_exactly():
    model = model_for(**KINDS["MLA"][0])
    cache = PagedKVCache(n_blocks=12, block_size=4)
    ids = prefill(model, cache, 6)
    steps = torch.randint(1, VOCAB, (BATCH, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = [model(steps[:, t : t + 1], cache=cache) for t in range(5)]
        want = model(torch.cat((ids, steps), 1))[:, 6:]
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-5, rtol=1e-5)
    for layer in range(LAYERS):
        c_kv, k_pe = cache._pools[layer]
        assert c_kv.shape == (12, 4, MLA.kv_lora_rank) and k_pe.shape == (12, 4, MLA.qk_rope_head_dim)
    per_token = sum(t[0, 0].numel() for t in stored(cache._pools)) // LAYERS
    full_kv = 2 * HEADS * (MLA.qk_nope_head_dim + MLA.qk_rope_head_dim)  # what expanded K/V would take
    assert per_token == MLA.kv_lora_rank + MLA.qk_rope_head_dim < full_kv


def test_held_bytes_counts_every_tensor_once():
    a = torch.zeros(10)
    holder = type("Holder", (), {})()
    holder.x, holder.views = a, {"v": [a[2:], a.view(2, 5)]}
    holder.other = (torch.zeros(3, dtype=torch.int64),)
    assert held_bytes(holder) == 10 * 4 + 3 * 8
    cache = KVCache(N)
    prefill(model_for(), cache)
    kv = sum(t.nbytes for t in stored(cache._layers))
    assert held_bytes(cache) == kv + BATCH * N * 8 + BATCH * 8  # plus a position per slot and each row's next
