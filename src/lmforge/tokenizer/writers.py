"""The tokenizer file writers: tokenizer.json + tokenizer_config.json, tiktoken rank files, vocab.json + merges.txt.

The formats are described in ``formats.py``, which holds their readers and re-exports everything here. The writers
live apart because `Tokenizer.save` (``bpe.py``) calls them while the readers build `Tokenizer` objects: this module
imports neither ``bpe.py`` nor ``formats.py``, so the two never import each other. It reads a tokenizer through
`ByteLevelBPE`, the attributes a byte-level BPE tokenizer has. Every write is atomic (`lmforge.utils.atomic`).
"""

from __future__ import annotations

import base64
import json
import warnings
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from lmforge.tokenizer.pretokenize import GPT2_PATTERN, SplitRule
from lmforge.utils.atomic import atomic_directory, atomic_write

__all__ = [
    "SAVED_FILES",
    "ByteLevelBPE",
    "bytes_to_unicode",
    "hf_tokenizer_config",
    "hf_tokenizer_json",
    "save_hf_tokenizer",
    "save_tiktoken",
    "save_tokenizer",
    "save_vocab_merges",
    "tiktoken_ranks",
]

SAVED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.tiktoken")  # what save_tokenizer writes

# tokenizer_config.json keys copied onto the Tokenizer as attributes (None when absent). eot_token is lmforge's
# (GGUF's tokenizer.ggml.eot_token_id; transformers keeps an unknown key as is): generation stops there too.
_CONFIG_ATTRS = ("chat_template", "bos_token", "eos_token", "eot_token", "pad_token", "unk_token", "model_max_length")


class ByteLevelBPE(Protocol):
    """What the writers read: a byte-level BPE tokenizer's definition and its tokenizer_config.json metadata.

    `lmforge.tokenizer.bpe.Tokenizer` has all of it. A structural type, so that this module need not import
    ``bpe.py`` (which imports this module to save)."""

    vocab: dict[int, bytes]  # id -> token bytes
    merges: list[tuple[int, int]]  # ranked pairs of ids
    split_rule: SplitRule  # the pre-tokenizer
    pattern: str  # its regex
    ignore_merges: bool
    special_tokens: dict[str, int]
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eot_token: str | None
    pad_token: str | None
    unk_token: str | None
    model_max_length: int | None


# ----------------------------------------------------------------------------------------------------------------
# The GPT-2 byte <-> unicode table
# ----------------------------------------------------------------------------------------------------------------


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    The 188 bytes that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the other 68 (control
    characters, space, DEL, NBSP, soft hyphen) map, in byte order, to chr(256), chr(257), ..., so b" " -> "Ġ" (U+0120)
    and b"\\n" -> "Ċ" (U+010A). Every token then is a string without spaces or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_to_str(token: bytes) -> str:
    """Token bytes spelled in the byte-level alphabet (`bytes_to_unicode`)."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    """`obj` as indented UTF-8 JSON, written atomically."""
    atomic_write(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def _special_ids(tok: ByteLevelBPE) -> set[int]:
    return set((tok.special_tokens or {}).values())


def _merged_ids(tok: ByteLevelBPE) -> list[int]:
    """The id each merge produces, in merge order (the id whose bytes are vocab[l] + vocab[r])."""
    inverse = {b: i for i, b in tok.vocab.items() if i not in _special_ids(tok)}
    out = []
    for left, right in tok.merges:
        merged = tok.vocab[left] + tok.vocab[right]
        if merged not in inverse:
            raise ValueError(f"merge ({left}, {right}) makes {merged!r}, which is not in the vocabulary")
        out.append(inverse[merged])
    return out


def _config_attrs(tok: ByteLevelBPE) -> dict[str, Any]:
    return {name: getattr(tok, name, None) for name in _CONFIG_ATTRS}


# ----------------------------------------------------------------------------------------------------------------
# tiktoken rank files
# ----------------------------------------------------------------------------------------------------------------


def tiktoken_ranks(tok: ByteLevelBPE) -> dict[bytes, int]:
    """The mergeable ranks of `tok` (ids as ranks), checking that tiktoken's rule reproduces its merges.

    tiktoken merges by the rank of the merged token, so the ids made by the merges must increase in merge order;
    and tiktoken emits a pre-token found whole in the ranks, so unless `tok.ignore_merges`, every multi-byte token
    must be the product of a merge.
    """
    specials = _special_ids(tok)
    merged = _merged_ids(tok)
    for i in range(1, len(merged)):
        if merged[i] <= merged[i - 1]:
            raise ValueError(
                "this vocabulary cannot be written as tiktoken ranks: merge "
                f"{i} makes id {merged[i]} after merge {i - 1} made id {merged[i - 1]} (ranks must follow merge order)"
            )
    made = set(merged)
    ranks: dict[bytes, int] = {}
    for i in sorted(tok.vocab):
        if i in specials:
            continue
        token = tok.vocab[i]
        if len(token) > 1 and i not in made and not getattr(tok, "ignore_merges", False):
            # tiktoken would emit it for a pre-token equal to it; BPE without ignore_merges never does.
            raise ValueError(f"this vocabulary cannot be written as tiktoken ranks: token {i} {token!r} has no merge")
        if token in ranks:
            raise ValueError(f"token bytes {token!r} appear twice in the vocabulary (ids {ranks[token]} and {i})")
        ranks[token] = i
    return ranks


def save_tiktoken(tok: ByteLevelBPE, path: str | Path) -> None:
    """Write `tok` as a tiktoken rank file (special tokens and the regex are not part of the format)."""
    ranks = tiktoken_ranks(tok)
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in ranks.items()]
    atomic_write(Path(path), "".join(lines))


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (+ tokenizer_config.json)
# ----------------------------------------------------------------------------------------------------------------


def hf_tokenizer_json(tok: ByteLevelBPE) -> dict:
    """The tokenizer.json object for `tok`: BPE model, regex Split + ByteLevel, ByteLevel decoder, added tokens."""
    specials = tok.special_tokens or {}
    special_ids = set(specials.values())
    vocab = {_token_to_str(tok.vocab[i]): i for i in sorted(tok.vocab) if i not in special_ids}
    # Special tokens go in the model vocab too (as GPT-2's <|endoftext|>): `tokenizers` keeps an added token's id
    # only when the model knows it, and otherwise renumbers it after the vocab.
    for content, i in sorted(specials.items(), key=lambda kv: kv[1]):
        vocab.setdefault(content, i)
    merges = [[_token_to_str(tok.vocab[a]), _token_to_str(tok.vocab[b])] for a, b in tok.merges]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    rule = tok.split_rule
    if rule.pattern == GPT2_PATTERN and rule.cuts_at_word_ends:  # Isolated, not inverted: tokenizers' own GPT-2 split
        pre_tokenizer = {**byte_level, "use_regex": True}
    else:
        split = {"type": "Split", "pattern": {"Regex": rule.pattern}, "behavior": rule.behavior, "invert": rule.invert}
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [split, byte_level]}
    added = [
        {
            "id": i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for s, i in sorted(specials.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": {**byte_level, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": bool(getattr(tok, "ignore_merges", False)),
            "vocab": vocab,
            "merges": merges,
        },
    }


def hf_tokenizer_config(tok: ByteLevelBPE) -> dict:
    """The tokenizer_config.json object: special tokens, chat template, max length, for transformers' AutoTokenizer."""
    from lmforge.tokenizer.chat import default_chat_template_for

    attrs = _config_attrs(tok)
    specials = tok.special_tokens or {}
    config: dict[str, Any] = {
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for s, i in sorted(specials.items(), key=lambda kv: kv[1])
        },
        "bos_token": attrs["bos_token"],
        "eos_token": attrs["eos_token"],
        "pad_token": attrs["pad_token"],
        "unk_token": attrs["unk_token"],
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    template = attrs["chat_template"] or default_chat_template_for(tok)
    if template is not None:
        config["chat_template"] = template
    if attrs["model_max_length"] is not None:
        config["model_max_length"] = attrs["model_max_length"]
    if attrs["eot_token"] is not None:
        config["eot_token"] = attrs["eot_token"]
    return config


def save_hf_tokenizer(tok: ByteLevelBPE, directory: str | Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into `directory`."""
    directory = Path(directory)
    _write_json(directory / "tokenizer.json", hf_tokenizer_json(tok))
    _write_json(directory / "tokenizer_config.json", hf_tokenizer_config(tok))


# ----------------------------------------------------------------------------------------------------------------
# GPT-2 vocab.json + merges.txt
# ----------------------------------------------------------------------------------------------------------------


def save_vocab_merges(tok: ByteLevelBPE, directory: str | Path) -> None:
    """Write GPT-2 style ``vocab.json`` (special tokens included, as GPT-2's <|endoftext|>) and ``merges.txt``.

    The format has no place for the regex: readers assume GPT-2's.
    """
    directory = Path(directory)
    if tok.pattern != GPT2_PATTERN:
        warnings.warn("vocab.json + merges.txt imply GPT-2's regex; this tokenizer uses another one", stacklevel=2)
    data = hf_tokenizer_json(tok)
    vocab = data["model"]["vocab"]
    merges = "".join(f"{a} {b}\n" for a, b in data["model"]["merges"])
    _write_json(directory / "vocab.json", vocab)
    atomic_write(directory / "merges.txt", "#version: 0.2\n" + merges)


# ----------------------------------------------------------------------------------------------------------------
# A whole directory
# ----------------------------------------------------------------------------------------------------------------


def save_tokenizer(tok: ByteLevelBPE, directory: str | Path) -> None:
    """Write tokenizer.json + tokenizer_config.json + tokenizer.tiktoken into `directory`.

    The rank file is skipped, with a warning, when the vocabulary cannot be expressed as tiktoken ranks. The
    directory is replaced whole (`atomic_directory`): the three files always belong to one tokenizer, other files
    in it (a model's weights) are kept.
    """
    with atomic_directory(directory, replaces=SAVED_FILES.__contains__) as out:
        save_hf_tokenizer(tok, out)
        try:
            save_tiktoken(tok, out / "tokenizer.tiktoken")
        except ValueError as e:
            warnings.warn(f"tokenizer.tiktoken not written: {e}", stacklevel=2)
