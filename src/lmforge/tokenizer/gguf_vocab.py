"""Tokenizers stored in GGUF metadata (`tokenizer.ggml.*`).

    tokenizer.ggml.model        "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    tokenizer.ggml.pre          the pre-tokenizer's name ("llama-bpe", "qwen2", "smollm", ...)
    tokenizer.ggml.tokens       token strings, index = id (byte-level: GPT-2's printable-unicode alphabet)
    tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.merges       "left right" strings in priority order
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id,  tokenizer.chat_template

A byte-level GGUF vocabulary is turned into the tokenizer.json it came from (BPE model, the
pre-tokenizer named by `pre`, control and user-defined tokens as added tokens) and read by the
same code as tokenizer.json files, so both paths share their checks.

A "llama" vocabulary (SentencePiece-style: pieces with "▁" for spaces, `<0xXX>` byte pieces, merges
ordered by `tokenizer.ggml.scores`, `tokenizer.ggml.add_space_prefix`, `tokenizer.ggml.add_bos_token`)
becomes a `SentencePieceTokenizer` (see `lmforge.tokenizer.spm`).
"""

from __future__ import annotations

import warnings
from typing import Any

from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.formats import bytes_to_unicode, tokenizer_from_hf
from lmforge.tokenizer.pretokenize import LLAMA3_PATTERN
from lmforge.tokenizer.spm import SentencePieceTokenizer, sentencepiece_from_gguf

CONTROL, USER_DEFINED = 3, 4
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)
# llama.cpp's pre-tokenizer names -> the regex of the tokenizer.json Split (None: GPT-2's ByteLevel regex)
PRE_PATTERNS: dict[str, str | None] = {
    "default": None,
    "gpt-2": None,
    "gpt2": None,
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), LLAMA3_PATTERN),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), QWEN2_PATTERN),
}
DIGITS_FIRST = ("smollm", "starcoder")  # Digits(individual_digits) then the GPT-2 ByteLevel regex


def _pre_tokenizer(pre: str, where: str) -> dict[str, Any]:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre in DIGITS_FIRST:
        digits = {"type": "Digits", "individual_digits": True}
        return {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    if pre not in PRE_PATTERNS:
        warnings.warn(f"{where}: unknown tokenizer.ggml.pre {pre!r}; using GPT-2's pre-tokenizer", stacklevel=3)
    pattern = PRE_PATTERNS.get(pre)
    if pattern is None:
        return byte_level
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}


def tokenizer_from_gguf(meta: dict[str, Any], where: str) -> Tokenizer | SentencePieceTokenizer:
    """The tokenizer described by GGUF metadata: byte-level ("gpt2") or SentencePiece-style ("llama")."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise ValueError(f"{where}: no tokenizer.ggml.model: the file has no tokenizer")
    if kind == "llama":
        return sentencepiece_from_gguf(meta, where)
    if kind != "gpt2":
        raise ValueError(f"{where}: tokenizer.ggml.model={kind!r} is not supported yet (lmforge reads 'gpt2', 'llama')")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    alphabet = set(bytes_to_unicode().values())
    added = [
        {"id": i, "content": t, "special": types[i] == CONTROL}
        for i, t in enumerate(tokens)
        if types[i] in (CONTROL, USER_DEFINED) and set(t) <= alphabet | set("<>|")
    ]
    added_ids = {a["id"] for a in added}
    data = {
        "model": {
            "type": "BPE",
            "vocab": {t: i for i, t in enumerate(tokens) if i not in added_ids and set(t) <= alphabet},
            "merges": list(meta.get("tokenizer.ggml.merges") or []),
        },
        "pre_tokenizer": _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")), where),
        "decoder": {"type": "ByteLevel"},
        "added_tokens": added,
    }
    config: dict[str, Any] = {"chat_template": meta.get("tokenizer.chat_template")}
    named: dict[str, str] = {}
    for role in ("bos", "eos", "unknown", "padding", "eot"):
        tid = meta.get(f"tokenizer.ggml.{role}_token_id")
        if isinstance(tid, int) and 0 <= tid < len(tokens):
            named[{"unknown": "unk_token", "padding": "pad_token"}.get(role, f"{role}_token")] = tokens[tid]
    eot = named.pop("eot_token", None)
    tok = tokenizer_from_hf(data, config | named, where)
    tok.eot_token = eot
    tok.add_bos_token = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    return tok
