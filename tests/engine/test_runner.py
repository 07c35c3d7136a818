"""The model runner against a plain forward over each row's whole sequence (no cache): a mixed batch (decode rows,
prefill chunks, a verification chunk asking for its last K + 1 logits) gives every row's logits in batch order,
while the model computes only the real tokens plus small padding; padding never writes a block of a sequence.
Compiled (`compile=True`): the same logits across batch buckets, one graph per bucket, nothing compiled after
each bucket's first step; the engine's greedy tokens equal the eager engine's."""

from __future__ import annotations

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.engine import LLM, SamplingParams
from lmforge.engine.compiled_step import bucket
from lmforge.engine.runner import ModelRunner, pack
from lmforge.engine.scheduler import ScheduledBatch
from lmforge.engine.sequence import Sequence
from lmforge.tokenizer import train_bpe

BLOCK = 4
VOCAB = 300


@pytest.fixture(scope="module")
def tok():
    return train_bpe(texts=["to be or not to be, that is the question"], vocab_size=VOCAB, progress=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128)
    return Transformer(cfg).eval()


def sequences(lengths: list[int], extra: int = 0) -> list[Sequence]:
    """Sequences of `lengths` random prompt tokens and `extra` more, each with its own blocks for all of them."""
    g = torch.Generator().manual_seed(sum(lengths))
    seqs, block = [], 0
    for n in lengths:
        blocks = -(-(n + extra) // BLOCK)
        seq = Sequence(torch.randint(1, VOCAB, (n + extra,), generator=g).tolist(), n)
        seq.block_table = list(range(block, block + blocks))
        seqs.append(seq)
        block += blocks
    return seqs


def step(runner: ModelRunner, rows: list[tuple[Sequence, int]], counts: list[int]) -> torch.Tensor:
    """One runner step; the rows' computed lengths advance as the engine's block manager would advance them."""
    logits = runner.run(ScheduledBatch(rows), counts)
    for seq, n in rows:
        seq.num_computed += n
    return logits


def plain(model: Transformer, rows: list[tuple[Sequence, int]], counts: list[int]) -> torch.Tensor:
    """The oracle: each row's last counts[b] logits of its chunk from a forward over its whole prefix, no cache."""
    out = []
    with torch.no_grad():
        for (seq, n), k in zip(rows, counts, strict=True):
            end = seq.num_computed + n
            out.append(model(torch.tensor([seq.tokens[:end]]))[0, end - k : end])
    return torch.cat(out)


def untouched(runner: ModelRunner, seqs: list[Sequence]) -> bool:
    """Whether every block no sequence holds is still all zeros (scratch excepted)."""
    held = {b for seq in seqs for b in seq.block_table} | {runner.cache.scratch}
    free = [b for b in range(runner.cache.n_blocks) if b not in held]
    return all(bool((pool[free] == 0).all()) for pools in runner.cache._pools.values() for pool in pools)


@pytest.fixture
def forwards(monkeypatch):
    """The (B, T) shape of every forward the model runs."""
    shapes, hidden = [], Transformer.hidden_states

    def spy(self, ids, *args, **kwargs):
        shapes.append(tuple(ids.shape))
        return hidden(self, ids, *args, **kwargs)

    monkeypatch.setattr(Transformer, "hidden_states", spy)
    return shapes


def test_pack_puts_single_tokens_together_and_longer_rows_by_length_within_the_padding_bound():
    # length-1 rows together; then 8, 7, 5 (padding 4/24 <= 1/4); 2 would make it 10/32: a forward of its own
    assert pack([1, 8, 1, 5, 7, 2, 1]) == ([0, 2, 6], [[1, 3, 4], [5]])
    assert pack([3, 3, 3]) == ([], [[0, 1, 2]]) and pack([1]) == ([0], []) and pack([6]) == ([], [[0]])
    assert pack([8, 2], max_padding=1.0) == ([], [[0, 1]])


def test_pack_lets_short_chunks_ride_the_one_token_forward_within_its_room_shortest_first():
    # 3 rows of length 1 + 2 + 5 + 8 = 18 <= 20; 9 would make 27: it and 30 stay multi-token forwards
    assert pack([1, 8, 1, 5, 9, 2, 1, 30], ride=20) == ([0, 1, 2, 3, 5, 6], [[7], [4]])
    # the bucket the rows of length 1 fill (8 rows -> 8) is room too: 5 single rows take 3 more tokens
    assert pack([1] * 5 + [3], ride=4) == ([0, 1, 2, 3, 4, 5], [])
    assert pack([6, 6], ride=8) == ([1], [[0]]) and pack([12], ride=8) == ([], [[0]])
    assert pack([1, 3], ride=1) == ([0], [[1]])  # an engine of one row: nothing rides (no bucket past 1 compiled)


def test_riding_stays_within_the_buckets_an_engine_of_max_rows_compiles_anyway(model):
    rides = [ModelRunner(model, 8, BLOCK, compile=True, max_rows=r).ride for r in (1, 5, 8, 40, 256)]
    assert rides == [1, 8, 8, 32, 32]
    assert ModelRunner(model, 8, BLOCK, max_rows=8).ride == 0  # eager: no compiled step to ride


def test_a_mixed_batch_gives_each_rows_logits_in_order_and_computes_only_its_real_tokens(model, forwards):
    runner = ModelRunner(model, num_blocks=40, block_size=BLOCK)
    a, b, c, d, e = seqs = sequences([12, 5, 8, 15, 9])
    first = [(a, 9), (b, 3), (d, 4), (e, 6)]  # prefills (chunked: none reaches its end)
    want = plain(model, first, [1, 1, 1, 1])
    torch.testing.assert_close(step(runner, first, [1, 1, 1, 1]), want, atol=1e-5, rtol=1e-5)
    # a and b decode one token, c prefills 8, d continues with 5, e verifies 3 tokens and wants all 3 logits
    mixed, counts = [(a, 1), (c, 8), (b, 1), (e, 3), (d, 5)], [1, 1, 1, 3, 0]
    want = plain(model, mixed, counts)
    forwards.clear()
    got = step(runner, mixed, counts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert sorted(forwards) == [(1, 3), (2, 1), (2, 8)]  # 21 positions (8 + 5 padded to 16); not 5 x 8 = 40
    assert runner.tokens_computed == 9 + 3 + 4 + 6 + 1 + 8 + 1 + 3 + 5
    assert untouched(runner, seqs)


@pytest.mark.slow
def test_compiled_decode_equals_eager_across_buckets_and_compiles_once_per_bucket(model):
    eager, compiled = ModelRunner(model, 60, BLOCK), ModelRunner(model, 60, BLOCK, compile=True)
    assert compiled.decode_step is not None and eager.decode_step is None
    pair = [sequences([3, 7, 10, 14], extra=12) for _ in range(2)]  # the same rows, one copy per runner
    for runner, seqs in zip((eager, compiled), pair, strict=True):
        step(runner, [(s, s.prompt_len) for s in seqs], [1] * 4)  # eager prefill
    counters = torch._dynamo.utils.counters
    graphs = []
    for i, size in enumerate([1, 3, 4, 1, 3, 1, 4, 3, 1, 4, 4, 3]):  # buckets 1 and 4; table widths 2 to 8 blocks
        rows = [[(s, 1) for s in seqs[:size]] for seqs in pair]
        want, got = step(eager, rows[0], [1] * size), step(compiled, rows[1], [1] * size)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
        if i == 2:
            warm = graphs[-1]  # buckets 1 and 4 compiled
    assert bucket(3) == 4 and graphs[-1] == warm  # nine more steps of varied sizes and widths compiled nothing
    assert max(s.num_computed for s in pair[1]) > 4 * BLOCK  # the widths grew past the first buckets
    assert untouched(compiled, pair[1])  # the padded rows of bucket 4 wrote only the scratch block
    for layer, pools in eager.cache._pools.items():  # and both runners stored the same keys and values
        for mine, theirs in zip(pools, compiled.cache._pools[layer], strict=True):
            torch.testing.assert_close(theirs[:-1], mine[:-1], atol=1e-4, rtol=1e-4)  # all but the scratch block


@pytest.mark.slow
def test_short_chunks_ride_the_compiled_step_as_one_token_rows_with_the_logits_of_a_plain_forward(model):
    runner = ModelRunner(model, num_blocks=40, block_size=BLOCK, compile=True, max_rows=32)
    a, b, c, d, e = seqs = sequences([12, 5, 8, 15, 9])
    step(runner, [(a, 9), (b, 3), (d, 4), (e, 6)], [1, 1, 1, 1])  # the eager first forward allocates the pool
    rows_fed = []
    compiled = runner.decode_step
    runner.decode_step = lambda ids, *args: rows_fed.append(len(ids)) or compiled(ids, *args)
    # decodes, a prefill of 8, a chunk of 5 and a verification of 3 wanting all its logits: 18 one-token rows
    mixed, counts = [(a, 1), (c, 8), (b, 1), (e, 3), (d, 5)], [1, 1, 1, 3, 0]
    want = plain(model, mixed, counts)
    torch.testing.assert_close(step(runner, mixed, counts), want, atol=1e-4, rtol=1e-4)
    assert rows_fed == [32]  # one compiled forward: 18 rows, padded to their bucket
    assert untouched(runner, seqs)


@pytest.mark.slow
def test_engine_greedy_tokens_with_the_compiled_step_equal_the_eager_engine(model, tok):
    prompts = [s.tokens for s in sequences([5, 11, 17, 23])]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (6, 6, 6, 12)]  # 4 rows, then 1
    outputs, rode = [], []  # rode: the chunk lengths of each compiled forward
    for compile in (False, True):  # a budget of 8 tokens: prompts in chunks, the short ones riding the decode step
        llm = LLM(model, tok, max_num_seqs=4, max_num_batched_tokens=8)
        engine = llm.engine
        blocks, size = engine.blocks.num_blocks, engine.blocks.block_size
        engine.runner = ModelRunner(model, blocks, size, compile=compile, max_rows=8)
        if compile:
            decode = engine.runner._decode
            engine.runner._decode = lambda rows, counts, d=decode: rode.append([n for _, n in rows]) or d(rows, counts)
        outputs.append([out.outputs[0].token_ids for out in llm.generate(prompts, params)])
        assert engine.blocks.free_blocks == engine.blocks.num_blocks
    assert outputs[1] == outputs[0] and [len(o) for o in outputs[1]] == [6, 6, 6, 12]
    assert any(max(lengths) > 1 for lengths in rode) and all(sum(lengths) <= 8 for lengths in rode)
