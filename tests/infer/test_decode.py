"""The decode loop: `generate_batch` runs several prompts with per-row parameters through one left-padded batch;
the oracle for every row is `generate` of that prompt alone (itself pinned to transformers in test_generate.py).
`DecodeBatch.step` is checked on scripted logits: one event per live row, finished rows leave."""

from __future__ import annotations

import time

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.infer.decode import DecodeBatch, NonFiniteLogitsError, SequenceState, seeded_generator
from lmforge.infer.generate import generate, generate_batch, left_pad
from lmforge.infer.sampling import GenerationInputError, SamplingParams, TokenHistory
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.base import IncrementalDecoder
from lmforge.tokenizer.pretokenize import GPT2_PATTERN

EOS = 256


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer({i: bytes([i]) for i in range(256)}, [], GPT2_PATTERN, {"<|eos|>": EOS})
    t.eos_token = "<|eos|>"
    return t


CONFIGS = {
    "llama": dict(n_kv_heads=2),  # rope, GQA, swiglu
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", attn_bias=True),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    """A small model with peaked random weights (next-token distributions far from uniform, few near-ties)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=48,
                      **CONFIGS[request.param])  # fmt: skip
    net = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return net


PROMPTS = ["the quick brown fox", "hi", [104, 105, 33, 32, 104, 105, 33], "a much longer prompt, to pad the rest"]
PARAMS = [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.9, top_k=40, top_p=0.95, max_tokens=16, ignore_eos=True, seed=3),
    SamplingParams(temperature=1.2, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.5, max_tokens=9, seed=11),
    SamplingParams(temperature=0, presence_penalty=0.7, max_tokens=14, ignore_eos=True),
]


def by_row(events) -> dict[int, list]:
    rows: dict[int, list] = {}
    for i, event in events:
        rows.setdefault(i, []).append(event)
    return rows


def test_each_row_equals_generate_alone(model, tok):
    rows = by_row(generate_batch(model, tok, PROMPTS, PARAMS))
    assert sorted(rows) == [0, 1, 2, 3]
    for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS, strict=True)):
        alone = list(generate(model, tok, prompt, params))
        assert [e.token_id for e in rows[i]] == [e.token_id for e in alone], f"row {i}"
        assert [e.text for e in rows[i]] == [e.text for e in alone]
        assert rows[i][-1].finish_reason == alone[-1].finish_reason
        n_prompt = alone[-1].stats.prompt_tokens  # the last prompt fills the context: its budget is cut to 11
        assert rows[i][-1].stats.generated_tokens == len(alone) == min(params.max_tokens, 48 - n_prompt)
        assert rows[i][-1].stats.prompt_tokens == n_prompt
    assert len(set(map(tuple, ([e.token_id for e in r] for r in rows.values())))) == 4  # four distinct streams


def test_finished_rows_stop_producing_events(model, tok):
    """Rows of different budgets and stop rules end at their own step; the others go on; events come in steps."""
    greedy = dict(temperature=0, ignore_eos=True)
    first = [e.token_id for e in generate(model, tok, "hi", max_tokens=8, **greedy)]
    k = next(i for i in range(1, 6) if first[i] not in first[:i])  # row 1 stops at its token k + 1 (k >= 1)
    params = [
        SamplingParams(max_tokens=1, **greedy),
        SamplingParams(max_tokens=10, stop_token_ids=[first[k]], **greedy),
        SamplingParams(max_tokens=8, **greedy),
    ]
    events = list(generate_batch(model, tok, ["the", "hi", "a longer one"], params))
    n = (1, k + 1, 8)  # tokens per row
    assert [i for i, _ in events] == [i for step in range(8) for i in range(3) if step < n[i]]
    rows = by_row(events)
    assert [e.token_id for e in rows[1]] == first[: k + 1] and rows[1][-1].finish_reason == "stop"
    assert [e.token_id for e in rows[2]] == [e.token_id for e in generate(model, tok, "a longer one", params[2])]
    for i in range(3):
        assert [e.finish_reason is None for e in rows[i]] == [True] * (n[i] - 1) + [False]
        assert all(e.stats is None for e in rows[i][:-1]) and rows[i][-1].stats.generated_tokens == n[i]


def test_one_params_for_all_rows_and_overrides(model, tok):
    """The same seed in every row: the same prompt twice gives the same draws, as generate would."""
    params = SamplingParams(temperature=1.0, seed=5, ignore_eos=True)
    rows = by_row(generate_batch(model, tok, ["xy", "abc", "xy"], params, max_tokens=8))
    ids = [[e.token_id for e in rows[i]] for i in range(3)]
    assert ids[0] == ids[2] == [e.token_id for e in generate(model, tok, "xy", params, max_tokens=8)]
    assert len(ids[1]) == 8


def test_stop_strings_per_row(model, tok):
    greedy = dict(temperature=0, max_tokens=20, ignore_eos=True)
    full = "".join(e.text for e in generate(model, tok, "hello", **greedy))
    stop = full[5:7]
    rows = by_row(generate_batch(model, tok, ["hello", "hello"], [SamplingParams(stop=[stop], **greedy),
                                                                  SamplingParams(**greedy)]))  # fmt: skip
    assert "".join(e.text for e in rows[0]) == full[: full.index(stop)] and rows[0][-1].finish_reason == "stop"
    assert "".join(e.text for e in rows[1]) == full


def test_bad_inputs_are_refused_naming_them(model, tok):
    with pytest.raises(GenerationInputError, match=r"^prompts\[1\]: is empty"):
        generate_batch(model, tok, ["ok", []])
    with pytest.raises(GenerationInputError, match=r"^prompts\[0\]: .*token id 300 at position 1"):
        generate_batch(model, tok, [[1, 300]])
    with pytest.raises(GenerationInputError, match=r"^params: has 1 SamplingParams for 2 prompts"):
        generate_batch(model, tok, ["a", "b"], [SamplingParams()])
    with pytest.raises(GenerationInputError, match=r"^prompts: expected a non-empty list"):
        generate_batch(model, tok, [])
    with pytest.raises(GenerationInputError, match=r"^SamplingParams\.top_p="):
        generate_batch(model, tok, ["a"], top_p=3.0)


def test_left_pad():
    padded, mask = left_pad([[5, 6, 7], [8]])
    assert padded.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left_pad([[1, 2], [3, 4]])[1] is None


# --- DecodeBatch.step on scripted logits ---


def row(tok, slot: int, budget: int, **kw) -> SequenceState:
    params, decoder = SamplingParams(temperature=0, **kw), IncrementalDecoder(tok)
    return SequenceState(slot, [1], params, budget, frozenset({EOS}), decoder, seeded_generator(0, "cpu"))


def peaked(tokens: list[int], vocab: int = 257) -> torch.Tensor:
    logits = torch.zeros(len(tokens), vocab)
    logits[range(len(tokens)), tokens] = 30.0
    return logits


def test_step_gives_one_event_per_live_row_and_drops_finished_rows(tok):
    batch = DecodeBatch([row(tok, 0, 5), row(tok, 1, 5), row(tok, 2, 2)], known=257)
    events = batch.step(peaked([ord("a"), EOS, ord("c")]), time.perf_counter())
    assert [(e.text, e.finish_reason) for e in events] == [("a", None), ("", "stop"), ("c", None)]
    assert [r.slot for r in batch.rows] == [0, 2]
    events = batch.step(peaked([ord("b"), ord("d")]), time.perf_counter())  # the live rows' logits only
    assert [(e.text, e.finish_reason) for e in events] == [("b", None), ("d", "length")]
    assert [r.slot for r in batch.rows] == [0] and batch.rows[0].output == [ord("a"), ord("b")]
    assert events[1].stats.generated_tokens == 2 and events[1].stats.prefill_s > 0


def test_step_history_follows_the_rows_that_stay(tok):
    """After a row leaves, the penalties still count each remaining row's own tokens."""
    rows = [row(tok, 0, 5, repetition_penalty=1e30), row(tok, 1, 5), row(tok, 2, 5, presence_penalty=100.0)]
    batch = DecodeBatch(rows, known=257)
    batch.step(peaked([ord("a"), EOS, ord("c")]), time.perf_counter())
    logits = peaked([ord("a"), ord("c")])
    logits[:, ord("z")] = 20.0  # second best: taken once the best one is penalized
    events = batch.step(logits, time.perf_counter())
    assert [e.token_id for e in events] == [ord("z"), ord("z")]


def test_a_batch_without_penalties_never_counts_tokens(tok, monkeypatch):
    """The (B, V) token history is built only for rows with a penalty (it is per-step work the engine repeats)."""
    built = []
    monkeypatch.setattr(TokenHistory, "of", classmethod(lambda cls, *a: built.append(a) or None))
    batch = DecodeBatch([row(tok, 0, 5), row(tok, 1, 5, top_k=3)], known=257)
    batch.step(peaked([ord("a"), ord("b")]), time.perf_counter())
    assert built == [] and batch._history is None


def test_step_refuses_non_finite_logits_naming_the_row(tok):
    batch = DecodeBatch([row(tok, 0, 5), row(tok, 7, 5)], known=257)
    logits = peaked([1, 2])
    logits[1, 3] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match="at generated token 0 of sequence 7"):
        batch.step(logits, time.perf_counter())
