"""Tokenizer files in and out: tiktoken rank files, Hugging Face tokenizer.json, GPT-2 vocab.json + merges.txt.

A byte-level BPE tokenizer is four things: a vocabulary (id -> token bytes), a merge list (pairs of ids in priority
order), a pre-tokenization regex, and special tokens (text -> id). Each format stores a different subset of them.

**tiktoken rank file** (``*.tiktoken``, as ``cl100k_base.tiktoken``)::

    IQ== 0            one line per token: base64(token bytes), a space, its rank
    Ig== 1            the rank is both the token id and the merge priority
    ...
    IHRoZQ== 1169     b" the" has rank 1169

  There is no merge list: tiktoken merges the adjacent pair whose concatenation has the lowest rank. The merges are
  recovered (the standard tiktoken -> Hugging Face conversion) by running BPE on each token's bytes with only the
  tokens of lower rank: the two parts left at the end are the token's merge, with priority = its rank. Neither the
  regex nor the special tokens are in the file; the loader takes them as arguments (cl100k's regex by default).
  tiktoken looks a whole pre-token up in the ranks before merging, i.e. it behaves like ``ignore_merges=True``.

**Hugging Face tokenizer.json** (the ``tokenizers`` library's serialization; only byte-level BPE is supported)::

    {"version": "1.0",
     "added_tokens": [{"id": 1000, "content": "<|endoftext|>", "special": true,
                       "single_word": false, "lstrip": false, "rstrip": false, "normalized": false}],
     "normalizer": null,
     "pre_tokenizer": {"type": "Sequence", "pretokenizers": [          # GPT-4 / Llama-3 style
         {"type": "Split", "pattern": {"Regex": "<regex>"}, "behavior": "Isolated", "invert": false},
         {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
       # or {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}: the built-in GPT-2 regex
     "post_processor": ..., "decoder": {"type": "ByteLevel", ...},
     "model": {"type": "BPE", "ignore_merges": false, "byte_fallback": false, ...,
               "vocab": {"Ġthe": 262, ...},                 # token (byte-level unicode) -> id
               "merges": [["Ġ", "t"], ...]}}                  # or "Ġ t" strings (older files)

  Tokens are written in the GPT-2 byte-level alphabet: each byte maps to one printable unicode character (printable
  Latin-1 bytes map to themselves, the 68 others to U+0100..U+0143, e.g. space -> "Ġ", newline -> "Ċ"); see
  `bytes_to_unicode`. Added tokens are matched before pre-tokenization; lmforge keeps all of them as special tokens.
  ``tokenizer_config.json`` next to it carries what transformers adds on top: ``chat_template``, ``bos_token``,
  ``eos_token``, ``pad_token``, ``model_max_length`` (a ``chat_template.jinja`` file, if present, wins).

**GPT-2 vocab.json + merges.txt**: ``vocab.json`` is the ``model.vocab`` object above; ``merges.txt`` starts with a
``#version: 0.2`` line, then one merge per line, ``"Ġ t"``. The regex is GPT-2's; special tokens come from a
``tokenizer_config.json`` beside them, if any.

`save_tokenizer` writes tokenizer.json + tokenizer_config.json + tokenizer.tiktoken; `load_tokenizer` reads a
directory or a ``.tiktoken`` file. All writers are atomic (a temporary file, then `os.replace`). This module holds the
readers; the writers live in ``writers.py`` (which `Tokenizer.save` calls without importing the readers, which build
`Tokenizer` objects) and are re-exported here.

**What the readers check** (each refusal is a `TokenizerFileError` naming the file and the file's own key, as
``tokenizer.json: model.vocab['Ġthe']`` or ``merges.txt:3``): JSON that parses, without a key twice in one object;
ids non-negative ints (not bools, floats or strings), unique, and at most ``2 * tokens + 1024`` (a larger id is a
corrupt file that would size embeddings for it); tokens unique strings of the byte-level alphabet; merges pairs of
tokens whose parts and result are in the vocabulary; added tokens ``{"id": int, "content": str}``, no id given to two
different tokens; tokenizer_config.json fields of the right type; a Split regex that compiles. A ``.tiktoken`` file
must hold all 256 single bytes (tiktoken fails on a missing one). Other vocabularies must hold every byte of plain
text (`TEXT_BYTES`: printable ASCII, tab, newline, carriage return) and may lack others (SmolLM2 lacks 21 control
and non-UTF-8 bytes): text holding such a byte fails to encode, naming the byte and the tokenizer's file.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, NoReturn

from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.pretokenize import (
    CL100K_PATTERN,
    DIGITS_GPT2_PATTERN,
    GPT2_PATTERN,
    SPLIT_BEHAVIORS,
    SplitRule,
)
from lmforge.tokenizer.writers import (  # the writers, re-exported here: this module is the formats' public home
    _CONFIG_ATTRS,
    SAVED_FILES,
    bytes_to_unicode,
    hf_tokenizer_config,
    hf_tokenizer_json,
    save_hf_tokenizer,
    save_tiktoken,
    save_tokenizer,
    save_vocab_merges,
    tiktoken_ranks,
)
from lmforge.utils.errors import LmforgeError

__all__ = [
    "CL100K_SPECIAL_TOKENS",
    "SAVED_FILES",
    "TokenizerFileError",
    "bytes_to_unicode",
    "hf_tokenizer_config",
    "hf_tokenizer_json",
    "load_hf_tokenizer",
    "load_tiktoken",
    "load_tokenizer",
    "load_vocab_merges",
    "save_hf_tokenizer",
    "save_tiktoken",
    "save_tokenizer",
    "save_vocab_merges",
    "tiktoken_ranks",
]

# The special tokens of tiktoken's cl100k_base (100,256 ranks); used when such a file is loaded without specials.
CL100K_SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}

class TokenizerFileError(LmforgeError):
    """A tokenizer file (tokenizer.json, tokenizer_config.json, .tiktoken, vocab.json, merges.txt, a GGUF's
    tokenizer.ggml.* keys) is malformed or unsupported; the message names the file and the file's own key."""


# ----------------------------------------------------------------------------------------------------------------
# The GPT-2 byte <-> unicode table, read backwards (`bytes_to_unicode` is in writers.py)
# ----------------------------------------------------------------------------------------------------------------


@cache
def _byte_tables() -> tuple[dict[int, int], dict[int, int], re.Pattern[str]]:
    """str.translate tables character -> byte and byte -> character, and a pattern matching a character outside
    the alphabet: each conversion below is then one pass in C."""
    alphabet = bytes_to_unicode()
    outside = re.compile("[^" + "".join(re.escape(ch) for ch in alphabet.values()) + "]")
    return {ord(ch): b for b, ch in alphabet.items()}, {b: ord(ch) for b, ch in alphabet.items()}, outside


def _str_to_token(text: str, where: str) -> bytes:
    to_bytes, _, outside = _byte_tables()
    bad = outside.search(text)
    if bad is not None:
        raise TokenizerFileError(
            f"{where}: token {text!r} is not in the byte-level alphabet (character {bad.group()!r})"
        )
    return text.translate(to_bytes).encode("latin-1")


def _token_to_str(token: bytes) -> str:
    """A token's text in the byte-level alphabet (the inverse of `_str_to_token`)."""
    return token.decode("latin-1").translate(_byte_tables()[1])


# ----------------------------------------------------------------------------------------------------------------
# Small file helpers
# ----------------------------------------------------------------------------------------------------------------


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a key given twice (a token listed twice in a vocab) is an error, not "the last one wins"."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r} appears twice in one object")
    return out


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a repeated key, deep nesting
        raise TokenizerFileError(f"{path}: not a valid JSON file ({type(e).__name__}: {e})") from None


def _token_id(value: Any, where: str) -> int:
    """A token id from a file: a non-negative int (JSON true/false and 5.0 are not ids)."""
    if type(value) is not int or value < 0:
        raise TokenizerFileError(f"{where}: expected a non-negative integer token id, got {value!r}")
    return value


def _check_id_range(ids: Iterable[int], n_tokens: int, where: str) -> None:
    """Ids may leave holes (cl100k's specials do) but no more unused ids than tokens: a larger id is corruption."""
    limit = 2 * n_tokens + 1024
    if (top := max(ids, default=-1)) >= limit:
        raise TokenizerFileError(
            f"{where}: token id {top} is beyond the vocabulary ({n_tokens} tokens: ids must be below {limit})"
        )


def _set_config_attrs(tok: Tokenizer, attrs: dict[str, Any]) -> Tokenizer:
    for name in _CONFIG_ATTRS:
        setattr(tok, name, attrs.get(name))
    return tok


# ----------------------------------------------------------------------------------------------------------------
# tiktoken rank files
# ----------------------------------------------------------------------------------------------------------------


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on `token`, using only the tokens of rank < max_rank: merge the lowest-ranked pair until none."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file into {token bytes: rank}, with errors naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"{path}: not a tiktoken rank file (non-ASCII byte at offset {e.start})") from None
    ranks: dict[bytes, int] = {}
    lines: dict[int, int] = {}  # rank -> line
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2 or not fields[1].isdigit() or not fields[1].isascii():
                raise ValueError("expected 'base64 rank', the rank a non-negative integer")
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error) as e:
            raise TokenizerFileError(f"{path}:{lineno}: not a tiktoken rank line ({e}): {line[:80]!r}") from None
        if not token:
            raise TokenizerFileError(f"{path}:{lineno}: empty token")
        if token in ranks:
            raise TokenizerFileError(f"{path}:{lineno}: token {token!r} appears twice")
        if rank in lines:
            raise TokenizerFileError(f"{path}:{lineno}: rank {rank} appears twice (also on line {lines[rank]})")
        ranks[token], lines[rank] = rank, lineno
    if not ranks:
        raise TokenizerFileError(f"{path}: empty tiktoken rank file")
    _check_id_range(ranks.values(), len(ranks), str(path))
    missing = next((b for b in range(256) if bytes([b]) not in ranks), None)
    if missing is not None:
        raise TokenizerFileError(f"{path}: no rank for the single byte {missing:#04x} (tiktoken needs all 256)")
    return ranks


def tokenizer_from_ranks(
    ranks: dict[bytes, int], pattern: str = CL100K_PATTERN, special_tokens: dict[str, int] | None = None
) -> Tokenizer:
    """Build a Tokenizer from tiktoken mergeable ranks: ids = ranks; merges recovered by BPE with lower ranks."""
    if len(set(ranks.values())) != len(ranks):
        raise ValueError("tiktoken ranks are not unique")
    vocab = {rank: token for token, rank in ranks.items()}
    merges: list[tuple[int, int]] = []
    for rank in sorted(vocab):
        token = vocab[rank]
        if len(token) < 2:
            continue
        parts = _bpe_parts(ranks, token, max_rank=rank)
        if len(parts) == 2:  # else the token cannot be reached by merges (tiktoken only reaches it as a whole piece)
            merges.append((ranks[parts[0]], ranks[parts[1]]))
    # tiktoken looks a whole pre-token up in the ranks first, which is the HF BPE option ignore_merges.
    return Tokenizer(vocab, merges, pattern, dict(special_tokens or {}), ignore_merges=True)


def load_tiktoken(
    path: str | Path, pattern: str = CL100K_PATTERN, special_tokens: dict[str, int] | None = None
) -> Tokenizer:
    """Load a ``.tiktoken`` rank file. The file has neither regex nor specials: pass them (cl100k's regex by default;
    cl100k's special tokens by default when the file has cl100k's 100,256 ranks, else none)."""
    ranks = read_tiktoken_ranks(path)
    if special_tokens is None:
        special_tokens = dict(CL100K_SPECIAL_TOKENS) if len(ranks) == 100256 else {}
    return tokenizer_from_ranks(ranks, pattern, special_tokens)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (+ tokenizer_config.json)
# ----------------------------------------------------------------------------------------------------------------


def _kind(obj: Any) -> str:
    return str(obj.get("type", "?")) if isinstance(obj, dict) else repr(obj)


def _split_rule(split: dict, where: str) -> SplitRule:
    """A tokenizer.json ``Split`` step: {"pattern": {"Regex": r} | {"String": s}, "behavior": ..., "invert": ...}."""
    pattern, behavior, invert = split.get("pattern"), split.get("behavior", "Isolated"), split.get("invert", False)
    if isinstance(pattern, dict) and isinstance(pattern.get("Regex"), str):
        regex_text, key = pattern["Regex"], "pattern.Regex"
    elif isinstance(pattern, dict) and isinstance(pattern.get("String"), str):
        regex_text, key = re.escape(pattern["String"]), "pattern.String"
    else:
        raise TokenizerFileError(f'{where}.pattern: expected {{"Regex": str}} or {{"String": str}}, got {pattern!r}')
    if behavior not in SPLIT_BEHAVIORS:
        raise TokenizerFileError(f"{where}.behavior: {behavior!r} is not one of {', '.join(SPLIT_BEHAVIORS)}")
    if not isinstance(invert, bool):
        raise TokenizerFileError(f"{where}.invert: expected true or false, got {invert!r}")
    try:
        return SplitRule(regex_text, behavior, invert, line_anchors=True)  # tokenizers' Oniguruma: ^ $ per line
    except ValueError as e:
        raise TokenizerFileError(f"{where}.{key}: {e}") from None


def _split_rule_from_pre_tokenizer(pre: Any, where: str) -> SplitRule:
    """The split rule of a byte-level pre-tokenizer: ByteLevel(use_regex=True) (GPT-2's regex), Sequence[Digits,
    ByteLevel] (one regex, `DIGITS_GPT2_PATTERN`) or Sequence[Split, ByteLevel(use_regex=False)] (the Split)."""
    where = f"{where}: pre_tokenizer"

    def byte_level(node: dict, use_regex: bool, at: str) -> None:
        if node.get("add_prefix_space", False):
            raise TokenizerFileError(f"{at}: ByteLevel pre-tokenizer with add_prefix_space=true is not supported")
        if node.get("use_regex", True) != use_regex:
            raise TokenizerFileError(
                f"{at}: ByteLevel pre-tokenizer with use_regex={not use_regex} is not supported here"
            )

    if isinstance(pre, dict) and pre.get("type") == "ByteLevel":
        byte_level(pre, True, where)
        return SplitRule(GPT2_PATTERN)
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers")
        if not isinstance(steps, list):
            raise TokenizerFileError(f"{where}.pretokenizers: expected a list of pre-tokenizers, got {steps!r}")
        kinds = [_kind(s) for s in steps]
        at = [f"{where}.pretokenizers[{i}]" for i in range(len(steps))]
        if kinds == ["ByteLevel"]:
            byte_level(steps[0], True, at[0])
            return SplitRule(GPT2_PATTERN)
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") is True:
            byte_level(steps[1], True, at[1])
            return SplitRule(DIGITS_GPT2_PATTERN)
        if kinds == ["Split", "ByteLevel"]:
            byte_level(steps[1], False, at[1])
            return _split_rule(steps[0], at[0])
        raise TokenizerFileError(
            f"{where}: unsupported pre-tokenizer Sequence[{', '.join(kinds)}] (lmforge reads ByteLevel "
            "or Sequence[Split, ByteLevel])"
        )
    raise TokenizerFileError(
        f"{where}: unsupported pre-tokenizer type {_kind(pre)} (lmforge reads byte-level BPE only)"
    )


def _check_tokenizer_json(data: Any, where: str) -> dict:
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise TokenizerFileError(f"{where}: not a tokenizer.json (no 'model' object)")
    model = data["model"]
    kind = model.get("type")
    if kind is None and "merges" in model:
        kind = "BPE"  # very old files leave the type out
    if kind != "BPE":
        raise TokenizerFileError(
            f"{where}: model type {kind} is not supported (lmforge reads byte-level BPE tokenizers only)"
        )
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise TokenizerFileError(f"{where}: BPE option {key}={model[key]!r} is not supported")
    if model.get("byte_fallback"):
        raise TokenizerFileError(
            f"{where}: BPE with byte_fallback (SentencePiece style) is not supported; lmforge is byte-level"
        )
    if model.get("dropout"):
        raise TokenizerFileError(f"{where}: BPE dropout={model['dropout']} is not supported")
    if not isinstance(model.get("ignore_merges", False), bool):
        raise TokenizerFileError(
            f"{where}: model.ignore_merges: expected true or false, got {model['ignore_merges']!r}"
        )
    normalizer = data.get("normalizer")
    if normalizer is not None and not (_kind(normalizer) == "Sequence" and not normalizer.get("normalizers")):
        raise TokenizerFileError(
            f"{where}: unsupported normalizer type {_kind(normalizer)} (lmforge applies no normalization)"
        )
    decoder = data.get("decoder")
    if decoder is not None and _kind(decoder) != "ByteLevel":
        raise TokenizerFileError(
            f"{where}: unsupported decoder type {_kind(decoder)} (lmforge decodes byte-level tokens)"
        )
    return model


def _added_tokens(entries: Iterable[tuple[str, Any]], warn_at: str) -> dict[str, int]:
    """Added tokens from ``(where, entry)`` pairs, entry ``{"id": int, "content": non-empty str, ...}``: content ->
    id; one content with two ids, or one id for two contents, is refused."""
    specials: dict[str, int] = {}
    by_id: dict[int, str] = {}
    for where, entry in entries:
        if not isinstance(entry, dict):
            raise TokenizerFileError(f"{where}: expected an object {{\"id\": ..., \"content\": ...}}, got {entry!r}")
        tid, content = _token_id(entry.get("id"), f"{where}.id"), entry.get("content")
        if not isinstance(content, str) or not content:
            raise TokenizerFileError(f"{where}.content: expected a non-empty string, got {content!r}")
        if by_id.get(tid, content) != content:
            raise TokenizerFileError(f"{where}: id {tid} is already the id of added token {by_id[tid]!r}")
        if specials.get(content, tid) != tid:
            raise TokenizerFileError(f"{where}: {content!r} is already added with id {specials[content]}")
        if any(entry.get(flag) for flag in ("lstrip", "rstrip", "single_word")):
            warnings.warn(
                f"{warn_at}: added token {content!r} has lstrip/rstrip/single_word set; lmforge matches it exactly",
                stacklevel=4,
            )
        specials[content], by_id[tid] = tid, content
    return specials


def _byte_level_vocab(
    entries: Iterable[tuple[Any, Any, Any]], specials: dict[str, int], where: Callable[[Any], str]
) -> dict[int, bytes]:
    """The vocabulary from ``(key, token text, id)`` triples, `where(key)` naming an entry in an error: ids valid
    and unique, tokens in the byte-level alphabet and unique. An entry repeating an added token (same text and id, as
    GPT-2's <|endoftext|>) is skipped; a different token on an added token's id is refused."""
    added_by_id = {i: s for s, i in specials.items()}
    to_bytes, _, outside = _byte_tables()
    vocab: dict[int, bytes] = {}
    seen: set[bytes] = set()
    for key, text, tid in entries:
        if type(tid) is not int or tid < 0:
            _token_id(tid, where(key))
        if not isinstance(text, str) or not text:
            raise TokenizerFileError(f"{where(key)}: expected a non-empty token string, got {text!r}")
        if tid in added_by_id:
            if added_by_id[tid] != text:
                raise TokenizerFileError(f"{where(key)}: id {tid} is the id of added token {added_by_id[tid]!r}")
            continue
        if tid in vocab:
            raise TokenizerFileError(f"{where(key)}: id {tid} is also the id of {_token_to_str(vocab[tid])!r}")
        if outside.search(text) is not None:
            _str_to_token(text, where(key))  # that error
        token = text.translate(to_bytes).encode("latin-1")
        if token in seen:
            raise TokenizerFileError(f"{where(key)}: token {text!r} appears twice in the vocabulary")
        vocab[tid] = token
        seen.add(token)
    return vocab


def _merge_ids(merges: Sequence[Any], vocab: dict[int, bytes], where: Callable[[int], str]) -> list[tuple[int, int]]:
    """Merges "left right" (or [left, right]) as id pairs: both parts and their concatenation must be tokens of
    `vocab`; `where(n)` names merge n in an error. Looked up as text in the byte-level alphabet (a character per
    byte, so the text of left + right is the concatenation of theirs): one dict lookup a part; a merge whose parts
    are both found is well formed (every key is a non-empty string), any other gets the check that names its
    problem."""
    to_str = _byte_tables()[1]
    ids = {token.decode("latin-1").translate(to_str): i for i, token in vocab.items()}
    out = []
    for n, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        try:
            left, right = pair
            a, b = ids.get(left), ids.get(right)
            if a is not None and b is not None and left + right in ids:
                out.append((a, b))
                continue
        except (TypeError, ValueError):  # not a pair, or unhashable parts: named below
            pass
        _bad_merge(merge, pair, where(n))
    return out


def _bad_merge(merge: Any, pair: Any, where: str) -> NoReturn:
    """The error for a merge `_merge_ids` could not look up."""
    if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
        raise TokenizerFileError(f"{where}: {merge!r} is not a pair of tokens")
    for part in pair:
        _str_to_token(part, where)  # a character outside the alphabet: that error
    raise TokenizerFileError(f"{where}: {merge!r} uses or makes a token that is not in the vocab")


def _build(
    vocab: dict[int, bytes],
    merges: list[tuple[int, int]],
    rule: SplitRule,
    specials: dict[str, int],
    ignore_merges: bool,
    where: str,
) -> Tokenizer:
    """The Tokenizer, once the id range and the text bytes are checked (see the module docstring)."""
    _check_id_range([*vocab, *specials.values()], len(vocab) + len(specials), where)
    singles = {b[0] for b in vocab.values() if len(b) == 1}
    missing = next((b for b in TEXT_BYTES if b not in singles), None)
    if missing is not None:
        raise TokenizerFileError(
            f"{where}: no token for the byte {missing:#04x} ({bytes_to_unicode()[missing]!r}): a byte-level "
            "vocabulary must hold every byte of plain text (printable ASCII, tab, newline, carriage return)"
        )
    return Tokenizer(vocab, merges, rule, specials, ignore_merges=ignore_merges)


# Bytes any text has: a vocabulary without one of them cannot encode ordinary text (refused at load). Real
# vocabularies may lack others (control bytes, bytes that never occur in UTF-8): those fail when encoded.
TEXT_BYTES = (0x09, 0x0A, 0x0D, *range(0x20, 0x7F))


def tokenizer_from_hf(
    data: dict, config: dict | None = None, where: str = "tokenizer.json", config_where: str = "tokenizer_config.json"
) -> Tokenizer:
    """Build a Tokenizer from a parsed tokenizer.json (and tokenizer_config.json) object; `where` and `config_where`
    name them in errors."""
    model = _check_tokenizer_json(data, where)
    rule = _split_rule_from_pre_tokenizer(data.get("pre_tokenizer"), where)
    added, vocab_json, merges = data.get("added_tokens") or [], model.get("vocab", {}), model.get("merges", [])
    expected = (("added_tokens", added, list), ("model.vocab", vocab_json, dict), ("model.merges", merges, list))
    for key, value, kind in expected:
        if not isinstance(value, kind):
            raise TokenizerFileError(f"{where}: {key}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    specials = _added_tokens(((f"{where}: added_tokens[{n}]", e) for n, e in enumerate(added)), where)
    entries = ((t, t, i) for t, i in vocab_json.items())
    vocab = _byte_level_vocab(entries, specials, lambda t: f"{where}: model.vocab[{t!r}]")
    pairs = _merge_ids(merges, vocab, lambda n: f"{where}: model.merges[{n}]")
    tok = _build(vocab, pairs, rule, specials, model.get("ignore_merges", False), f"{where}: model.vocab")
    return _set_config_attrs(tok, _attrs_from_config(config or {}, config_where))


def _token_content(value: Any, where: str) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, or an AddedToken dict {"content": ...}."""
    content = value.get("content") if isinstance(value, dict) else value
    if content is not None and not isinstance(content, str):
        raise TokenizerFileError(f'{where}: expected a string or {{"content": str}}, got {value!r}')
    return content


def _chat_template(value: Any, where: str) -> str | None:
    """chat_template: a string, or named templates [{"name": ..., "template": ...}] (the "default" one, else the
    first)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise TokenizerFileError(f"{where}: expected a string or a list of {{name, template}}, got {value!r}")
    named: dict[str, str] = {}
    for n, entry in enumerate(value):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("name", "template"))):
            raise TokenizerFileError(f'{where}[{n}]: expected {{"name": str, "template": str}}, got {entry!r}')
        named.setdefault(entry["name"], entry["template"])
    return named.get("default", next(iter(named.values()), None))


def _max_length(value: Any, where: str) -> int | None:
    """model_max_length: a positive number; transformers writes 1e30 for "unlimited" (None here)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:  # (NaN fails >=)
        raise TokenizerFileError(f"{where}: expected a positive number, got {value!r}")
    return None if value >= 1e20 else int(value)


def _attrs_from_config(config: dict, where: str = "tokenizer_config.json") -> dict[str, Any]:
    """The Tokenizer attributes from a tokenizer_config.json object, each field's type checked (`where`: its file)."""
    if not isinstance(config.get("add_bos_token", False), bool):
        raise TokenizerFileError(f"{where}: add_bos_token: expected true or false, got {config['add_bos_token']!r}")
    keys = ("bos_token", "eos_token", "eot_token", "pad_token", "unk_token")
    tokens = {key: _token_content(config.get(key), f"{where}: {key}") for key in keys}
    return {
        "chat_template": _chat_template(config.get("chat_template"), f"{where}: chat_template"),
        **tokens,
        "model_max_length": _max_length(config.get("model_max_length"), f"{where}: model_max_length"),
    }


def _read_config(directory: Path) -> tuple[dict, str]:
    """tokenizer_config.json (if any), with the template from chat_template.jinja (if any) taking precedence; and
    the name to give the config in errors."""
    config, path = {}, directory / "tokenizer_config.json"
    if path.exists():
        config = _read_json(path)
        if not isinstance(config, dict):
            raise TokenizerFileError(f"{path}: expected a JSON object")
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        try:
            config = {**config, "chat_template": jinja.read_text(encoding="utf-8")}
        except UnicodeDecodeError as e:
            raise TokenizerFileError(f"{jinja}: not UTF-8 text ({e})") from None
    return config, str(path)


def load_hf_tokenizer(path: str | Path) -> Tokenizer:
    """Load a Hugging Face tokenizer.json (a file, or a directory holding one plus tokenizer_config.json)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    data = _read_json(file)
    config, config_where = _read_config(file.parent)
    return tokenizer_from_hf(data, config, where=str(file), config_where=config_where)


# ----------------------------------------------------------------------------------------------------------------
# GPT-2 vocab.json + merges.txt
# ----------------------------------------------------------------------------------------------------------------


def _merges_txt(path: Path) -> list[tuple[str, str]]:
    """merges.txt as ``(where, "left right")`` pairs: an optional ``#version`` first line, then two tokens a line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"{path}: not UTF-8 text ({e})") from None
    merges = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        if len(line.split(" ")) != 2:
            raise TokenizerFileError(f"{path}:{lineno}: expected two tokens separated by a space, got {line!r}")
        merges.append((f"{path}:{lineno}", line))
    return merges


def _config_added_tokens(config: dict, vocab_json: dict, where: str) -> list[tuple[str, dict]]:
    """The special tokens of a vocab.json directory, as ``(where, entry)``: tokenizer_config.json's
    added_tokens_decoder entries marked special (keys are ids), then bos/eos/unk/pad tokens found in the vocab."""
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerFileError(f"{where}: added_tokens_decoder: expected an object {{id: token}}, got {decoder!r}")
    added: list[tuple[str, dict]] = []
    for key, entry in decoder.items():
        at = f"{where}: added_tokens_decoder[{key!r}]"
        if not (key.isascii() and key.isdigit()):
            raise TokenizerFileError(f"{at}: the key must be a token id")
        if not isinstance(entry, dict):
            raise TokenizerFileError(f'{at}: expected an object {{"content": ...}}, got {entry!r}')
        if entry.get("special", True):
            added.append((at, {**entry, "id": int(key)}))
    known = {e.get("content") for _, e in added}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        content = _token_content(config.get(key), f"{where}: {key}")
        if content is not None and content not in known and content in vocab_json:
            added.append((f"{where}: {key}", {"id": vocab_json[content], "content": content}))
            known.add(content)
    return added


def load_vocab_merges(directory: str | Path, pattern: str | SplitRule = GPT2_PATTERN) -> Tokenizer:
    """Load GPT-2 style ``vocab.json`` + ``merges.txt`` from `directory` (special tokens from a tokenizer_config.json
    beside them: its added_tokens_decoder entries marked special, and bos/eos/unk/pad tokens found in the vocab)."""
    directory = Path(directory)
    vocab_path = directory / "vocab.json"
    vocab_json = _read_json(vocab_path)
    if not isinstance(vocab_json, dict):
        raise TokenizerFileError(f"{vocab_path}: expected a JSON object {{token: id}}")
    merges = _merges_txt(directory / "merges.txt")
    config, config_where = _read_config(directory)
    specials = _added_tokens(_config_added_tokens(config, vocab_json, config_where), config_where)
    vocab = _byte_level_vocab(((t, t, i) for t, i in vocab_json.items()), specials, lambda t: f"{vocab_path}[{t!r}]")
    rule = pattern if isinstance(pattern, SplitRule) else SplitRule(pattern)
    pairs = _merge_ids([m for _, m in merges], vocab, lambda n: merges[n][0])
    tok = _build(vocab, pairs, rule, specials, False, str(vocab_path))
    return _set_config_attrs(tok, _attrs_from_config(config, config_where))


# ----------------------------------------------------------------------------------------------------------------
# Directory-level entry points
# ----------------------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path, **kwargs: Any) -> Tokenizer:
    """Load a tokenizer from a directory (tokenizer.json preferred, else vocab.json + merges.txt, else a single
    ``*.tiktoken`` file) or from a ``tokenizer.json`` / ``.tiktoken`` file. `kwargs` go to `load_tiktoken`
    (pattern, special_tokens) for rank files. ``tok.source`` is `path`, named by encode errors."""
    tok = _load_any(Path(path), **kwargs)
    tok.source = str(path)
    return tok


def _load_any(path: Path, **kwargs: Any) -> Tokenizer:
    if kwargs and not (path.suffix == ".tiktoken" or (path.is_dir() and not (path / "tokenizer.json").exists())):
        raise TypeError(f"load_tokenizer: {', '.join(kwargs)} only apply to .tiktoken rank files")
    if path.is_dir():
        if (path / "tokenizer.json").exists():
            return load_hf_tokenizer(path)
        if (path / "vocab.json").exists() or (path / "merges.txt").exists():
            return load_vocab_merges(path)
        ranks = sorted(path.glob("*.tiktoken"))
        if len(ranks) == 1:
            config, config_where = _read_config(path)
            return _set_config_attrs(load_tiktoken(ranks[0], **kwargs), _attrs_from_config(config, config_where))
        raise FileNotFoundError(
            f"{path}: no tokenizer found (looked for tokenizer.json, vocab.json + merges.txt, one *.tiktoken file)"
        )
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.suffix == ".tiktoken":
        return _set_config_attrs(load_tiktoken(path, **kwargs), {})
    if path.suffix == ".json":
        return load_hf_tokenizer(path)
    raise TokenizerFileError(
        f"{path}: unknown tokenizer file (expected a directory, a tokenizer.json or a .tiktoken file)"
    )
