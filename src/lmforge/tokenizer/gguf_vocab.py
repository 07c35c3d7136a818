"""Tokenizers stored in GGUF metadata (`tokenizer.ggml.*`).

    tokenizer.ggml.model        "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    tokenizer.ggml.pre          the pre-tokenizer's name ("llama-bpe", "qwen2", "smollm", ...)
    tokenizer.ggml.tokens       token strings, index = id (byte-level: GPT-2's printable-unicode alphabet)
    tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.merges       "left right" strings in priority order
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id,  tokenizer.chat_template

A byte-level GGUF vocabulary is read with the checks of tokenizer.json files (`lmforge.tokenizer.formats`),
its errors naming the GGUF keys (``tokenizer.ggml.tokens[17]``); control and user-defined tokens are the
special tokens, and `pre` names the pre-tokenizer.

A "llama" vocabulary (SentencePiece-style: pieces with "▁" for spaces, `<0xXX>` byte pieces, merges
ordered by `tokenizer.ggml.scores`, `tokenizer.ggml.add_space_prefix`, `tokenizer.ggml.add_bos_token`)
becomes a `SentencePieceTokenizer` (see `lmforge.tokenizer.spm`).
"""

from __future__ import annotations

from typing import Any

from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.formats import (
    TokenizerFileError,
    _added_tokens,
    _attrs_from_config,
    _build,
    _byte_level_vocab,
    _merge_ids,
    _set_config_attrs,
    bytes_to_unicode,
)
from lmforge.tokenizer.pretokenize import DIGITS_GPT2_PATTERN, GPT2_PATTERN, LLAMA3_PATTERN, SplitRule
from lmforge.tokenizer.spm import SentencePieceTokenizer, _gguf_array, gguf_vocab_keys, sentencepiece_from_gguf

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
SPECIAL = (CONTROL, USER_DEFINED)  # token types that become special tokens
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


def _split_rule(pre: Any, where: str) -> SplitRule:
    """The pre-tokenizer named by tokenizer.ggml.pre. An unknown name is refused, as llama.cpp refuses it: another
    pre-tokenizer would give other token ids without a sign."""
    if not isinstance(pre, str) or (pre not in PRE_PATTERNS and pre not in DIGITS_FIRST):
        known = ", ".join(sorted([*PRE_PATTERNS, *DIGITS_FIRST]))
        raise TokenizerFileError(f"{where}: tokenizer.ggml.pre={pre!r} is not a pre-tokenizer lmforge knows ({known})")
    if pre in DIGITS_FIRST:
        return SplitRule(DIGITS_GPT2_PATTERN)
    return SplitRule(PRE_PATTERNS[pre] or GPT2_PATTERN)


def tokenizer_from_gguf(meta: dict[str, Any], where: str) -> Tokenizer | SentencePieceTokenizer:
    """The tokenizer described by GGUF metadata: byte-level ("gpt2") or SentencePiece-style ("llama").

    Checked: the keys of `gguf_vocab_keys`; tokenizer.ggml.pre known; tokenizer.ggml.merges strings "left right"
    over tokens of the vocabulary. Control and user-defined tokens become special tokens; unused ones outside the
    byte-level alphabet (padding placeholders) are left out; every other token must be byte-level."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise TokenizerFileError(f"{where}: no tokenizer.ggml.model: the file has no tokenizer")
    if kind == "llama":
        return sentencepiece_from_gguf(meta, where)
    if kind != "gpt2":
        raise TokenizerFileError(
            f"{where}: tokenizer.ggml.model={kind!r} is not supported yet (lmforge reads 'gpt2', 'llama')"
        )
    tokens, types, named = gguf_vocab_keys(meta, where)
    types = types or [NORMAL] * len(tokens)
    rule = _split_rule(meta.get("tokenizer.ggml.pre", "default"), where)
    merges = _gguf_array(meta, "tokenizer.ggml.merges", where, lambda v: isinstance(v, str), "a string", None) or []
    alphabet = set(bytes_to_unicode().values())
    key = "tokenizer.ggml.tokens"
    added = ((f"{where}: {key}[{i}]", {"id": i, "content": t}) for i, t in enumerate(tokens) if t and types[i] in SPECIAL)  # noqa: E501
    specials = _added_tokens(added, where)
    entries = (
        (i, t, i)
        for i, t in enumerate(tokens)
        if types[i] not in SPECIAL and not (types[i] == UNUSED and not set(t) <= alphabet)
    )
    vocab = _byte_level_vocab(entries, specials, lambda i: f"{where}: {key}[{i}]")
    pairs = _merge_ids(merges, vocab, lambda n: f"{where}: tokenizer.ggml.merges[{n}]")
    tok = _build(vocab, pairs, rule, specials, False, f"{where}: {key}")
    config = {"chat_template": meta.get("tokenizer.chat_template")}
    tok = _set_config_attrs(tok, _attrs_from_config(config | {a: tokens[i] for a, i in named.items()}, where))
    tok.eot_token = tokens[named["eot_token"]] if "eot_token" in named else None
    tok.add_bos_token = meta.get("tokenizer.ggml.add_bos_token", False)
    return tok
