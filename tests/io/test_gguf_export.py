"""GGUF export: lmforge model + tokenizer -> GGUF, read back by lmforge, the `gguf` package and transformers.

The references are independent readers of the written file: `gguf.GGUFReader` (names, types, raw
bytes equal to `gguf.quants.quantize` of the weights) and transformers' GGUF loader (its own
dequantization, q/k un-permutation and config mapping) for both the model and the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lmforge
from lmforge.cli import app
from lmforge.config import ModelConfig
from lmforge.io.gguf_export import GGUFExportError, gguf_tensors, permute_rope_rows, save_gguf
from lmforge.io.gguf_model import unpermute_rope_rows
from lmforge.model.transformer import Transformer
from lmforge.quant.modules import dense_state_dict
from lmforge.tokenizer.bpe import Tokenizer, train_bpe
from lmforge.tokenizer.gguf_vocab import QWEN2_PATTERN
from lmforge.tokenizer.pretokenize import GPT2_PATTERN, LLAMA3_PATTERN, SplitRule

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"
VOCAB = 352  # the model's rows; the tokenizer uses fewer, the rest are written as unused "[PAD{id}]"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ARCH_CONFIGS = {
    "llama": dict(arch="llama"),
    "qwen2": dict(arch="qwen2", attn_bias=True, tie_embeddings=True, rope_theta=1e6),
    # head_dim != d_model / n_heads, as in real Qwen3; 128 because transformers' GGUF loader ignores
    # qwen3.attention.key_length and assumes Qwen3Config's default (llama.cpp and lmforge read it)
    "qwen3": dict(arch="qwen3", qk_norm=True, head_dim=128, norm_eps=1e-6),
}
# Quantization error, as relative RMS error of all weight matrices: F16 rounds to 11 bits (<= 2^-11 / sqrt 3);
# Q8_0 / Q4_0 / Q4_1 keep 8 / 4 / 4 bits per weight with one scale (and Q4_1 a minimum) per 32 Gaussian weights
# (measured 0.54% / 8.6% / Q4_1 below).
WEIGHT_ERROR = {"f32": 0.0, "f16": 3e-4, "q8_0": 0.006, "q4_0": 0.095, "q4_1": 0.095}
# ... which these 2-layer random models amplify 2.4-4.6x (measured) in their logits' relative RMS error
AMPLIFICATION = 6.0


def text(chars: int = 40_000, offset: int = 0) -> str:
    return (DATA / "hamlet_gut.txt").read_text()[offset : offset + chars]


@pytest.fixture(scope="module")
def tokenizers():
    """Byte-level BPE tokenizers with the three pre-tokenizers GGUF names (gpt-2, llama-bpe, qwen2)."""
    out = {}
    for name, pattern in (("gpt-2", None), ("llama-bpe", LLAMA3_PATTERN), ("qwen2", QWEN2_PATTERN)):
        kw = {} if pattern is None else {"pattern": pattern}
        tok = train_bpe([text()], vocab_size=320, special_tokens=SPECIALS, progress=False, workers=1, **kw)
        tok.bos_token, tok.eos_token, tok.chat_template = "<|im_start|>", "<|im_end|>", CHATML
        out[name] = tok
    return out


def random_model(arch: str, seed: int = 0) -> Transformer:
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=256,
        **ARCH_CONFIGS[arch],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # random norms and biases too: a mix-up cannot hide
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() == 1 else 0.08) + (1.0 if "norm" in name else 0.0))
    return model


def prompt(tok) -> torch.Tensor:
    return torch.tensor([tok.encode(text(600, offset=50_000))[:48]])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def relative_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def check_quantization_error(back: Transformer, model: Transformer, qtype: str, ids: torch.Tensor) -> None:
    """`back` (read from a `qtype` file) differs from `model` by no more than `qtype`'s rounding."""
    mine, theirs = dense_state_dict(back), model.state_dict()  # a GGUF file loads quantized: its dequantized weights
    names = [n for n, t in theirs.items() if t.dim() == 2]
    weights = relative_rms(torch.cat([mine[n].ravel() for n in names]), torch.cat([theirs[n].ravel() for n in names]))
    assert weights <= WEIGHT_ERROR[qtype], (qtype, weights)
    assert relative_rms(logits(back, ids), logits(model, ids)) <= AMPLIFICATION * max(weights, 1e-7), qtype


def test_permutation_is_inverted_by_the_loader():
    w = torch.arange(2 * 8 * 3).reshape(16, 3)
    p = permute_rope_rows(w, n_heads=2)
    assert not torch.equal(p, w) and torch.equal(unpermute_rope_rows(p, 2), w)
    # within a head of 8 rows, GGUF row 2i + j holds original row j*4 + i
    assert p[:8, 0].tolist() == [w[r, 0].item() for r in (0, 4, 1, 5, 2, 6, 3, 7)]


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_f32_round_trip_is_exact(tmp_path, arch, tokenizers):
    model, tok = random_model(arch), tokenizers["gpt-2"]
    path = save_gguf(model, tok, tmp_path / "m.gguf", "f32")
    back, tok2 = lmforge.load(path)
    cfg = model.config
    assert back.config.norm_eps == pytest.approx(cfg.norm_eps, rel=1e-7)  # GGUF stores floats as f32
    assert back.config.replace(norm_eps=cfg.norm_eps) == cfg.replace(n_kv_heads=2)
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    ids = prompt(tok)
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=0, atol=1e-5)
    assert tok2.encode(text(5000)) == tok.encode(text(5000))
    assert (tok2.bos_token, tok2.eos_token, tok2.chat_template) == ("<|im_start|>", "<|im_end|>", CHATML)


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0", "q4_1"])
def test_gguf_package_reads_the_file(tmp_path, qtype, tokenizers):
    """Names, ggml types and shapes as llama.cpp writes them, bytes equal to `gguf.quants.quantize`."""
    import gguf

    model, tok = random_model("llama"), tokenizers["llama-bpe"]
    path = save_gguf(model, tok, tmp_path / "m.gguf", qtype)
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3}[qtype]
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.dimension_count"] == 16
    assert fields["tokenizer.ggml.pre"] == "llama-bpe" and fields["tokenizer.ggml.model"] == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"]) == VOCAB and fields["tokenizer.ggml.tokens"][-1] == f"[PAD{VOCAB - 1}]"
    assert fields["tokenizer.ggml.eos_token_id"] == tok.special_tokens["<|im_end|>"]
    want = gguf_tensors(model, qtype)
    assert [t.name for t in reader.tensors] == list(want)
    assert reader.tensors[0].name == "token_embd.weight" and reader.tensors[-1].name == "output.weight"
    for t in reader.tensors:
        weights, gtype = want[t.name]
        assert t.tensor_type.value == gtype.value, t.name
        assert [int(d) for d in reversed(t.shape)] == list(weights.shape), t.name
        if t.name.endswith("norm.weight"):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
        expected = gguf.quants.quantize(weights.numpy(), gguf.GGMLQuantizationType(gtype.value))
        assert np.array_equal(np.asarray(t.data).view(np.uint8).ravel(), expected.view(np.uint8).ravel()), t.name


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_transformers_reads_the_model(tmp_path, arch, qtype, tokenizers):
    """transformers' GGUF loader (its own dequantization and config mapping) gives lmforge's logits."""
    import transformers

    model, tok = random_model(arch), tokenizers["qwen2" if arch.startswith("qwen") else "llama-bpe"]
    save_gguf(model, tok, tmp_path / "m.gguf", qtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ours, _ = lmforge.load(tmp_path / "m.gguf")
    ids = prompt(tok)
    want, got = logits(ref, ids).logits, logits(ours, ids)
    assert (got - want).abs().max().item() <= 1e-4  # the same file read two ways
    check_quantization_error(ours, model, qtype, ids)


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_transformers_reads_the_tokenizer(tmp_path, pre, tokenizers):
    import transformers

    tok = tokenizers[pre]
    save_gguf(random_model("qwen2"), tok, tmp_path / "m.gguf", "q8_0")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    ours = lmforge.load_tokenizer(tmp_path / "m.gguf")
    held_out = text(30_000, offset=60_000)
    cases = [
        held_out,
        "  two  spaces\tand\r\nCRLF 12345 it's ok",
        "émigré 日本語 👍🏽",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    for s in cases:
        ids = tok.encode(s, allowed_special="all")
        assert ours.encode(s, allowed_special="all") == ids
        assert ref.encode(s, add_special_tokens=False) == ids, s[:40]
    messages = [{"role": "user", "content": "Who's there?"}]
    kw = {"add_generation_prompt": True, "tokenize": False}
    assert ours.apply_chat_template(messages, **kw) == ref.apply_chat_template(messages, **kw)


def test_lmforge_save_writes_gguf_by_suffix(tmp_path, tokenizers):
    model = random_model("qwen3")
    lmforge.save(model, tmp_path / "m.gguf", tokenizers["gpt-2"], qtype="q8_0")
    back, _ = lmforge.load(tmp_path / "m.gguf")
    check_quantization_error(back, model, "q8_0", prompt(tokenizers["gpt-2"]))


def test_rows_that_are_not_whole_blocks_fall_back_to_f16(tmp_path, tokenizers):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=48, n_layers=1, n_heads=3, n_kv_heads=1, d_ff=80, max_seq_len=64)
    model = Transformer(cfg).eval()
    types = {name: t.name for name, (_, t) in gguf_tensors(model, "q4_0").items()}
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 80 weights
    assert types["blk.0.ffn_up.weight"] == "F16"  # rows of 48
    save_gguf(model, tokenizers["gpt-2"], tmp_path / "m.gguf", "q4_0")
    back, _ = lmforge.load(tmp_path / "m.gguf")
    assert back.config.d_ff == 80


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(mlp="gelu"), "mlp"),
        (dict(sliding_window=8), "sliding_window"),
        (dict(norm="layernorm"), "norm='layernorm'"),
        (dict(mlp_bias=True), "mlp_bias=True"),
        (dict(position="alibi"), "position='alibi'"),
        (dict(arch="gpt2"), "arch"),
        (dict(attn_bias=True), "biases"),
    ],
)
def test_configs_gguf_cannot_carry_are_errors(tmp_path, tokenizers, overrides, field):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=1, n_heads=4, d_ff=96, max_seq_len=64, **overrides)
    with pytest.raises(GGUFExportError, match=field):
        save_gguf(Transformer(cfg), tokenizers["gpt-2"], tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_bad_arguments_are_errors(tmp_path, tokenizers):
    model, tok = random_model("llama"), tokenizers["gpt-2"]
    with pytest.raises(ValueError, match="unknown qtype 'q5_k'"):
        save_gguf(model, tok, tmp_path / "m.gguf", "q5_k")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        save_gguf(model, None, tmp_path / "m.gguf")
    small = ModelConfig(vocab_size=300, d_model=64, n_layers=1, n_heads=4, d_ff=96)
    with pytest.raises(ValueError, match="only 300 rows"):
        save_gguf(Transformer(small), tok, tmp_path / "m.gguf")
    odd = train_bpe([text(5000)], vocab_size=270, pattern=r"\w+|\W", progress=False, workers=1)
    with pytest.raises(GGUFExportError, match="pre-tokenizer regex"):
        save_gguf(model, odd, tmp_path / "m.gguf")
    merged = Tokenizer(tok.vocab, tok.merges, SplitRule(GPT2_PATTERN, "MergedWithNext"), tok.special_tokens)
    with pytest.raises(GGUFExportError, match="behavior='MergedWithNext'"):
        save_gguf(model, merged, tmp_path / "m.gguf")
    inverted = Tokenizer(tok.vocab, tok.merges, SplitRule(GPT2_PATTERN, invert=True), tok.special_tokens)
    with pytest.raises(GGUFExportError, match="invert=True"):
        save_gguf(model, inverted, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_export_cli(tmp_path, tokenizers):
    runner = CliRunner()
    model = random_model("llama")
    lmforge.save(model, tmp_path / "hf", tokenizers["llama-bpe"])
    out = tmp_path / "m.gguf"
    result = runner.invoke(app, ["export", str(tmp_path / "hf"), str(out), "--qtype", "q4_0"])
    assert result.exit_code == 0, result.output
    assert "q4_0" in result.stdout and out.exists()
    back, tok = lmforge.load(out)
    assert tok.encode(text(2000)) == tokenizers["llama-bpe"].encode(text(2000))
    check_quantization_error(back, model, "q4_0", prompt(tok))
    bad = runner.invoke(app, ["export", str(tmp_path / "hf"), str(out), "--qtype", "q3"])
    assert bad.exit_code == 1 and "--qtype='q3'" in bad.output
    missing = runner.invoke(app, ["export", str(tmp_path / "nope"), str(tmp_path / "x.gguf")])
    assert missing.exit_code == 1 and "nope" in missing.output and not (tmp_path / "x.gguf").exists()


def test_eot_token_and_add_bos_round_trip_and_drive_generation(tmp_path, tokenizers):
    import copy

    from lmforge.infer.generate import encode_prompt, generate

    tok = copy.deepcopy(tokenizers["gpt-2"])
    tok.eos_token, tok.eot_token, tok.add_bos_token = "<|endoftext|>", "<|im_end|>", True
    model = random_model("llama")
    save_gguf(model, tok, tmp_path / "m.gguf", "f32")
    back = lmforge.load_tokenizer(tmp_path / "m.gguf")
    assert (back.eos_token, back.eot_token, back.add_bos_token) == ("<|endoftext|>", "<|im_end|>", True)
    assert encode_prompt(back, "To be")[0] == tok.special_tokens["<|im_start|>"]  # the bos token comes first
    plain = [e.token_id for e in generate(model, back, "To be", temperature=0, max_tokens=8, ignore_eos=True)]
    k = next(i for i, t in enumerate(plain) if back.decode([t]).encode() == back.token_to_bytes(t))
    back.eot_token = back.decode([plain[k]])  # pretend that token ends the turn
    events = list(generate(model, back, "To be", temperature=0, max_tokens=8))
    assert [e.token_id for e in events] == plain[: k + 1] and events[-1].finish_reason == "stop"
