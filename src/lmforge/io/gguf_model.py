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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig, RopeScaling
from lmforge.io.gguf import GGUFError, GGUFFile
from lmforge.model.transformer import Transformer

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


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    """The `ModelConfig` described by a GGUF file's metadata."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch not in ARCHES:
        raise GGUFError(f"{gguf.path}: general.architecture={arch!r} is not supported ({', '.join(ARCHES)})")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"{gguf.path}: missing metadata key {arch}.{key}")
        return value

    d_model, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", d_model // n_heads))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or None
    if vocab is None:
        vocab = gguf.tensors["token_embd.weight"].shape[0]
    scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind in ("linear", "yarn"):
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        scaling = RopeScaling(kind=kind, factor=float(get("rope.scaling.factor")), original_max_seq_len=orig)
    elif kind != "none":
        raise GGUFError(f"{gguf.path}: {arch}.rope.scaling.type={kind!r} is not supported (linear, yarn)")
    if "rope_freqs.weight" in gguf.tensors:
        raise GGUFError(f"{gguf.path}: per-frequency RoPE factors (rope_freqs.weight) are not supported yet")
    return ModelConfig(
        arch=ARCHES[arch],
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length", 2048)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        attn_bias="blk.0.attn_q.bias" in gguf.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in gguf.tensors,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rotary_fraction=int(get("rope.dimension_count", head_dim)) / head_dim,
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in gguf.tensors,
    )


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


def load_gguf_model(path: str | Path, dtype: torch.dtype | None = None, **overrides: Any) -> Transformer:
    """Load the model in a GGUF file (dequantized to float32, then cast to `dtype`)."""
    gguf = GGUFFile(path)
    cfg = config_from_gguf(gguf).replace(**overrides)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = dict(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for name in gguf.tensors:
        ours = our_name(name)
        if ours is None:
            raise GGUFError(f"{gguf.path}: unexpected tensor {name!r}")
        t = gguf.tensor(name)
        if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            t = unpermute_rope_rows(t, cfg.n_heads if "attn_q" in name else cfg.kv_heads)
        if ours not in expected or tuple(t.shape) != tuple(expected[ours].shape):
            want = tuple(expected[ours].shape) if ours in expected else "no such parameter"
            raise GGUFError(f"{gguf.path}: tensor {name!r} has shape {tuple(t.shape)}; the config needs {want}")
        state[ours] = t.to(dtype) if dtype is not None else t
    missing = sorted(set(expected) - set(state))
    if missing:
        raise GGUFError(f"{gguf.path}: missing tensor for {missing[0]} ({len(missing)} in all)")
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()
