"""`LLM.beam_search` (beam search through the engine's pool) against transformers' `generate(num_beams=k)`.

Oracle: the same random-weight Llama in transformers and loaded by lmforge; every returned hypothesis (tokens,
score) must match transformers' `sequences` and `sequences_scores`, and its cumulative log-probability the
log-softmax of a plain transformers forward over prompt + tokens. Beside parity: several prompts in one call
(queued, chunked, batched) equal each prompt alone; the beams share blocks (peak use below k separate sequences,
only new tokens fed after the prefill, a repeated prompt found in the prefix cache); the pool is fully free after
every call, also after a failure mid-way; bad parameters raise one-line errors naming the field.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hf_reference import VOCAB, hf_and_lmforge, hf_beam_search
from lmforge.configfile import ConfigError
from lmforge.engine import LLM, SamplingParams
from lmforge.engine.beam_search import BeamSearchParams
from lmforge.infer.decode import NonFiniteLogitsError
from lmforge.infer.sampling import GenerationInputError
from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.pretokenize import GPT2_PATTERN

PROMPT, NEW = 6, 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return hf_and_lmforge("llama", tmp_path_factory.mktemp("llama"))


def byte_tokenizer(eos: str | None = None, eot: str | None = None) -> Tokenizer:
    """Ids 0..VOCAB-1 are single bytes (the model's whole vocabulary); no eos unless given."""
    tokenizer = Tokenizer({i: bytes([i]) for i in range(VOCAB)}, [], GPT2_PATTERN)
    tokenizer.eos_token, tokenizer.eot_token = eos, eot
    return tokenizer


@pytest.fixture(scope="module")
def llm(models):
    return LLM(models[1], byte_tokenizer(), block_size=4)  # 4-token blocks: forks share partly filled blocks


def prompt(seed: int, n: int = PROMPT) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_beams(hf, ids: list[int], params: BeamSearchParams, eos: tuple[int, ...], max_new: int | None = None):
    return hf_beam_search(hf, ids, params.beam_width, max_new or params.max_tokens, params.length_penalty,
                          params.early_stopping, params.num_return_sequences or params.beam_width, eos)  # fmt: skip


def assert_same_beams(got, expected) -> None:
    assert [o.token_ids for o in got.outputs] == [tokens for tokens, _ in expected]
    torch.testing.assert_close([o.score for o in got.outputs], [s for _, s in expected], rtol=1e-4, atol=1e-4)


def assert_pool_free(llm: LLM) -> None:
    blocks = llm.engine.blocks
    assert blocks.free_blocks == blocks.num_blocks and all(b.refs == 0 for b in blocks.blocks)
    assert not llm.engine.has_unfinished() and not llm.engine.scheduler.has_work()


# For prompt(3), greedy decoding gives 65 65 65 31 65 15 ...: the stop ids below end beams at different lengths.
SETTINGS = [  # (beam_width, length_penalty, early_stopping, num_return_sequences, stop ids)
    (2, 1.0, False, 1, (31,)),
    (4, 0.0, True, 2, (31,)),
    (3, 2.0, "never", 3, (31, 15)),
    (4, -1.0, False, 4, (65,)),
    (5, 1.0, False, None, ()),  # every beam returned (vLLM's default); all end at the length limit
]


@pytest.mark.parametrize(("width", "length_penalty", "early_stopping", "returns", "stop"), SETTINGS)
@pytest.mark.parametrize("seed", [3, 4])
def test_beam_search_equals_transformers(models, llm, seed, width, length_penalty, early_stopping, returns, stop):
    hf, _ = models
    params = BeamSearchParams(width, NEW, length_penalty=length_penalty, early_stopping=early_stopping,
                              num_return_sequences=returns, stop_token_ids=stop)  # fmt: skip
    ids = prompt(seed)
    [got] = llm.beam_search([ids], params)
    assert_same_beams(got, hf_beams(hf, ids, params, stop))
    assert got.prompt_token_ids == ids and got.finished
    for o in got.outputs:
        ended = o.token_ids[-1] in stop
        assert o.finish_reason == ("stop" if ended else "length")
        assert o.text == llm.tokenizer.decode(o.token_ids[:-1] if ended else o.token_ids)
        with torch.no_grad():
            logp = hf(torch.tensor([ids + o.token_ids])).logits[0, PROMPT - 1 : -1].log_softmax(-1)
        assert o.cumulative_logprob == pytest.approx(float(logp.gather(1, torch.tensor([o.token_ids]).T).sum()),
                                                     abs=1e-4)  # fmt: skip
    assert_pool_free(llm)


def test_the_settings_reach_eos_at_different_lengths(llm):
    """Hypotheses that stop on an eos and others at the length limit (so the parity above covers both)."""
    [got] = llm.beam_search([prompt(3)], BeamSearchParams(4, NEW, length_penalty=-1.0, stop_token_ids=[65]))
    assert len({len(o.token_ids) for o in got.outputs}) > 1
    [got] = llm.beam_search([prompt(3)], BeamSearchParams(3, NEW, length_penalty=2.0, early_stopping="never",
                                                          stop_token_ids=[31, 15]))  # fmt: skip
    assert {o.finish_reason for o in got.outputs} == {"stop", "length"}


def test_temperature_ranks_by_the_log_probs_of_logits_over_t(models, llm):
    """Oracle: transformers on the same model with its head scaled by 1 / T (exact: T = 0.5)."""
    hf, _ = models
    hot = copy.deepcopy(hf)
    with torch.no_grad():
        hot.lm_head.weight.mul_(2.0)
    params = BeamSearchParams(3, NEW, temperature=0.5, num_return_sequences=3, stop_token_ids=[31])
    [got] = llm.beam_search(prompt(3), params)
    assert_same_beams(got, hf_beams(hot, prompt(3), params, (31,)))


def test_the_tokenizers_eos_and_eot_end_beams_unless_ignore_eos(models):
    hf, model = models
    llm = LLM(model, byte_tokenizer(eos="\x1f", eot="\x0f"), block_size=4)  # ids 31 and 15
    params = BeamSearchParams(3, NEW, num_return_sequences=3)
    [got] = llm.beam_search(prompt(3), params)
    assert_same_beams(got, hf_beams(hf, prompt(3), params, (15, 31)))
    ignoring = BeamSearchParams(3, NEW, ignore_eos=True, num_return_sequences=3, stop_token_ids=[65])
    [got] = llm.beam_search(prompt(3), ignoring)
    assert_same_beams(got, hf_beams(hf, prompt(3), ignoring, (65,)))
    assert_pool_free(llm)


@pytest.fixture
def forwards(monkeypatch):
    """Records each forward of an LLM's runner: blocks in use, tokens fed, copy-on-write copies, rows."""

    def watch(llm: LLM) -> list[dict]:
        seen, run = [], llm.engine.runner.run

        def recording(batch, logits_per_row=None):
            seen.append({"used": llm.engine.blocks.used_blocks, "tokens": batch.tokens, "copies": len(batch.copies),
                         "rows": len(batch.rows)})  # fmt: skip
            return run(batch, logits_per_row)

        monkeypatch.setattr(llm.engine.runner, "run", recording)
        return seen

    return watch


def test_several_prompts_in_one_call_equal_each_prompt_alone(models, llm, forwards):
    """Queued (two searches at a time within max_num_seqs), chunked prefill (16-token budget), batched steps."""
    prompts = [prompt(3), prompt(7, 23), prompt(8, 41), prompt(9, 2), prompt(10, 60)]
    params = BeamSearchParams(3, 10, num_return_sequences=2, stop_token_ids=[31])
    alone = [llm.beam_search([p], params)[0] for p in prompts]
    busy = LLM(models[1], byte_tokenizer(), block_size=4, max_num_seqs=6, max_num_batched_tokens=16)
    seen = forwards(busy)
    together = busy.beam_search(prompts, params)
    for a, b in zip(alone, together, strict=True):
        assert [o.token_ids for o in b.outputs] == [o.token_ids for o in a.outputs]
        # float32 sums: a row's logits may differ in the last bits with the batch it is computed in
        torch.testing.assert_close([o.score for o in b.outputs], [o.score for o in a.outputs], rtol=1e-5, atol=1e-6)
    assert max(f["rows"] for f in seen) == 6  # two searches' beams in one forward, never more
    assert max(f["tokens"] for f in seen) <= 16
    assert_pool_free(busy)


def test_beams_share_blocks_and_no_prefix_is_recomputed(models, forwards):
    k, n, new, bs = 4, 64, 8, 4
    llm = LLM(models[1], byte_tokenizer(), block_size=bs)
    seen = forwards(llm)
    params = BeamSearchParams(k, new, ignore_eos=True)
    [first] = llm.beam_search([prompt(11, n)], params)
    per_beam = -(-(n + new - 1) // bs)  # the blocks of the longest sequence a beam feeds
    peak = max(f["used"] for f in seen)
    assert peak <= n // bs + k * (per_beam - n // bs) < k * per_beam  # the prompt's blocks held once, not k times
    assert [f["tokens"] for f in seen] == [n] + [k] * (new - 1)  # after the prefill, one new token per beam
    assert sum(f["copies"] for f in seen) > 0  # forks of a partly filled block were copied before writing
    assert_pool_free(llm)
    seen.clear()
    [again] = llm.beam_search([prompt(11, n)], params)
    assert seen[0]["tokens"] == bs  # the prompt's blocks were found in the prefix cache: only its last is fed
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in first.outputs]
    assert_pool_free(llm)


def test_a_failure_mid_way_frees_the_pool(models, monkeypatch):
    llm = LLM(models[1], byte_tokenizer(), block_size=4)
    run, calls = llm.engine.runner.run, []

    def failing(batch, logits_per_row=None):
        calls.append(1)
        logits = run(batch, logits_per_row)
        return logits * float("nan") if len(calls) == 4 else logits

    monkeypatch.setattr(llm.engine.runner, "run", failing)
    with pytest.raises(NonFiniteLogitsError, match="NaN"):
        llm.beam_search([prompt(3), prompt(4, 30)], BeamSearchParams(4, NEW, ignore_eos=True))
    assert len(calls) == 4
    assert_pool_free(llm)


def test_outputs_are_capped_by_max_model_len(models):
    hf, model = models
    llm = LLM(model, byte_tokenizer(), block_size=4, max_model_len=40)
    ids = prompt(5, 30)
    params = BeamSearchParams(2, 50, num_return_sequences=2)
    [got] = llm.beam_search([ids], params)
    assert [len(o.token_ids) for o in got.outputs] == [10, 10]
    assert {o.finish_reason for o in got.outputs} == {"length"}
    assert_same_beams(got, hf_beams(hf, ids, params, (), max_new=10))


def test_a_busy_engine_is_refused_and_left_as_it_was(llm):
    llm.engine.add_request("busy", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle"):
        llm.beam_search([prompt(3)], BeamSearchParams(2, 4))
    assert llm.engine.has_unfinished()
    llm.engine.abort("busy")
    assert_pool_free(llm)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"beam_width": 0}, "beam_width"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"temperature": -1.0}, "temperature"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"num_return_sequences": 3}, "num_return_sequences"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_bad_params_name_the_field(fields, name):
    with pytest.raises(ConfigError, match=name) as error:
        BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **fields})
    assert "\n" not in str(error.value)


def test_requests_the_engine_cannot_run_are_refused_before_anything_runs(models, llm):
    model = models[1]
    cases = [
        (LLM(model, byte_tokenizer(), max_num_seqs=2), [prompt(3)], BeamSearchParams(3, 4), "beam_width"),
        (LLM(model, byte_tokenizer(), block_size=4, num_blocks=32), [prompt(3)], BeamSearchParams(4, 100),
         "beam_width"),  # 4 beams of up to 105 tokens: more blocks than the pool has
        (llm, [prompt(3), [1, VOCAB]], BeamSearchParams(2, 4), r"prompts\[1\]"),
        (llm, [prompt(3)], SamplingParams(), "params"),
    ]  # fmt: skip
    for target, prompts, params, name in cases:
        with pytest.raises(GenerationInputError, match=name) as error:
            target.beam_search(prompts, params)
        assert "\n" not in str(error.value)
        assert_pool_free(target)
