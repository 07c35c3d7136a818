"""GGUF model files into lmforge: llama.cpp's metadata keys and tensor names onto `ModelConfig`
and `Transformer` parameters.

Metadata (`{arch}` is `general.architecture`):
    {arch}.embedding_length -> d_model        {arch}.block_count -> n_layers
    {arch}.feed_forward_length -> d_ff        {arch}.context_length -> max_seq_len
    {arch}.attention.head_count(_kv) -> n_heads, n_kv_heads
    {arch}.attention.key_length -> head_dim   {arch}.rope.dimension_count -> rotary dim
    {arch}.attention.layer_norm_rms_epsilon -> norm_eps     {arch}.rope.freq_base -> rope_theta
    {arch}.rope.scaling.{type,factor,original_context_length} -> rope_scaling (linear, yarn)

Tensors: token_embd, output_norm, output (absent: tied), and per block N `blk.N.` attn_norm,
attn_{q,k,v,output} (+ .bias), attn_{q,k}_norm, ffn_norm, ffn_{gate,up,down}. GGUF stores a matrix
as ggml dims [in, out], i.e. PyTorch's (out, in) row-major bytes, so no transpose is needed.

llama.cpp's converter permutes the rows of q and k for the `llama` architecture so that its RoPE,
which rotates adjacent pairs (2i, 2i+1), reproduces Hugging Face's rotation of halves (i, i + d/2):
within each head, row 2i + j of the GGUF tensor is row j·d/2 + i of the original (j ∈ {0, 1}).
Loading undoes it, so the model keeps the "half" layout of the Hugging Face checkpoint.

Metadata is read with typed getters (a string or array where an integer belongs is a GGUFError
naming the key), and `check_structure` compares block, head, vocabulary and width counts with the
tensor infos (header only) before the model is built or any tensor is dequantized.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import ModelConfig, RopeScaling
from lmforge.io.file_keys import KeyReader, check_layer_count, expect_shape, speaking_file
from lmforge.io.gguf import GGUFError, GGUFFile
from lmforge.io.gguf_quants import AFFINE, PLAIN_DTYPES, AffineBlocks, affine_blocks
from lmforge.model.transformer import Transformer
from lmforge.quant.weight_only import QuantEmbedding, QuantLinear
from lmforge.utils.memory import release_freed_memory

ARCHES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "attn_q.bias": "attn.q_proj.bias",
    "attn_k.bias": "attn.k_proj.bias",
    "attn_v.bias": "attn.v_proj.bias",
    "attn_q_norm.weight": "attn.q_norm.weight",
    "attn_k_norm.weight": "attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def _gguf_keys(arch: str) -> dict[str, str]:
    """ModelConfig field -> the GGUF metadata key it comes from (for errors in the file's terms)."""
    keys = {
        "d_model": "embedding_length", "n_layers": "block_count", "n_heads": "attention.head_count",
        "n_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length", "d_ff": "feed_forward_length",
        "max_seq_len": "context_length", "norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta": "rope.freq_base",
        "rotary_fraction": "rope.dimension_count", "rope_scaling.factor": "rope.scaling.factor",
        "rope_scaling.original_max_seq_len": "rope.scaling.original_context_length", "vocab_size": "vocab_size",
    }  # fmt: skip
    return {field: f"{arch}.{key}" for field, key in keys.items()}


def _vocab_size(r: KeyReader, gguf: GGUFFile, arch: str) -> tuple[int, str]:
    """(vocabulary size, the key it came from): `{arch}.vocab_size`, else the token list's length, else
    token_embd's rows."""
    if r.present(f"{arch}.vocab_size"):
        return r.size(f"{arch}.vocab_size"), f"{arch}.vocab_size"
    tokens = r.values.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens:
        return len(tokens), "len(tokenizer.ggml.tokens)"
    if "token_embd.weight" in gguf.tensors and gguf.tensors["token_embd.weight"].shape:
        return gguf.tensors["token_embd.weight"].shape[0], "token_embd.weight rows"
    raise GGUFError(f"{gguf.path}: no vocabulary size ({arch}.vocab_size, tokenizer.ggml.tokens and token_embd.weight)")


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    """The `ModelConfig` described by a GGUF file's metadata.

    Every key is read with a typed getter (GGUF values may be strings or arrays where an integer
    belongs), and ModelConfig's own `ConfigError` is re-raised as a GGUFError naming the GGUF key."""
    where = str(gguf.path)
    r = KeyReader(gguf.metadata, where, GGUFError)
    arch = r.text("general.architecture", None)
    if arch not in ARCHES:
        raise GGUFError(f"{where}: general.architecture={arch!r} is not supported ({', '.join(ARCHES)})")
    if r.count(f"{arch}.expert_count", 0):
        n = r.values[f"{arch}.expert_count"]
        raise GGUFError(f"{where}: {arch}.expert_count={n}: mixture-of-experts GGUF models are not supported")
    with speaking_file(where, _gguf_keys(arch), GGUFError):
        return _config(r, gguf, arch)


def _config(r: KeyReader, gguf: GGUFFile, arch: str) -> ModelConfig:
    def k(key: str) -> str:
        return f"{arch}.{key}"

    d_model, n_heads = r.size(k("embedding_length")), r.size(k("attention.head_count"))
    if not r.present(k("attention.key_length")) and d_model % n_heads:
        raise GGUFError(
            f"{r.where}: {k('embedding_length')}={d_model} is not divisible by {k('attention.head_count')}={n_heads} "
            f"and {k('attention.key_length')} is not set"
        )
    head_dim = r.size(k("attention.key_length"), d_model // n_heads)
    scaling = None
    kind = r.text(k("rope.scaling.type"), "none")
    if kind in ("linear", "yarn"):
        orig = r.size(k("rope.scaling.original_context_length"), None)
        scaling = RopeScaling(kind=kind, factor=r.number(k("rope.scaling.factor")), original_max_seq_len=orig)
    elif kind != "none":
        raise GGUFError(f"{gguf.path}: {k('rope.scaling.type')}={kind!r} is not supported (linear, yarn)")
    if "rope_freqs.weight" in gguf.tensors:
        raise GGUFError(f"{gguf.path}: per-frequency RoPE factors (rope_freqs.weight) are not supported yet")
    return ModelConfig(
        arch=ARCHES[arch],
        vocab_size=_vocab_size(r, gguf, arch)[0],
        d_model=d_model,
        n_layers=r.size(k("block_count")),
        n_heads=n_heads,
        n_kv_heads=r.size(k("attention.head_count_kv"), n_heads),
        head_dim=head_dim,
        d_ff=r.size(k("feed_forward_length")),
        max_seq_len=r.size(k("context_length"), 2048),
        norm_eps=r.number(k("attention.layer_norm_rms_epsilon"), 1e-5),
        attn_bias="blk.0.attn_q.bias" in gguf.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in gguf.tensors,
        rope_theta=r.number(k("rope.freq_base"), 10000.0),
        rotary_fraction=r.size(k("rope.dimension_count"), head_dim) / head_dim,
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in gguf.tensors,
    )


def check_structure(gguf: GGUFFile, cfg: ModelConfig) -> None:
    """The metadata's counts against the tensors present (names and header shapes; nothing is read or
    dequantized), before any module is built: a `llama.block_count` of 50000 in a file holding 30 blocks
    is refused at once, naming the key and the blocks found. Also checked: token_embd/output against the
    vocabulary (and the token list) and embedding_length, attn_q/attn_k against the head counts and
    key_length, ffn_up against feed_forward_length."""
    where, arch = str(gguf.path), gguf.metadata["general.architecture"]
    shapes = {name: info.shape for name, info in gguf.tensors.items()}
    found = {int(p[1]) for p in (n.split(".", 2) for n in shapes) if p[0] == "blk" and len(p) == 3 and p[1].isdigit()}
    check_layer_count(cfg.n_layers, found, f"{arch}.block_count", where, "blk.N.", GGUFError)
    vocab, vocab_key = _vocab_size(KeyReader(gguf.metadata, where, GGUFError), gguf, arch)
    d, hd = cfg.d_model, cfg.dim_head
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens and len(tokens) != vocab:
        raise GGUFError(f"{where}: tokenizer.ggml.tokens holds {len(tokens)} tokens but {vocab_key}={vocab}")
    if cfg.arch == "llama" and hd % 2:
        raise GGUFError(f"{where}: {arch}.attention.key_length={hd} is odd (llama's q/k rows come in pairs)")

    def expect(name: str, shape: tuple[int, ...], why: str) -> None:
        expect_shape(shapes, name, shape, why, where, GGUFError)

    for name in ("token_embd.weight", "output.weight"):
        expect(name, (vocab, d), f"{vocab_key}={vocab} x {arch}.embedding_length={d}")
    heads = f"{arch}.attention.head_count"
    for i in range(cfg.n_layers):
        expect(f"blk.{i}.attn_q.weight", (cfg.n_heads * hd, d), f"{heads}={cfg.n_heads} x head size {hd}")
        expect(f"blk.{i}.attn_k.weight", (cfg.kv_heads * hd, d), f"{heads}_kv={cfg.kv_heads} x head size {hd}")
        expect(f"blk.{i}.ffn_up.weight", (cfg.d_ff, d), f"{arch}.feed_forward_length={cfg.d_ff}")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: per head, rows (2i + j) -> (j·d/2 + i)."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).transpose(1, 2).reshape(out, *rest)


def our_name(name: str) -> str | None:
    """The lmforge parameter for a GGUF tensor name, or None."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"blocks.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    return None


def load_gguf_model(
    path: str | Path | GGUFFile, dtype: torch.dtype | None = None, *, quantized: bool = False, **overrides: Any
) -> Transformer:
    """Load the model in a GGUF file: dequantized to float32, then cast to `dtype`; with `quantized`, the linear
    weights and the token embedding in Q8_0, Q5_0, Q4_0, Q4_1, Q4_K or Q6_K stay quantized (`quant.weight_only`: the
    same weights bit for bit) and only the rest is dequantized. `path` may be an open `GGUFFile`."""
    gguf = path if isinstance(path, GGUFFile) else GGUFFile(path)  # an open file: read once with its tokenizer
    cfg = config_from_gguf(gguf).replace(**overrides)
    check_structure(gguf, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = dict(model.state_dict())
    for name, info in gguf.tensors.items():  # every name and shape, from the header, before dequantizing
        ours = our_name(name)
        if ours is None:
            raise GGUFError(f"{gguf.path}: unexpected tensor {name!r}")
        if ours not in expected or tuple(info.shape) != tuple(expected[ours].shape):
            want = tuple(expected[ours].shape) if ours in expected else "no such parameter"
            raise GGUFError(f"{gguf.path}: tensor {name!r} has shape {tuple(info.shape)}; the config needs {want}")
    missing = sorted(set(expected) - {our_name(name) for name in gguf.tensors})
    if missing:
        raise GGUFError(f"{gguf.path}: missing tensor for {missing[0]} ({len(missing)} in all)")
    state: dict[str, torch.Tensor] = {}
    kept: dict[str, QuantLinear] = {}
    for name, info in gguf.tensors.items():
        ours = our_name(name)
        module = ours.removesuffix(".weight")
        rows = cfg.n_heads if "attn_q" in name else cfg.kv_heads
        permuted = cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight"))
        kind = type(model.get_submodule(module)) if quantized and ours.endswith(".weight") else None
        if info.ggml_type in AFFINE and kind in (nn.Linear, nn.Embedding):
            layer = QuantLinear if kind is nn.Linear else QuantEmbedding
            blocks = affine_blocks(gguf.raw(name), info.ggml_type, packed=True)
            kept[module] = _quantized(layer, blocks, permuted and rows)
            continue
        t = gguf.tensor(name)
        if permuted:
            t = unpermute_rope_rows(t, rows)
        if quantized and info.ggml_type in PLAIN_DTYPES:  # the few float tensors, copied: the file is unmapped
            t = t.clone()
        state[ours] = t.to(dtype) if dtype is not None else t
    for module, linear in kept.items():
        bias = state.pop(f"{module}.bias", None)
        linear.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        parent, _, attr = module.rpartition(".")
        setattr(model.get_submodule(parent), attr, linear)
    model.load_state_dict(state, assign=True, strict=not kept)
    if kept:  # every parameter but the kept layers' codes and scales came from the state
        left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
        if left:
            raise GGUFError(f"{gguf.path}: no tensor for {left[0]} ({len(left)} in all)")
    if quantized:
        gguf.close()  # nothing refers to the map: its pages leave the process's memory
        release_freed_memory()  # the unpacked blocks, freed between the kept codes
    return model.eval()


def _quantized(layer: type[QuantLinear], blocks: AffineBlocks, permuted_heads: int | bool) -> QuantLinear:
    """A `layer` (QuantLinear or QuantEmbedding) holding `blocks` (rows un-permuted as `unpermute_rope_rows` does,
    over `permuted_heads`)."""
    tensors = [None if a is None else torch.from_numpy(a) for a in (blocks.codes, blocks.scale, blocks.offset)]
    if permuted_heads:
        tensors = [None if t is None else unpermute_rope_rows(t, permuted_heads) for t in tensors]
    codes, scale, offset = tensors
    return layer(codes, scale, offset, bits=blocks.bits, signed=blocks.signed, group_size=blocks.group_size,
                 packed=blocks.packed)  # fmt: skip
