"""Generation: token-for-token parity with transformers' generate, seeding, streaming text, stopping rules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

import lmforge
from lmforge import ModelConfig, Transformer
from lmforge.infer.generate import StopStringBuffer, eos_token_id, generate, generate_text
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer, train_bpe
from lmforge.tokenizer.pretokenize import GPT2_PATTERN

TEXTS = [
    "the quick brown fox jumps over the lazy dog. " * 3,
    "héllo wörld, naïve café déjà vu 😀 " * 3,
    "to be or not to be, that is the question",
]


@pytest.fixture(scope="module")
def tok():
    t = train_bpe(texts=TEXTS, vocab_size=300, special_tokens=["<|endoftext|>"], progress=False)
    t.eos_token = "<|endoftext|>"
    return t


@pytest.fixture(scope="module")
def models(tok, tmp_path_factory):
    """(lmforge Llama with peaked random weights, the same weights loaded by transformers)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=96
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger than the default init, so the next-token distributions are far from uniform
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("llama")
    lmforge.save(model, path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, ref


def ids_of(events) -> list[int]:
    return [e.token_id for e in events]


def hf_generate(ref, prompt: list[int], n: int, **kw) -> list[int]:
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=None, pad_token_id=0, **kw)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_transformers(tok, models, penalty):
    model, ref = models
    prompt = tok.encode("the quick brown fox")
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, repetition_penalty=penalty)
    events = list(generate(model, tok, prompt, params))
    assert ids_of(events) == hf_generate(ref, prompt, 32, do_sample=False, repetition_penalty=penalty)
    assert events[-1].finish_reason == "length" and events[-1].stats.generated_tokens == 32


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.8, top_k=50, top_p=0.9),
        dict(temperature=1.3, top_k=0),
        dict(temperature=0.9, top_k=0, min_p=0.05, repetition_penalty=1.3),
    ],
)
def test_sampling_equals_transformers_with_the_same_seed(tok, models, kw):
    """transformers draws with torch.multinomial from the global generator; ours is a fresh generator
    seeded alike, so the same processed distributions give the same draws (top_k=0 turns off its default 50)."""
    model, ref = models
    prompt = tok.encode("to be or not")
    ours = ids_of(generate(model, tok, prompt, SamplingParams(max_tokens=32, ignore_eos=True, seed=3, **kw)))
    torch.manual_seed(3)
    assert ours == hf_generate(ref, prompt, 32, do_sample=True, **kw)


def test_seeded_sampling_is_reproducible(tok, models):
    model, _ = models
    run = lambda seed: generate_text(model, tok, "héllo", temperature=1.5, max_tokens=24, ignore_eos=True, seed=seed)
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_one_equals_greedy(tok, models):
    model, _ = models
    common = dict(max_tokens=32, ignore_eos=True)
    sampled = ids_of(generate(model, tok, "naïve", temperature=0.7, top_k=1, seed=5, **common))
    assert sampled == ids_of(generate(model, tok, "naïve", temperature=0, **common))


def test_text_prompt_equals_id_prompt_and_stream_equals_decode(tok, models):
    model, _ = models
    events = list(generate(model, tok, "the lazy dog", temperature=0, max_tokens=20, ignore_eos=True))
    assert ids_of(events) == ids_of(generate(model, tok, tok.encode("the lazy dog"), temperature=0, max_tokens=20))
    assert "".join(e.text for e in events) == tok.decode(ids_of(events))


def test_stop_string_on_a_real_model(tok, models):
    """A stop string chosen across a token boundary of the greedy continuation cuts the text right before it."""
    model, _ = models
    common = dict(temperature=0, max_tokens=40, ignore_eos=True)
    ids = ids_of(generate(model, tok, "the quick", **common))
    full = tok.decode(ids)
    ends = [len(tok.decode(ids[: i + 1])) for i in range(len(ids))]
    cut = next(e for e in ends[3:] if 2 <= e < len(full) - 2)  # a boundary inside the text
    stop = full[cut - 2 : cut + 2]
    events = list(generate(model, tok, "the quick", stop=[stop], **common))
    assert "".join(e.text for e in events) == full[: full.index(stop)]
    assert events[-1].finish_reason == "stop"
    assert all(e.stats is None for e in events[:-1])


def test_penalties_equal_a_cacheless_loop(tok, models):
    """Oracle: a full forward per step and the closed forms, counting frequency/presence over generated tokens
    only (OpenAI) and the repetition penalty over prompt and generated tokens (transformers)."""
    model, _ = models
    start = tok.encode("the quick brown fox")
    prompt = start + ids_of(generate(model, tok, start, temperature=0, max_tokens=16, ignore_eos=True))  # repeats
    f, a, r = 1.5, 0.5, 1.2
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            z = model(torch.tensor([ids]))[0, -1]
            seen = torch.tensor(sorted(set(ids)))
            z[seen] = torch.where(z[seen] < 0, z[seen] * r, z[seen] / r)
            for t in set(ids[len(prompt) :]):
                z[t] -= f * ids[len(prompt) :].count(t) + a
            ids.append(int(z.argmax()))
    params = SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, frequency_penalty=f, presence_penalty=a, repetition_penalty=r
    )
    assert ids_of(generate(model, tok, prompt, params)) == ids[len(prompt) :]


def test_eos_token_id_lookup(tok):
    assert eos_token_id(tok) == tok.special_tokens["<|endoftext|>"]
    assert eos_token_id(SimpleNamespace(eos_token=None)) is None


# --- streaming and stopping, with a model that plays back a script of tokens ---


class ScriptedModel(torch.nn.Module):
    """Generates `script`: at step i its logits are 30 on script[i] and 0 elsewhere. Records what it is fed."""

    def __init__(self, script: list[int], vocab_size: int = 259, max_seq_len: int = 128) -> None:
        super().__init__()
        self.script, self.vocab_size, self.fed, self.cache = script, vocab_size, [], None
        self.config = SimpleNamespace(max_seq_len=max_seq_len, vocab_size=vocab_size)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives generate a device

    def hidden_states(self, ids: torch.Tensor, cache) -> torch.Tensor:
        b, t = ids.shape
        if cache is not self.cache:  # a new generation (each one gets a fresh cache): the prompt
            self.cache, self.fed, self.prompt_len, self.length = cache, [], t, 0
        self.fed.append(ids[0].tolist())
        self.length += t
        return torch.full((b, t, 1), float(self.length - self.prompt_len))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(h.shape[0], self.vocab_size)
        out[:, self.script[int(h.flatten()[0])]] = 30.0
        return out


EOS = 256


@pytest.fixture(scope="module")
def byte_tok():
    """Byte tokens 0..255, eos 256, and two tokens that split 😀 (f0 9f | 98 80) with "!" after it."""
    vocab = {i: bytes([i]) for i in range(256)} | {257: b"\xf0\x9f", 258: b"\x98\x80!"}
    t = Tokenizer(vocab, [], GPT2_PATTERN, {"<|eos|>": EOS})
    t.eos_token = "<|eos|>"
    return t


def stream(byte_tok, script, prompt="> ", **kw) -> tuple[list, ScriptedModel]:
    script = list(script.encode()) if isinstance(script, str) else script
    model = ScriptedModel([*script, EOS, EOS])
    kw.setdefault("max_tokens", 100)
    return list(generate(model, byte_tok, prompt, SamplingParams(temperature=0, **kw))), model


def test_ids_past_the_tokenizer_are_never_sampled(byte_tok):
    model = ScriptedModel([ord("a"), 300, ord("b"), EOS], vocab_size=320)  # an embedding padded past 259 ids
    events = list(generate(model, byte_tok, "> ", SamplingParams(temperature=0, max_tokens=5)))
    assert all(e.token_id < byte_tok.vocab_size for e in events) and ids_of(events)[0] == ord("a")


def test_prefill_once_then_one_token_per_step(byte_tok):
    events, model = stream(byte_tok, "abc")
    assert ids_of(events) == [*b"abc", EOS]
    assert model.fed == [list(b"> "), [ord("a")], [ord("b")], [ord("c")]]  # the stop token is never fed


def test_eos_stops_and_is_not_shown(byte_tok):
    events, _ = stream(byte_tok, "hi")
    assert [e.text for e in events] == ["h", "i", ""]
    assert events[-1].finish_reason == "stop" and events[-1].token_id == EOS
    ignored, _ = stream(byte_tok, "hi", ignore_eos=True, max_tokens=4)
    assert [e.text for e in ignored] == ["h", "i", "<|eos|>", "<|eos|>"] and ignored[-1].finish_reason == "length"


def test_stop_token_ids(byte_tok):
    events, _ = stream(byte_tok, "hello", stop_token_ids=[ord("l")])
    assert "".join(e.text for e in events) == "he" and events[-1].finish_reason == "stop"


def test_max_tokens_and_max_seq_len(byte_tok):
    events, _ = stream(byte_tok, "abcdefgh", max_tokens=3)
    assert [e.text for e in events] == ["a", "b", "c"] and events[-1].finish_reason == "length"
    model = ScriptedModel(list(b"abcdefgh"), max_seq_len=6)
    assert generate_text(model, byte_tok, "> ", temperature=0, max_tokens=50) == "abcd"
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, byte_tok, "012345", temperature=0)  # raised on the call, before any step
    with pytest.raises(ValueError, match="empty"):
        generate(model, byte_tok, "", temperature=0)
    with pytest.raises(ValueError, match=r"SamplingParams\.top_p="):
        generate(model, byte_tok, "> ", top_p=2.0)


def test_inference_mode_does_not_leak_to_the_consumer(byte_tok):
    stream_ = generate(ScriptedModel(list(b"abc")), byte_tok, "> ", temperature=0, max_tokens=3)
    for _ in stream_:
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_stop_string_across_tokens_is_held_back_then_cut(byte_tok):
    events, _ = stream(byte_tok, "Hi, STOP now", stop=["STOP"])
    assert [e.text for e in events] == ["H", "i", ",", " ", "", "", "", ""]
    assert events[-1].finish_reason == "stop" and events[-1].token_id == ord("P")


def test_false_start_of_a_stop_string_is_released(byte_tok):
    events, _ = stream(byte_tok, "a STx b STOP", stop=["STOP"])
    assert [e.text for e in events[:5]] == ["a", " ", "", "", "STx"]
    assert "".join(e.text for e in events) == "a STx b "


def test_held_text_is_released_at_the_end(byte_tok):
    assert generate_text(ScriptedModel([*b"abcST", EOS]), byte_tok, "> ", stop=["STOP"], temperature=0) == "abcST"
    events, _ = stream(byte_tok, "abcST", stop=["STOP"], max_tokens=5)
    assert "".join(e.text for e in events) == "abcST" and events[-1].finish_reason == "length"


def test_earliest_of_several_stop_strings_wins(byte_tok):
    events, _ = stream(byte_tok, "xx END yy STOP", stop=["STOP", "yy", "END"])
    assert "".join(e.text for e in events) == "xx "
    assert events[-1].token_id == ord("D")  # stopped as soon as the first stop string completed


def test_multibyte_characters_are_never_split(byte_tok):
    script = [*"héllo wörld ".encode(), 257, 258, *b" ok"]
    events, _ = stream(byte_tok, script)
    pieces = [e.text for e in events]
    assert "".join(pieces) == "héllo wörld 😀! ok"
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[1:3] == ["", "é"]  # é is two byte tokens: nothing, then the whole character
    i = ids_of(events).index(257)
    assert pieces[i : i + 2] == ["", "😀!"]


def test_stop_string_containing_a_multibyte_character(byte_tok):
    events, _ = stream(byte_tok, [*"héllo wörld ".encode(), 257, 258], stop=["!", "😀"])
    assert "".join(e.text for e in events) == "héllo wörld " and events[-1].token_id == 258


def test_stats_on_the_last_event_only(byte_tok):
    events, _ = stream(byte_tok, "abcdef", prompt="0123456789")
    stats = events[-1].stats
    assert all(e.stats is None and e.finish_reason is None for e in events[:-1])
    assert (stats.prompt_tokens, stats.generated_tokens) == (10, 7)
    assert stats.prefill_s > 0 and stats.decode_s > 0
    assert stats.prefill_tokens_per_s == pytest.approx(10 / stats.prefill_s)
    assert stats.decode_tokens_per_s == pytest.approx(6 / stats.decode_s)
    assert stats.warmup_s == 0.0  # the plain path compiles nothing


def test_a_compiling_first_step_is_not_in_the_decode_rate():
    from lmforge.infer.generate import GenerationStats

    stats = GenerationStats(prompt_tokens=4, generated_tokens=10, prefill_s=1.0, decode_s=4.0, warmup_s=30.0)
    assert stats.decode_tokens_per_s == 8 / 4.0  # 10 tokens: the first after prefill, one compiling, 8 decoded
    assert GenerationStats(4, 10, 1.0, 4.0).decode_tokens_per_s == 9 / 4.0


@pytest.mark.parametrize(
    ("stops", "text", "released", "hit"),
    [
        (["abc"], "xxab", "xx", False),
        (["abc"], "xxabd", "xxabd", False),
        (["abc", "b"], "xab", "xa", True),
        (["c", "ab"], "xabc", "x", True),  # both complete in one push: the earlier one wins
        (["aab"], "aaa", "a", False),  # "aa" may still become "aab"
        ([], "anything", "anything", False),
    ],
)
def test_stop_string_buffer(stops, text, released, hit):
    assert StopStringBuffer(stops).push(text) == (released, hit)
