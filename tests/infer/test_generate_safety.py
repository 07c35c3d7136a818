"""Generation inputs a user controls: every SamplingParams field at extreme values, prompt ids, empty and overlong
prompts, seeds. Each value is either refused with an error naming the field, or works: the logits stay free of NaN
and +inf and the sampled token is a valid id that was not filtered out."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.infer.generate import NonFiniteLogitsError, generate, generate_text
from lmforge.infer.sampling import (
    MIN_TEMPERATURE,
    GenerationInputError,
    SamplingParams,
    SamplingParamsError,
    apply_temperature,
    frequency_presence_penalty,
    next_token,
    process_logits,
    repetition_penalty,
)
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.pretokenize import GPT2_PATTERN
from lmforge.utils.errors import LmforgeError

EXTREMES = [0, 1e-300, 5e-324, 1e300, 1.7e308, -1, -1e-300, float("nan"), float("inf"), float("-inf"),
            2**63, -(2**63), 2**1000, 10**400, True, "1"]  # fmt: skip


def real(v) -> bool:
    """The oracle's notion of a usable number: a finite real (not a bool, not beyond float range)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


ACCEPTS = {  # field -> which values the documented rules accept
    "temperature": lambda v: real(v) and v >= 0,
    "top_p": lambda v: real(v) and 0 <= v <= 1,
    "min_p": lambda v: real(v) and 0 <= v <= 1,
    "repetition_penalty": lambda v: real(v) and v > 0,
    "frequency_penalty": real,
    "presence_penalty": real,
    "top_k": lambda v: integer(v) and v >= 0,
    "max_tokens": lambda v: integer(v) and v >= 1,
    "seed": lambda v: integer(v) and 0 <= v < 2**64,
}


def logits_and_history(vocab: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, vocab) logits with -inf (dropped) entries and large magnitudes, and a history with repeats."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, vocab, generator=g) * 30
    x[0, :5] = float("-inf")
    x[1, ::3], x[1, 1::3] = 3e38, -3e38  # near the edges of float32
    return x, torch.randint(0, vocab, (3, 25), generator=g)


def check_sampling(params: SamplingParams) -> None:
    """The processed logits have no NaN and no +inf; every drawn token is a valid id whose logit is finite."""
    x, history = logits_and_history()
    z = process_logits(x, params, history, history[:, 10:])
    assert not z.isnan().any() and not z.isposinf().any()
    assert z.isfinite().any(-1).all()  # something is left to draw in every row
    for seed in range(3):
        token = next_token(z, params, torch.Generator().manual_seed(seed))
        assert ((token >= 0) & (token < x.shape[-1])).all()
        assert z.gather(-1, token[:, None]).isfinite().all()


def short(value) -> str:
    """A test id: the repr, or the size of an int too long to read."""
    text = repr(value)
    return text if len(text) < 24 else f"int_1e{len(text) - 1}"


@pytest.mark.parametrize("value", EXTREMES, ids=short)
@pytest.mark.parametrize("field", sorted(ACCEPTS))
def test_every_field_at_extreme_values_is_refused_by_name_or_samples_sanely(field, value):
    if not ACCEPTS[field](value):
        with pytest.raises(SamplingParamsError, match=rf"^SamplingParams\.{field}=") as info:
            SamplingParams(**{field: value})
        assert isinstance(info.value, LmforgeError) and "\n" not in str(info.value)
        assert info.value.cli_message.startswith("--" + field.replace("_", "-") + "=")
        return
    params = SamplingParams(**{field: value})
    if field == "temperature" and value > 0:  # with the warpers on, too
        params = SamplingParams(temperature=value, top_k=7, top_p=0.9, min_p=0.05, repetition_penalty=1e30)
    check_sampling(params)


@pytest.mark.parametrize(
    "kw",
    [dict(temperature=1e-300, repetition_penalty=1e30, frequency_penalty=1e300, presence_penalty=-1e300),
     dict(temperature=1e300, repetition_penalty=1e-300, frequency_penalty=-1.7e308, presence_penalty=1.7e308),
     dict(temperature=2**63, top_k=2**63, top_p=1e-300, min_p=1.0, frequency_penalty=-(2**63)),
     dict(temperature=MIN_TEMPERATURE / 10, top_p=0.0, min_p=1e-300, repetition_penalty=5e-324)],
)  # fmt: skip
def test_extreme_combinations_sample_sanely(kw):
    check_sampling(SamplingParams(**kw))


def test_huge_penalties_saturate_instead_of_overflowing():
    """Closed forms: the seen tokens go to float32's finite extremes, the others are untouched."""
    x, seen = torch.tensor([[2.0, 1.0, -1e10, 0.0]]), torch.tensor([[0, 2, 3]])
    low, high = torch.finfo(torch.float32).min, torch.finfo(torch.float32).max
    assert repetition_penalty(x, seen, 1e30).tolist() == [[pytest.approx(2e-30), 1.0, low, 0.0]]  # -1e40 saturates
    tiny = torch.finfo(torch.float32).tiny  # a penalty below float32's smallest normal is taken as that one
    assert repetition_penalty(x, seen, 1e-300).tolist() == [pytest.approx([2 / tiny, 1.0, -1e10 * tiny, 0.0])]
    assert repetition_penalty(x * 1e30, seen, 1e-300)[0, 0].item() == high  # 2e30 / 1.2e-38 saturates
    assert frequency_presence_penalty(x, seen, 1e300, 0.0).tolist() == [[low, 1.0, low, low]]
    assert frequency_presence_penalty(x, seen, -1e300, 0.0).tolist() == [[high, 1.0, high, high]]
    twice = torch.tensor([[0, 0]])  # 2 * 1.7e308 overflows float64 too: inf - 1.7e308 is still inf
    assert frequency_presence_penalty(x, twice, 1.7e308, -1.7e308).tolist() == [[low, 1.0, -1e10, 0.0]]
    dropped = torch.tensor([[float("-inf"), 0.0]])
    assert frequency_presence_penalty(dropped, torch.tensor([[0]]), -1e300, 0.0)[0, 0] == float("-inf")  # stays out


def test_tiny_temperature_scales_as_the_minimum_and_huge_flattens():
    x = torch.tensor([[0.0, 1e-3, -5.0, float("-inf")]])
    assert torch.equal(apply_temperature(x, 1e-300), apply_temperature(x, MIN_TEMPERATURE))
    assert torch.equal(apply_temperature(x, MIN_TEMPERATURE), x / MIN_TEMPERATURE)
    params = SamplingParams(temperature=1e-300)  # differences of 1e-3 are 100 nats apart: always the argmax
    draws = [next_token(process_logits(x, params, x.new_zeros(1, 0, dtype=torch.long)), params,
                        torch.Generator().manual_seed(s)).item() for s in range(20)]  # fmt: skip
    assert draws == [1] * 20
    assert apply_temperature(x, 1e300).tolist() == [[0.0, 0.0, -0.0, float("-inf")]]  # uniform over the kept tokens


def test_seeds_cover_the_generators_range():
    g = torch.Generator()
    for seed in (0, 2**63, 2**64 - 1):
        assert SamplingParams(seed=seed).seed == seed
        g.manual_seed(seed)  # torch takes every seed SamplingParams accepts
    for seed in (2**64, -1, 1.0, True, "7"):
        with pytest.raises(SamplingParamsError, match=r"SamplingParams\.seed="):
            SamplingParams(seed=seed)


@pytest.mark.parametrize(
    ("field", "value"),
    [("stop", None), ("stop", 5), ("stop", [""]), ("stop", ["ok", b"x"]), ("stop_token_ids", 3),
     ("stop_token_ids", [True]), ("stop_token_ids", [2**70, -1]), ("ignore_eos", "yes"), ("ignore_eos", 1)],
)  # fmt: skip
def test_list_and_flag_fields_are_checked(field, value):
    with pytest.raises(SamplingParamsError, match=rf"^SamplingParams\.{field}="):
        SamplingParams(**{field: value})


def test_errors_survive_pickling():
    """A worker process (a fuzz case, a server worker) can send the error back whole."""
    for make in (lambda: SamplingParams(top_p=2), lambda: generate(None, None, [True])):
        with pytest.raises(GenerationInputError) as info:
            make()
        back = pickle.loads(pickle.dumps(info.value))
        assert type(back) is type(info.value) and str(back) == str(info.value)
        assert back.cli_message == info.value.cli_message and back.name == info.value.name


def test_numbers_are_stored_as_floats():
    p = SamplingParams(temperature=2**63, top_p=1, repetition_penalty=2**1000)
    assert (type(p.temperature), type(p.top_p), type(p.repetition_penalty)) == (float, float, float)


# -- prompts, through generate on a real (tiny) model ---------------------------------------------------------------

EOS = 256


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer({i: bytes([i]) for i in range(256)}, [], GPT2_PATTERN, {"<|eos|>": EOS})
    t.eos_token = "<|eos|>"
    return t


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16)
    return Transformer(cfg).eval()


def prompt_error(model, tok, prompt, **kw) -> str:
    """The message of the GenerationInputError that `generate` raises on the call (before any step)."""
    with pytest.raises(GenerationInputError) as info:
        generate(model, tok, prompt, temperature=0, **kw)
    assert info.value.name == "prompt" and "\n" not in str(info.value)
    assert str(info.value).startswith("prompt: ") and info.value.cli_message.startswith("--prompt: ")
    return str(info.value)


@pytest.mark.parametrize("compile", [False, True])  # the --compile path gets the same checks, before compiling
@pytest.mark.parametrize(
    ("prompt", "says"),
    [([3, -1], "token id -1 at position 1, outside the model's vocabulary (0 <= id < vocab_size 257)"),
     ([0, 5, 257], "token id 257 at position 2"),
     ([2**70], f"token id {2**70} at position 0"),
     ([1, True], "item 1 is True: token ids are integers"),
     ([1.0], "item 0 is 1.0"), (["5"], "item 0 is '5'"), ([[1, 2]], "item 0 is [1, 2]"),
     (None, "expected text or a sequence of token ids, got NoneType"), (7, "got int"), (b"ab", "got bytes"),
     ([], "is empty: give at least one token"),
     ("", "is empty: give at least one token (the text encodes to no tokens"),
     (list(range(16)), "has 16 tokens; the model's context (max_seq_len) holds 16"),
     ("x" * 40, "has 40 tokens")],
)  # fmt: skip
def test_bad_prompts_are_refused_naming_the_prompt(model, tok, prompt, says, compile):
    assert says in prompt_error(model, tok, prompt, compile=compile)


def test_ids_the_tokenizer_gives_are_checked_against_the_model(tok):
    small = Transformer(ModelConfig(vocab_size=100, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16))
    assert "the tokenizer gave token id 195 at position 1" in prompt_error(small, tok, "aé")  # é = c3 a9


def test_integer_ids_of_any_kind_are_accepted(model, tok):
    want = generate_text(model, tok, [104, 105], temperature=0, max_tokens=3, ignore_eos=True)
    for ids in (torch.tensor([104, 105]), np.array([104, 105]), (np.int64(104), 105)):
        assert generate_text(model, tok, ids, temperature=0, max_tokens=3, ignore_eos=True) == want


def test_an_empty_text_prompt_starts_from_bos_when_the_tokenizer_adds_it(model):
    t = Tokenizer({i: bytes([i]) for i in range(256)}, [], GPT2_PATTERN, {"<|eos|>": EOS})
    t.bos_token, t.add_bos_token = "<|eos|>", True
    events = list(generate(model, t, "", temperature=0, max_tokens=2, ignore_eos=True))
    want = list(generate(model, t, [EOS], temperature=0, max_tokens=2, ignore_eos=True))
    assert [e.token_id for e in events] == [e.token_id for e in want] and len(events) == 2


def test_the_longest_prompt_leaves_one_token_and_max_tokens_is_cut_to_the_context(model, tok):
    events = list(generate(model, tok, list(range(15)), temperature=0, max_tokens=2**63, ignore_eos=True))
    assert len(events) == 1 and events[-1].finish_reason == "length"
    events = list(generate(model, tok, [1, 2], seed=2**64 - 1, top_k=2**63, max_tokens=10**30, ignore_eos=True))
    assert len(events) == 14 and all(0 <= e.token_id < 257 for e in events)


def test_extreme_sampling_values_through_generate(model, tok):
    kw = dict(temperature=1e-300, repetition_penalty=1e30, frequency_penalty=1e300, presence_penalty=-1e300,
              top_p=1e-300, min_p=1.0, top_k=2**63, seed=0)  # fmt: skip
    events = list(generate(model, tok, "hi", max_tokens=10, ignore_eos=True, **kw))
    assert len(events) == 10 and all(0 <= e.token_id < 257 for e in events)


def test_nan_logits_stop_with_a_clear_error(tok):
    broken = Transformer(ModelConfig(vocab_size=257, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16))
    with torch.no_grad():
        broken.blocks[0].mlp.down_proj.weight.fill_(float("nan"))  # as a corrupt weight file would hold
    with pytest.raises(NonFiniteLogitsError, match="NaN or inf at generated token 0") as info:
        list(generate(broken, tok, "hi", temperature=0, max_tokens=3))
    assert isinstance(info.value, LmforgeError)
