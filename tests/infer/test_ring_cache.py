"""The sliding-window ring cache equals the plain no-cache forward and the contiguous KVCache on Mistral-style (all
sliding), Gemma-2-style (alternating sliding/full) and sliding-MLA tiny random models: prefills longer than the
window, many decode steps past it, ragged batches (rows of different lengths, a row joining with a chunk that wraps
the ring, a row leaving); its allocated bytes stop growing once the window is full, and a failed forward stores
nothing."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import MLAConfig, ModelConfig
from lmforge.infer.cache_memory import cache_bytes, held_bytes
from lmforge.infer.kv_cache import KVCache
from lmforge.infer.ring_cache import RingKVCache
from lmforge.model.cache import CacheFullError
from lmforge.model.transformer import Transformer

WINDOW, VOCAB = 4, 40
MLA = MLAConfig(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=12)
CONFIGS = {
    "mistral": dict(n_kv_heads=2, sliding_window=WINDOW),  # every layer sliding
    "gemma2": dict(  # alternating local/global layers, softcaps, post-norms
        n_layers=4,
        n_kv_heads=1,
        sliding_window=WINDOW,
        layer_types=("sliding", "full", "sliding", "full"),
        attn_softcap=50.0,
        final_softcap=30.0,
        post_norms=True,
        norm_unit_offset=True,
        embed_scale=True,
    ),
    "mla-sliding": dict(mla=MLA, rope_layout="interleaved", sliding_window=WINDOW),
}


def model_for(name: str) -> Transformer:
    torch.manual_seed(0)
    fields = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64) | CONFIGS[name]
    return Transformer(ModelConfig(**fields)).eval()


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def ring_bytes(cache: RingKVCache) -> int:
    """Bytes of the stored keys/values: the ring buffers and the full layers' storage (not position ids)."""
    full = [] if cache.full is None else [t for layer, ts in cache.full._layers.items() if layer >= 0 for t in ts]
    return sum(t.nbytes for ts in cache._rings.values() for t in ts) + sum(t.nbytes for t in full)


def ring_state(cache: RingKVCache) -> list[torch.Tensor]:
    return [cache.ring_pos, *(t for ts in cache._rings.values() for t in ts)]


def decode(model: Transformer, cache, x: torch.Tensor, prefill: int) -> tuple[torch.Tensor, list[int]]:
    """Prefill x[:, :prefill], then feed the rest one token at a time; the logits (B, T, V) and the cache's
    held bytes after each step."""
    out, held = [model(x[:, :prefill], cache=cache)], []
    for t in range(prefill, x.shape[1]):
        out.append(model(x[:, t : t + 1], cache=cache))
        held.append(held_bytes(cache))
    return torch.cat(out, 1), held


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_past_the_window_then_decoding_equals_no_cache_and_kvcache(name):
    model, n, prefill = model_for(name), 24, 9  # prefill > window, then 15 steps past it
    x = torch.tensor([tokens(n, 1), tokens(n, 2)])
    with torch.no_grad():
        plain = model(x)
        contiguous, _ = decode(model, KVCache(n), x, prefill)
        ring = RingKVCache(model.config, max_len=n)
        got, held = decode(model, ring, x, prefill)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, contiguous, atol=1e-5, rtol=1e-5)
    assert len(set(held)) == 1  # nothing grows once the window is full
    assert ring_bytes(ring) == 2 * cache_bytes(model.config, n, 4, ring=True)  # W slots on sliding layers
    for layer, buffers in ring._rings.items():
        assert model.config.layer_type(layer) == "sliding"
        assert all(buf.shape[0] == 2 and buf.shape[-2] == WINDOW for buf in buffers)


def test_an_all_sliding_model_decodes_past_max_len_in_constant_memory():
    model = model_for("mistral")
    ring = RingKVCache(model.config)  # no full layers: no max_len, no bound on the length
    x = torch.tensor([tokens(40, 3)])
    with torch.no_grad():
        got, held = decode(model, ring, x, 2)
        plain = model(x)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
    assert held[0] == held[-1] and ring.lengths == [40] and ring.capacity(0) > 10**9
    assert sorted(ring.ring_pos[0].tolist()) == [36, 37, 38, 39]  # the last W positions, at p mod W
    assert ring.ring_pos[0, 39 % WINDOW] == 39


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_ragged_rows_equal_each_row_alone(name):
    """Left-padded rows of lengths 7 and 3; a row joins with a 6-token chunk (wrapping the ring) while the others
    decode; row 0 leaves; then a right-padded chunk beside a decode step; then plain decoding."""
    model = model_for(name)
    cache = RingKVCache(model.config, max_len=32)
    seqs: list[list[int]] = []
    logits: list[list[torch.Tensor]] = []
    seed = iter(range(100, 200))

    def feed(chunks: list[list[int]], left: bool) -> None:
        t = max(map(len, chunks))
        ids, mask = torch.zeros(len(chunks), t, dtype=torch.long), torch.zeros(len(chunks), t, dtype=torch.long)
        for r, chunk in enumerate(chunks):
            cols = slice(t - len(chunk), t) if left else slice(0, len(chunk))
            ids[r, cols], mask[r, cols] = torch.tensor(chunk), 1
            seqs[r] += chunk
        out = model(ids, attention_mask=mask, cache=cache)
        for r in range(len(chunks)):
            logits[r] += list(out[r][mask[r].bool()])

    def join() -> None:
        cache.add_rows(1)
        seqs.append([]), logits.append([])

    def check(row: int) -> None:
        torch.testing.assert_close(torch.stack(logits[row]), model(torch.tensor([seqs[row]]))[0], atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        join(), join()
        feed([tokens(7, next(seed)), tokens(3, next(seed))], left=True)
        join()
        feed([tokens(1, next(seed)), tokens(1, next(seed)), tokens(6, next(seed))], left=True)
        check(0)
        cache.remove_rows([0])
        seqs.pop(0), logits.pop(0)
        feed([tokens(1, next(seed)), tokens(3, next(seed))], left=False)
        for _ in range(5):
            feed([tokens(1, next(seed)), tokens(1, next(seed))], left=True)
        check(0), check(1)
    assert cache.lengths == [len(s) for s in seqs] == [10, 14]


def test_a_failed_forward_stores_nothing():
    model = model_for("gemma2")
    x = torch.tensor([tokens(12, 4)])
    with torch.no_grad():
        cache = RingKVCache(model.config, max_len=12)
        model(x[:, :6], cache=cache)
        ring_before = [t.clone() for t in ring_state(cache)]
        with pytest.raises(IndexError):  # the embedding lookup fails after the cache made room
            model(torch.tensor([[VOCAB + 5, 1, 2]]), cache=cache)
        assert cache.lengths == [6]
        assert all(torch.equal(a, b) for a, b in zip(ring_before, ring_state(cache), strict=True))
        got = torch.cat([model(x[:, 6:9], cache=cache), model(x[:, 9:], cache=cache)], 1)
        torch.testing.assert_close(got, model(x)[:, 6:], atol=1e-5, rtol=1e-5)
        with pytest.raises(CacheFullError):  # full layers hold max_len tokens
            model(x[:, :1], cache=cache)


def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="sliding-window layers"):
        RingKVCache(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=48))
    with pytest.raises(ValueError, match="max_len"):
        RingKVCache(model_for("gemma2").config)
    with pytest.raises(ValueError, match="ALiBi"):
        RingKVCache(
            ModelConfig(
                vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=48, position="alibi", sliding_window=WINDOW
            )
        )
