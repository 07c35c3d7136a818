"""Beam search (lmforge.infer.beam) against transformers' `generate(num_beams=k, do_sample=False)`.

Oracle: the same random-weight Llama in transformers and loaded by lmforge; every returned hypothesis (tokens,
length, score) must match transformers' `sequences`, `beam_indices` and `sequences_scores`.
"""

from __future__ import annotations

import pytest
import torch

import lmforge
from hf_reference import VOCAB, hf_and_lmforge, hf_beam_search, hf_model
from lmforge.configfile import ConfigError
from lmforge.infer.beam import BeamParams, beam_generate, beam_search
from lmforge.infer.sampling import GenerationInputError

PROMPT, NEW = 6, 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return hf_and_lmforge("llama", tmp_path_factory.mktemp("llama"))


def prompt(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


def hf_beams(hf, ids: torch.Tensor, params: BeamParams) -> list[tuple[list[int], float]]:
    return hf_beam_search(hf, ids[0].tolist(), params.num_beams, params.max_new_tokens, params.length_penalty,
                          params.early_stopping, params.num_return_sequences, tuple(params.eos_token_ids))  # fmt: skip


def assert_same_beams(hf, model, ids: torch.Tensor, params: BeamParams) -> None:
    expected = hf_beams(hf, ids, params)
    got = beam_generate(model, ids[0].tolist(), params)
    assert [b.tokens for b in got] == [tokens for tokens, _ in expected]
    torch.testing.assert_close([b.score for b in got], [score for _, score in expected], rtol=1e-4, atol=1e-4)


# For prompt(3), greedy decoding gives 65 65 65 31 65 15 ...: the eos ids below end beams at different lengths.
SETTINGS = [  # (num_beams, length_penalty, early_stopping, num_return_sequences, eos ids)
    (2, 1.0, False, 1, (31,)),
    (4, 0.0, True, 2, (31,)),
    (3, 2.0, "never", 3, (31, 15)),
    (4, -1.0, False, 4, (65,)),
    (4, 1.0, True, 3, (15,)),
    (3, 0.5, "never", 2, (15,)),
    (5, 1.0, False, 5, ()),  # no eos: every hypothesis ends at the length limit
    (2, 3.0, False, 2, (65, 31, 15)),
]


@pytest.mark.parametrize(("num_beams", "length_penalty", "early_stopping", "returns", "eos"), SETTINGS)
@pytest.mark.parametrize("seed", [3, 4])
def test_beam_search_equals_transformers(models, seed, num_beams, length_penalty, early_stopping, returns, eos):
    hf, model = models
    params = BeamParams(num_beams, NEW, length_penalty, early_stopping, returns, eos)
    ids = prompt(seed)
    assert_same_beams(hf, model, ids, params)


@pytest.mark.parametrize("arch", ["gpt2", "mistral", "deepseek_v3"])  # learned positions, sliding window, MLA
def test_beam_search_equals_transformers_on_other_families(arch, tmp_path):
    hf = hf_model(arch)
    hf.save_pretrained(tmp_path)
    model, ids = lmforge.load(tmp_path)[0], prompt(5)
    greedy = hf.generate(ids, do_sample=False, max_new_tokens=4, pad_token_id=0, eos_token_id=None)[0, PROMPT:]
    params = BeamParams(3, NEW, 1.0, False, 2, (int(greedy[2]),))  # an eos the beams meet
    assert_same_beams(hf, model, ids, params)


def test_the_settings_exercise_eos_and_the_stopping_rules(models):
    """Hypotheses of different lengths and early stops (so the parity above covers the eos and stopping paths)."""
    _, model = models
    ids = prompt(3)[0].tolist()
    lengths = {len(b.tokens) for b in beam_generate(model, ids, BeamParams(4, NEW, -1.0, False, 4, (65,)))}
    assert len(lengths) > 1
    stops = [beam_generate(model, ids, BeamParams(4, NEW, 1.0, es, 4, (31,))) for es in (True, False, "never")]
    assert stops[0] != stops[2]


def test_beam_generate_checks_the_prompt_and_keeps_to_the_context(models):
    _, model = models
    with pytest.raises(GenerationInputError, match="prompt"):
        beam_generate(model, [VOCAB], BeamParams(num_beams=2))
    room = model.config.max_seq_len - 120
    beams = beam_generate(model, [1] * 120, BeamParams(num_beams=2, max_new_tokens=room + 5, num_return_sequences=2))
    assert [len(b.tokens) for b in beams] == [room, room]  # no eos: every hypothesis fills the context


def test_beam_search_over_a_hand_made_step():
    """Two tokens, fixed log-probs: the best 2-token sequence is not the greedy one (0 then 1: 0.6 * 0.5 = 0.3;
    1 then 1: 0.4 * 0.9 = 0.36), and with length_penalty 0 the score is the sum of log-probs."""
    table = {0: [0.5, 0.5], 1: [0.1, 0.9]}

    def step(sequences: torch.Tensor, parents: torch.Tensor | None) -> torch.Tensor:
        rows = [[0.6, 0.4] if s.shape[0] == 1 else table[int(s[-1])] for s in sequences]
        return torch.tensor(rows).log()

    best = beam_search(step, [7], BeamParams(num_beams=2, max_new_tokens=2, length_penalty=0.0))
    assert best[0].tokens == [1, 1]
    assert best[0].score == pytest.approx(float(torch.tensor(0.36).log()), abs=1e-6)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"num_beams": 0}, "num_beams"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"eos_token_ids": (-1,)}, "eos_token_ids"),
    ],
)
def test_beam_params_refuse_bad_values(fields, name):
    with pytest.raises(ConfigError, match=name):
        BeamParams(**fields)
