"""lmforge model + tokenizer -> a GGUF file that llama.cpp, the `gguf` package, transformers and
`lmforge.load` read: the exact inverse of `lmforge.io.gguf_model` and `lmforge.tokenizer.gguf_vocab`.

Metadata written (`{arch}` = llama, qwen2 or qwen3, the `ModelConfig.arch`; integers as u32 and
floats as f32, the types llama.cpp checks):

    general.architecture = arch    general.name    general.quantization_version = 2
    general.file_type             0 F32, 1 F16, 7 Q8_0, 2 Q4_0, 3 Q4_1, 8 Q5_0, 14 Q4_K (Q4_K_S)
                                  (llama.cpp's `llama_ftype`)
    {arch}.vocab_size <- vocab_size                 {arch}.context_length <- max_seq_len
    {arch}.embedding_length <- d_model              {arch}.block_count <- n_layers
    {arch}.feed_forward_length <- d_ff              {arch}.rope.freq_base <- rope_theta
    {arch}.attention.head_count(_kv) <- n_heads, kv_heads
    {arch}.attention.key_length, value_length <- head_dim      {arch}.rope.dimension_count <- rotary dim
    {arch}.attention.layer_norm_rms_epsilon <- norm_eps
    {arch}.rope.scaling.{type,factor,original_context_length} <- rope_scaling (linear, yarn)
    tokenizer.ggml.model = "gpt2" (byte-level BPE)   tokenizer.ggml.pre: from the tokenizer's regex
        GPT2_PATTERN -> "gpt-2", LLAMA3_PATTERN -> "llama-bpe", DIGITS_GPT2_PATTERN -> "smollm",
        QWEN2_PATTERN -> "qwen2" (any other pattern: an error, as no reader would reproduce it)
    tokenizer.ggml.tokens        id -> token in GPT-2's byte-to-unicode alphabet; specials verbatim;
                                 ids the tokenizer lacks (model vocab larger) -> "[PAD{id}]"
    tokenizer.ggml.token_type    1 normal, 3 control (special tokens), 5 unused (the padding ids)
    tokenizer.ggml.merges        "left right" in rank order
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id <- tokenizer.{bos,eos,unk,pad}_token
    tokenizer.ggml.eot_token_id <- tokenizer.eot_token     tokenizer.ggml.add_bos_token <- add_bos_token
    tokenizer.ggml.add_space_prefix = False
    A SentencePiece tokenizer (read from a "llama" GGUF vocabulary) is written back as read:
    tokenizer.ggml.model = "llama", its pieces, tokenizer.ggml.scores, token types, add_bos_token and
    add_space_prefix (and "[PAD{id}]" unused pieces for ids beyond them).
    tokenizer.chat_template      <- tokenizer.chat_template

Tensors (lmforge parameter -> GGUF name; PyTorch's (out, in) row-major bytes are ggml's [in, out]):

    embed.weight -> token_embd.weight      norm.weight -> output_norm.weight
    lm_head.weight -> output.weight        (absent when the embeddings are tied)
    blocks.N.attn_norm / mlp_norm -> blk.N.attn_norm / ffn_norm
    blocks.N.attn.{q,k,v,o}_proj -> blk.N.attn_{q,k,v,output} (+ .bias)
    blocks.N.attn.{q,k}_norm -> blk.N.attn_{q,k}_norm   blocks.N.mlp.{gate,up,down}_proj -> blk.N.ffn_*

Types, as llama.cpp's converter: 1-D tensors (norms, biases) are always F32; every matrix,
token_embd included, gets the requested type; a matrix whose rows are not whole blocks of it
falls back as llama.cpp's quantizer does (llama-quant.cpp): Q4_K (256-weight blocks) to Q5_0,
and to F16 where the rows are not whole 32-weight blocks either.

For `llama`, the rows of q and k are permuted per head, row j·d/2 + i -> row 2i + j, so that
llama.cpp's RoPE over adjacent pairs equals the "half" rotation of the model (llama.cpp's
`permute`; `gguf_model.unpermute_rope_rows` undoes it). qwen2/qwen3 use llama.cpp's NeoX RoPE:
no permutation.

Before writing, the metadata is read back through `gguf_model.config_from_gguf` and compared with
the model's config: a field the format cannot carry (a GELU MLP, llama3 RoPE scaling, a sliding
window...) is an error naming it, never a file that loads as a different model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.io.gguf import GGUFValue, GGUFValueType, write_gguf
from lmforge.io.gguf_model import _BLOCK_NAMES, _TOP_NAMES, ARCHES, config_from_gguf
from lmforge.io.gguf_quants import QK, GGMLType
from lmforge.quant.modules import dense_state_dict
from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.formats import bytes_to_unicode
from lmforge.tokenizer.gguf_vocab import QWEN2_PATTERN
from lmforge.tokenizer.pretokenize import DIGITS_GPT2_PATTERN, GPT2_PATTERN, LLAMA3_PATTERN
from lmforge.tokenizer.spm import SentencePieceTokenizer
from lmforge.utils.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.model.transformer import Transformer

__all__ = ["FILE_TYPES", "PRE_NAMES", "QTYPES", "gguf_metadata", "gguf_tensors", "save_gguf"]

QTYPES = {
    "f32": GGMLType.F32, "f16": GGMLType.F16, "q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0, "q4_1": GGMLType.Q4_1,
    "q5_0": GGMLType.Q5_0, "q4_k": GGMLType.Q4_K,
}  # fmt: skip
FILE_TYPES = {  # llama_ftype (14: LLAMA_FTYPE_MOSTLY_Q4_K_S)
    GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q4_0: 2, GGMLType.Q4_1: 3, GGMLType.Q8_0: 7, GGMLType.Q5_0: 8,
    GGMLType.Q4_K: 14,
}  # fmt: skip
FALLBACKS = {GGMLType.Q4_K: GGMLType.Q5_0}  # llama-quant.cpp's `tensor_type_fallback`, for rows of whole 32-blocks
PRE_NAMES = {GPT2_PATTERN: "gpt-2", LLAMA3_PATTERN: "llama-bpe", DIGITS_GPT2_PATTERN: "smollm", QWEN2_PATTERN: "qwen2"}
NORMAL, CONTROL, UNUSED = 1, 3, 5
_GGUF_NAME = {v: k for k, v in {**_TOP_NAMES, **{f"@.{k}": f"@.{v}" for k, v in _BLOCK_NAMES.items()}}.items()}
_U32, _F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32


class GGUFExportError(LmforgeError):
    """This model or tokenizer cannot be written as GGUF (an architecture, option or vocabulary GGUF cannot hold)."""


def _qtype(qtype: str | GGMLType) -> GGMLType:
    key = qtype.name.lower() if isinstance(qtype, GGMLType) else str(qtype).lower()
    if key not in QTYPES:
        raise GGUFExportError(f"unknown qtype {qtype!r}: GGUF export writes {', '.join(QTYPES)}")
    return QTYPES[key]


def _u32(x: int) -> GGUFValue:
    return GGUFValue(int(x), _U32)


def _f32(x: float) -> float:
    return float(np.float32(x))


# ---------------------------------------------------------------------------------------------
# Model metadata, checked by reading it back
# ---------------------------------------------------------------------------------------------


def _model_metadata(cfg: ModelConfig) -> dict[str, Any]:
    arch = cfg.arch
    if arch not in ARCHES:
        raise GGUFExportError(f"GGUF export does not support arch={arch!r} (supported: {', '.join(ARCHES)})")
    if arch == "llama" and cfg.attn_bias:
        raise GGUFExportError("GGUF export: llama with q/k/v biases is not supported (llama.cpp permutes q/k biases)")
    if arch == "llama" and cfg.rotary_fraction != 1.0:
        raise GGUFExportError("GGUF export: llama with partial rotary (rotary_fraction < 1) is not supported")
    meta: dict[str, Any] = {
        f"{arch}.vocab_size": _u32(cfg.vocab_size),
        f"{arch}.context_length": _u32(cfg.max_seq_len),
        f"{arch}.embedding_length": _u32(cfg.d_model),
        f"{arch}.block_count": _u32(cfg.n_layers),
        f"{arch}.feed_forward_length": _u32(cfg.d_ff),
        f"{arch}.attention.head_count": _u32(cfg.n_heads),
        f"{arch}.attention.head_count_kv": _u32(cfg.kv_heads),
        f"{arch}.attention.key_length": _u32(cfg.dim_head),
        f"{arch}.attention.value_length": _u32(cfg.dim_head),
        f"{arch}.attention.layer_norm_rms_epsilon": GGUFValue(cfg.norm_eps, _F32),
        f"{arch}.rope.freq_base": GGUFValue(cfg.rope_theta, _F32),
        f"{arch}.rope.dimension_count": _u32(cfg.rotary_dim),
    }
    rs = cfg.rope_scaling
    if rs is not None and rs.kind in ("linear", "yarn"):
        meta[f"{arch}.rope.scaling.type"] = rs.kind
        meta[f"{arch}.rope.scaling.factor"] = GGUFValue(rs.factor, _F32)
        if rs.original_max_seq_len is not None:
            meta[f"{arch}.rope.scaling.original_context_length"] = _u32(rs.original_max_seq_len)
    return meta


def _comparable(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with what GGUF cannot or need not carry made canonical (f32 floats, runtime fields)."""
    layer_types = cfg.layer_types
    if layer_types is not None and cfg.sliding_window is None and set(layer_types) <= {"full"}:
        layer_types = None
    rs = cfg.rope_scaling
    if rs is not None:
        rs = dataclasses.replace(rs, factor=_f32(rs.factor))
    return cfg.replace(
        n_kv_heads=cfg.kv_heads,
        norm_eps=_f32(cfg.norm_eps),
        rope_theta=_f32(cfg.rope_theta),
        rope_scaling=rs,
        layer_types=layer_types,
        pad_token_id=None,
        extra={},
    )


def _check_round_trip(cfg: ModelConfig, meta: dict[str, Any], names: list[str], where: str) -> None:
    plain = {k: (v.value if isinstance(v, GGUFValue) else v) for k, v in meta.items()}
    stub = SimpleNamespace(metadata=plain, tensors=dict.fromkeys(names), path=where)
    back, want = _comparable(config_from_gguf(stub)), _comparable(cfg)  # type: ignore[arg-type]
    for f in dataclasses.fields(ModelConfig):
        if f.compare and getattr(back, f.name) != getattr(want, f.name):
            raise GGUFExportError(
                f"GGUF export: {cfg.arch} GGUF metadata cannot represent {f.name}={getattr(cfg, f.name)!r} "
                f"(it would load as {getattr(back, f.name)!r})"
            )


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation: per head, rows (j·d/2 + i) -> (2i + j). Inverse of `unpermute_rope_rows`."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, 2, out // n_heads // 2, *rest).transpose(1, 2).reshape(out, *rest)


def gguf_name(ours: str) -> str | None:
    """The GGUF tensor name of an lmforge parameter (None: GGUF has no place for it)."""
    if ours in _GGUF_NAME:
        return _GGUF_NAME[ours]
    parts = ours.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and f"@.{parts[2]}" in _GGUF_NAME:
        return f"blk.{parts[1]}." + _GGUF_NAME[f"@.{parts[2]}"][2:]
    return None


def tensor_type(shape: tuple[int, ...], qtype: GGMLType) -> GGMLType:
    """llama.cpp's choice: F32 for 1-D tensors; for matrices whose rows are not whole blocks of `qtype`, its
    fallback (Q4_K -> Q5_0) when the rows are whole 32-weight blocks, else F16."""
    if len(shape) < 2:
        return GGMLType.F32
    if shape[-1] % qtype.block_size == 0:
        return qtype
    if qtype in FALLBACKS and shape[-1] % QK == 0:
        return FALLBACKS[qtype]
    return GGMLType.F16


def gguf_tensors(model: Transformer, qtype: str | GGMLType = "f16") -> dict[str, tuple[torch.Tensor, GGMLType]]:
    """GGUF name -> (float32 weights in GGUF row order, ggml type), in llama.cpp's order."""
    gtype, cfg = _qtype(qtype), model.config
    out: dict[str, tuple[torch.Tensor, GGMLType]] = {}
    state = dense_state_dict(model)  # a quantized layer's weight dequantized, then quantized to `qtype`
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    last = ("norm.weight", "lm_head.weight")  # llama.cpp's order: token_embd, the blocks, output_norm, output
    order = sorted(state, key=lambda n: (n != "embed.weight", last.index(n) if n in last else -1))
    for ours in order:
        name = gguf_name(ours)
        if name is None:
            raise GGUFExportError(f"GGUF export: parameter {ours!r} has no GGUF tensor name")
        t = state[ours].detach().to("cpu", torch.float32)
        if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            t = permute_rope_rows(t, cfg.n_heads if "attn_q" in name else cfg.kv_heads)
        out[name] = (t.contiguous(), tensor_type(tuple(t.shape), gtype))
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer metadata
# ---------------------------------------------------------------------------------------------


def _tokenizer_metadata(tok: Tokenizer | SentencePieceTokenizer, vocab_size: int) -> dict[str, Any]:
    if tok.vocab_size > vocab_size:
        raise GGUFExportError(
            f"GGUF export: the tokenizer has {tok.vocab_size} token ids but the model's embedding has only "
            f"{vocab_size} rows"
        )
    if isinstance(tok, SentencePieceTokenizer):
        meta = _sentencepiece_metadata(tok, vocab_size)
    elif isinstance(tok, Tokenizer):
        meta = _byte_level_metadata(tok, vocab_size)
    else:
        kind = type(tok).__name__
        raise GGUFExportError(f"GGUF export: cannot write a {kind} (byte-level BPE or SentencePiece only)")
    roles = (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"))
    for attr, key in (*roles, ("eot_token", "eot")):
        s = getattr(tok, attr, None)
        if s is None:
            continue
        tid = tok.special_tokens.get(s)
        if tid is None:
            tid = tok.token_to_id(s if isinstance(tok, SentencePieceTokenizer) else s.encode("utf-8"))
        if tid is None:
            raise GGUFExportError(f"GGUF export: tokenizer.{attr}={s!r} is not a token of the tokenizer")
        meta[f"tokenizer.ggml.{key}_token_id"] = _u32(tid)
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def _int32s(values: list[int]) -> GGUFValue:
    return GGUFValue(values, GGUFValueType.ARRAY, GGUFValueType.INT32)


def _byte_level_metadata(tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
    rule = tok.split_rule
    if rule.behavior != "Isolated" or rule.invert:
        raise GGUFExportError(
            f"GGUF export: the tokenizer splits text with behavior={rule.behavior!r}, invert={rule.invert}; "
            "GGUF vocabularies hold only the Isolated, non-inverted split of a named regex"
        )
    if tok.pattern not in PRE_NAMES:
        raise GGUFExportError(
            f"GGUF export: the tokenizer's pre-tokenizer regex {tok.pattern!r} has no llama.cpp name "
            "(GGUF readers know GPT-2, Llama-3, SmolLM and Qwen2's patterns)"
        )
    table = bytes_to_unicode()
    alphabet = set(table.values())
    tokens: list[str | None] = [None] * vocab_size
    types = [UNUSED] * vocab_size
    for i, b in tok.vocab.items():
        tokens[i], types[i] = "".join(table[c] for c in b), NORMAL
    for s, i in tok.special_tokens.items():
        if not s or not set(s) <= alphabet:
            raise GGUFExportError(
                f"GGUF export: special token {s!r} uses characters a byte-level GGUF vocabulary cannot hold"
            )
        tokens[i], types[i] = s, CONTROL
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": PRE_NAMES[tok.pattern],
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": _int32s(types),
        "tokenizer.ggml.merges": [f"{tokens[a]} {tokens[b]}" for a, b in tok.merges],
        "tokenizer.ggml.add_bos_token": bool(tok.add_bos_token),
        "tokenizer.ggml.add_space_prefix": False,
    }


def _sentencepiece_metadata(tok: SentencePieceTokenizer, vocab_size: int) -> dict[str, Any]:
    """Pieces, scores and types as read; ids beyond them (a larger embedding) are unused "[PAD{id}]" pieces."""
    extra = range(len(tok.pieces), vocab_size)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tok.pieces + [f"[PAD{i}]" for i in extra],
        "tokenizer.ggml.scores": GGUFValue(tok.scores + [0.0] * len(extra), GGUFValueType.ARRAY, _F32),
        "tokenizer.ggml.token_type": _int32s(list(tok.types) + [UNUSED] * len(extra)),
        "tokenizer.ggml.add_bos_token": tok.add_bos_token,
        "tokenizer.ggml.add_space_prefix": tok.add_space_prefix,
    }


# ---------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------


def gguf_metadata(
    model: Transformer, tokenizer: Tokenizer, qtype: str | GGMLType = "f16", name: str = "lmforge"
) -> dict[str, Any]:
    """All the metadata `save_gguf` writes (checked to load back as `model.config`)."""
    cfg, gtype = model.config, _qtype(qtype)
    meta: dict[str, Any] = {
        "general.architecture": cfg.arch,
        "general.name": name,
        "general.file_type": _u32(FILE_TYPES[gtype]),
        "general.quantization_version": _u32(2),
    }
    meta |= _model_metadata(cfg)
    meta |= _tokenizer_metadata(tokenizer, cfg.vocab_size)
    names = [gguf_name(n) for n in model.state_dict() if not (cfg.tie_embeddings and n == "lm_head.weight")]
    names = [n for n in names if n is not None]  # (a parameter without a name is an error in gguf_tensors)
    _check_round_trip(cfg, meta, names, "GGUF export")
    return meta


def save_gguf(
    model: Transformer,
    tokenizer: Tokenizer,
    path: str | Path,
    qtype: str | GGMLType = "f16",
    *,
    name: str | None = None,
) -> Path:
    """Write `model` and `tokenizer` as one GGUF file (atomically) and return its path.

    `qtype` is f32, f16, q8_0, q4_0, q4_1, q5_0 or q4_k for the matrices (1-D tensors stay F32). `name` is
    general.name (default: the file's stem). `lmforge.load(path)` gives back the model (weights
    rounded through `qtype`) and the tokenizer.
    """
    if tokenizer is None:
        raise GGUFExportError("GGUF export needs a tokenizer: a GGUF file carries its vocabulary")
    path = Path(path)
    meta = gguf_metadata(model, tokenizer, qtype, name or path.stem)
    write_gguf(path, meta, gguf_tensors(model, qtype))
    return path
