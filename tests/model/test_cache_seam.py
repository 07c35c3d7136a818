"""The cache seam: the contiguous (per-row lengths) and paged caches equal the plain no-cache forward of each row
alone on a ragged batch (rows of different lengths, decode steps beside a new row's prefill chunk, a row leaving);
packed rows with document boundaries equal the documents run apart (logits and gradients); the static decoder is
the model's own forward; MLA picks its absorbed form when decoding; runtime options are set at load."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.config import ConfigError, MLAConfig, ModelConfig
from lmforge.infer.kv_cache import CacheFullError, KVCache
from lmforge.infer.paged_cache import PagedKVCache
from lmforge.infer.static_decode import StaticDecoder
from lmforge.model.mla import LatentAttention
from lmforge.model.transformer import Transformer

MLA = MLAConfig(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=12)
CONFIGS = {
    "gqa-rope": dict(n_kv_heads=2),
    "sliding-window": dict(n_kv_heads=1, sliding_window=3, layer_types=("sliding", "full")),
    "mla": dict(mla=MLA, rope_layout="interleaved"),
    "learned": dict(position="learned", attn_bias=True),
    "alibi": dict(position="alibi"),
}
VOCAB = 40


def model_for(name: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32, **CONFIGS[name])
    return Transformer(cfg).eval()


def alone(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """The oracle: logits (T, V) of one sequence, no cache, no padding."""
    return model(torch.tensor([tokens]))[0]


class Ragged:
    """Feeds chunks of each row's tokens through one cache, padding the batch; keeps every real token's logits."""

    PAD = 0

    def __init__(self, model: Transformer, cache) -> None:
        self.model, self.cache = model, cache
        self.tokens: list[list[int]] = []  # per row, everything fed so far
        self.logits: list[list[torch.Tensor]] = []

    def add(self) -> None:
        self.cache.add_rows(1)
        self.tokens.append([])
        self.logits.append([])

    def remove(self, row: int) -> tuple[list[int], torch.Tensor]:
        self.cache.remove_rows([row])
        return self.tokens.pop(row), torch.stack(self.logits.pop(row))

    def feed(self, chunks: list[list[int]], left: list[bool]) -> None:
        """One forward: row r gets `chunks[r]`, padded on the left or the right to the longest chunk."""
        t = max(map(len, chunks))
        ids = torch.full((len(chunks), t), self.PAD)
        mask = torch.zeros(len(chunks), t, dtype=torch.long)
        for r, (chunk, on_left) in enumerate(zip(chunks, left, strict=True)):
            cols = slice(t - len(chunk), t) if on_left else slice(0, len(chunk))
            ids[r, cols], mask[r, cols] = torch.tensor(chunk, dtype=torch.long), 1
        out = self.model(ids, attention_mask=mask, cache=self.cache)
        for r, chunk in enumerate(chunks):
            self.tokens[r] += chunk
            self.logits[r] += list(out[r][mask[r].bool()])


def run_ragged(model: Transformer, cache) -> list[tuple[list[int], torch.Tensor]]:
    """Rows of prompt lengths 5 and 3; then their decode steps beside row 2's 4-token prefill chunk; row 0 leaves;
    then row 1 decodes beside row 2's second chunk; then both decode. Returns (tokens, logits) per finished row."""
    g = torch.Generator().manual_seed(1)

    def toks(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    run = Ragged(model, cache)
    run.add(), run.add()
    run.feed([toks(5), toks(3)], left=[True, True])
    run.add()
    run.feed([toks(1), toks(1), toks(4)], left=[False, True, True])
    done = [run.remove(0)]
    run.feed([toks(1), toks(2)], left=[False, True])
    run.feed([toks(1), toks(1)], left=[True, True])
    return [*done, run.remove(0), run.remove(0)]


@pytest.mark.parametrize("name", CONFIGS)
def test_paged_and_contiguous_caches_equal_each_row_alone_on_a_ragged_batch(name):
    model = model_for(name)
    paged = PagedKVCache(n_blocks=12, block_size=2)
    with torch.no_grad():
        results = {"contiguous": run_ragged(model, KVCache(16)), "paged": run_ragged(model, paged)}
        for kind, rows in results.items():
            assert [len(tokens) for tokens, _ in rows] == [6, 6, 7], kind
            for tokens, logits in rows:
                torch.testing.assert_close(logits, alone(model, tokens), atol=1e-5, rtol=1e-5, msg=kind)
    assert paged.free_blocks == 12 and paged.batch == 0  # every row left: all its blocks are free again


def test_a_leaving_row_frees_its_blocks_and_leaves_the_others_unchanged():
    model = model_for("gqa-rope")
    cache = PagedKVCache(n_blocks=8, block_size=4)
    a, b = [3, 5, 7, 9, 11], [2, 4, 6]
    with torch.no_grad():
        model(torch.tensor([a, [0, 0, *b]]), attention_mask=torch.tensor([[1] * 5, [0, 0, 1, 1, 1]]), cache=cache)
        assert cache.tables == [[0, 1], [2]] and cache.free_blocks == 5
        cache.remove_rows([0])
        assert cache.tables == [[2]] and cache.free_blocks == 7
        step = model(torch.tensor([[8]]), cache=cache)[0, -1]
    torch.testing.assert_close(step, alone(model, [*b, 8])[-1], atol=1e-5, rtol=1e-5)


def test_paged_rows_can_start_on_caller_given_blocks():
    """Prefix sharing as an engine's block manager does it: a new row starts on another row's full blocks."""
    model = model_for("sliding-window")
    cache = PagedKVCache(n_blocks=8, block_size=2)
    prefix, x, y = [5, 6, 7, 8], [9, 10, 11], [12]
    with torch.no_grad():
        model(torch.tensor([prefix + x]), cache=cache)
        shared = cache.tables[0][:2]  # the blocks holding the prefix
        (row,) = cache.add_rows(1, block_tables=[shared], lengths=[len(prefix)])
        assert cache.refs[shared[0]] == 2
        out = model(torch.tensor([[1, 2], [y[0], 0]]), attention_mask=torch.tensor([[1, 1], [1, 0]]), cache=cache)
        cache.remove_rows([0])
        assert cache.refs[shared[0]] == 1 and cache.tables[0][:2] == shared  # still held by the new row
    torch.testing.assert_close(out[row, 0], alone(model, prefix + y)[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], alone(model, prefix + x + [1, 2])[-2:], atol=1e-5, rtol=1e-5)


def test_cache_rows_must_match_the_batch_and_room_is_checked():
    model = model_for("gqa-rope")
    with torch.no_grad():
        cache = KVCache(8)
        model(torch.ones(2, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="holds 2 rows; this forward has 3"):
            model(torch.ones(3, 1, dtype=torch.long), cache=cache)
        paged = PagedKVCache(n_blocks=2, block_size=2)
        with pytest.raises(CacheFullError):
            model(torch.ones(1, 5, dtype=torch.long), cache=paged)
        assert paged.lengths == [0]  # a refused forward stores nothing


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_documents_equal_the_documents_run_apart(name):
    """Logits and parameter gradients of a packed row (position_ids restarting, doc_ids) equal separate runs."""
    model = model_for(name).train()
    docs = [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14]]
    w = torch.randn(sum(map(len, docs)), VOCAB, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[t for d in docs for t in d]])
    positions = torch.tensor([[p for d in docs for p in range(len(d))]])
    doc_ids = torch.tensor([[i for i, d in enumerate(docs) for _ in d]])
    packed = model(ids, position_ids=positions, doc_ids=doc_ids)[0]
    (packed * w).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    apart = torch.cat([alone(model, d) for d in docs])
    (apart * w).sum().backward()
    torch.testing.assert_close(packed, apart, atol=1e-5, rtol=1e-5)
    assert packed_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(packed_grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_static_decoder_runs_the_models_own_forward(monkeypatch):
    """No block loop of its own: every prefill and step is one call of `Transformer.hidden_states`."""
    model = model_for("sliding-window")
    calls = []
    original = Transformer.hidden_states

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("cache"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "hidden_states", counted)
    decoder = StaticDecoder(model, max_len=16)
    x = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    got = [decoder.prefill(x[:, :5])] + [decoder.step(x[:, t : t + 1]) for t in range(5, 9)]
    assert len(calls) == 5 and all(c is decoder.cache for c in calls)
    with torch.no_grad():
        want = original(model, x)
    for i, logits in enumerate(got):
        torch.testing.assert_close(logits, model.logits(want[:, 4 + i]), atol=1e-5, rtol=1e-5)


def test_mla_absorbs_when_decoding_over_a_cache(monkeypatch):
    model = model_for("mla")
    ran = []

    def spy(form: str):
        original = getattr(LatentAttention, form)
        return lambda self, *args: ran.append(form) or original(self, *args)

    for form in ("_absorbed", "_expanded"):
        monkeypatch.setattr(LatentAttention, form, spy(form))
    x = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(x)
        assert set(ran) == {"_expanded"}  # no cache: the expanded form
        ran.clear()
        cache = KVCache(8)
        steps = [model(x[:, :4], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(4, 7)]
        assert set(ran) == {"_absorbed"}  # decoding over the latent cache: absorbed, never re-expanded
        ran.clear()
        model.runtime.mla_absorb = False  # forced
        model(x[:, :2], cache=KVCache(8))
        assert set(ran) == {"_expanded"}
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    ran.clear()
    model.runtime.mla_absorb = None
    model(x[:, :2], cache=KVCache(8))  # gradients on (training through a cache): expanded
    assert set(ran) == {"_expanded"}


def test_load_applies_runtime_overrides(tmp_path):
    model = model_for("gqa-rope")
    lmforge.save(model, tmp_path)
    loaded, _ = lmforge.load(tmp_path, attn_backend="eager", max_seq_len=64)
    assert loaded.runtime.attn_backend == "eager" and loaded.config.max_seq_len == 64
    assert all(block.attn.runtime is loaded.runtime for block in loaded.blocks)  # one object, shared by reference
    with pytest.raises(ConfigError, match="attn_backend"):
        lmforge.load(tmp_path, attn_backend="flash9")
