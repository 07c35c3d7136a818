"""SentencePiece-style BPE: the "llama" vocabularies of GGUF files (Llama 1/2, Mistral, TinyLlama, ...).

Vocabulary. GGUF metadata lists the pieces (``tokenizer.ggml.tokens``, index = id), a float score for each
(``tokenizer.ggml.scores``) and a type for each (``tokenizer.ggml.token_type``: 1 normal, 2 unknown, 3 control,
4 user-defined, 5 unused, 6 byte). A piece is text in which "▁" (U+2581) stands for a space; ``<0x00>`` ..
``<0xFF>`` stand for single bytes. There is no merge list and no pre-tokenizer regex: the scores order the merges.

Encoding (llama.cpp's ``llm_tokenizer_spm``, as transformers rebuilds it from a GGUF file with a ``tokenizers``
BPE model, byte fallback and a ``Metaspace`` pre-tokenizer):

1. Special tokens. Control and user-defined pieces, and the pieces named by the bos/eos/unknown/padding ids, are
   ``special_tokens``; those allowed are cut out of the text first and emitted as their ids.
2. Normalization. In each remaining part, " " becomes "▁". The part at the very start of the text also gets a
   "▁" in front (``add_space_prefix``) unless it already starts with one: "Hi" -> "▁Hi", " Hi" -> "▁Hi".
3. Symbols. Each character is the piece that spells it. A character with no piece becomes its UTF-8 bytes as
   byte pieces (byte fallback), or, without byte pieces, the unknown piece (a run of such characters: one).
4. Merges. Every piece ``t = l + r`` whose halves ``l`` and ``r`` are both pieces gives a merge ``(l, r) -> t``.
   Repeatedly merge the adjacent pair whose merge ranks first, leftmost on ties, until no pair has a merge.
   The rank orders merges by the score of ``t`` (highest first), then by the length of ``l``, then of ``r``
   (longest first), then by the position of ``t`` in the vocabulary (transformers' ``generate_merges``).

   This is llama.cpp's "merge the adjacent pair whose concatenation is the piece with the highest score, leftmost
   on ties" whenever no two pieces share a score, as in a trained SentencePiece model (score = -rank). Worked
   example, pieces with scores ``a b c: -9, ab: -2, bc: -1``: "abc" -> "a bc" ("bc" scores higher than "ab").

Decoding joins the pieces, byte pieces as their byte and "▁" as " ", decodes UTF-8 (invalid bytes become U+FFFD)
and drops one leading space when ``add_space_prefix`` is on: the one step 2 added (transformers' ``Strip``).

Where the references disagree, lmforge follows transformers' GGUF tokenizer, which the tests compare against:

* Text that starts with a space gets no second "▁" (" Hi" -> "▁Hi", so it decodes to "Hi"); llama.cpp and
  SentencePiece give "▁▁Hi". Text after a special token gets no prefix; llama.cpp adds one.
* Merges with equal scores rank as in step 4; llama.cpp takes the leftmost pair.
* ``tokenizer.ggml.add_space_prefix = false`` is obeyed (as llama.cpp does); transformers ignores it.
* A character with neither a piece nor byte pieces becomes the unknown piece; transformers drops it.
* Invalid UTF-8 decodes with Python's replacement rule (one U+FFFD per maximal invalid run), not one per byte.

Speed. Merging runs on a linked list of symbols with a heap of candidate merges ``(rank, position)``, as in
``bpe.py``: O(n log n) for n characters. Results are cached per *segment*: the text is cut between two
characters ``x y`` when no merge target contains ``xy`` (then no symbol can ever span the cut, since every
symbol's text is a piece made of adjacent characters of the text), so each segment merges exactly as it would
inside the whole text. With a SentencePiece vocabulary the cuts fall before the "▁" that starts each word.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Collection, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Literal

import lmforge.tokenizer.pretokenize as pt
from lmforge.tokenizer.base import BaseTokenizer, IncrementalDecoder
from lmforge.tokenizer.bpe import merge_ranked
from lmforge.tokenizer.formats import TokenizerFileError

__all__ = ["SentencePieceIncrementalDecoder", "SentencePieceTokenizer", "gguf_vocab_keys", "sentencepiece_from_gguf"]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁": a space inside a piece
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # what tokenizers' ByteFallback decoder reads as one byte


def _merge_table(pieces: Sequence[str], scores: Sequence[float]) -> tuple[dict[tuple[int, int], int], list[int]]:
    """``(left id, right id) -> rank`` and ``rank -> merged id``, ranked as in step 4 of the module docstring.

    Like transformers, a piece listed twice keeps its last id and its first position in the ranking."""
    ids = {piece: i for i, piece in enumerate(pieces)}
    ranked = []
    for order, (piece, score) in enumerate(dict(zip(pieces, scores, strict=True)).items()):
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((-score, -k, k - len(piece), order, ids[left], ids[right], ids[piece]))
    ranked.sort()
    ranks = {(a, b): rank for rank, (*_, a, b, _merged) in enumerate(ranked)}
    return ranks, [merged for *_, merged in ranked]


class _SegmentCache(dict):
    """segment -> ids; a miss runs BPE. Bounded: emptied when it reaches ``size`` entries."""

    def __init__(self, bpe, size: int) -> None:
        super().__init__()
        self.bpe, self.size = bpe, size

    def __missing__(self, segment: str) -> list[int]:
        ids = self.bpe(segment)
        if len(self) >= self.size:
            self.clear()
        self[segment] = ids
        return ids


class SentencePieceTokenizer(BaseTokenizer):
    """A SentencePiece-style BPE tokenizer: ``pieces`` (index = id), a score and a type per piece.

    ``special_ids``: pieces matched as special tokens besides the control and user-defined ones (the GGUF
    loader passes the bos/eos/unknown/padding ids). ``unk_id``: the piece for characters with no piece and no
    byte pieces (default: the first piece of type unknown). It implements `BaseTokenizer`, as the byte-level
    `Tokenizer` does (``encode``, ``decode``, ``token_to_bytes``, ``special_tokens``, ``chat_template``, ...); its
    metadata (bos_token, chat_template, ...) is set by `sentencepiece_from_gguf`.
    """

    cache_size = 1 << 16  # segments kept in the encode cache

    def __init__(
        self,
        pieces: Sequence[str],
        scores: Sequence[float],
        types: Sequence[int] | None = None,
        *,
        add_space_prefix: bool = True,
        add_bos_token: bool = True,
        special_ids: Iterable[int] = (),
        unk_id: int | None = None,
    ) -> None:
        n = len(pieces)
        types = [NORMAL] * n if types is None else list(types)
        if len(scores) != n or len(types) != n:
            raise ValueError(f"{n} pieces need {n} scores and types, got {len(scores)} scores and {len(types)} types")
        self.pieces, self.scores, self.types = list(pieces), [float(s) for s in scores], types
        self.add_space_prefix, self.add_bos_token = add_space_prefix, add_bos_token
        self._ids = {piece: i for i, piece in enumerate(self.pieces)}  # a repeated piece: its last id
        wanted = {i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)} | set(special_ids)
        self.special_tokens = {self.pieces[i]: self._ids[self.pieces[i]] for i in sorted(wanted) if self.pieces[i]}
        if unk_id is None:
            unk_id = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
        self.unk_id = unk_id

        self._ranks, self._merged = _merge_table(self.pieces, self.scores)
        self._byte_ids = [self._ids.get(f"<0x{b:02X}>") for b in range(256)]
        # adjacent characters inside a piece that merging can build: the only places a cut is not safe
        self._joined = {p[k : k + 2] for p in {self.pieces[z] for z in self._merged} for k in range(len(p) - 1)}
        # unknown characters split the text too when they always become byte pieces that no merge uses
        fallback = set(self._byte_ids)
        self._cut_at_unknown = None not in fallback and not any(a in fallback or b in fallback for a, b in self._ranks)
        self._decoder = {i: self._piece_bytes(p) for i, p in enumerate(self.pieces)}
        self._cache = _SegmentCache(self._bpe, self.cache_size)

    @staticmethod
    def _piece_bytes(piece: str) -> bytes:
        if m := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        return piece.replace(SPACE, " ").encode("utf-8")

    def __getstate__(self) -> dict[str, Any]:  # pickle without the cache (worker processes rebuild it)
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache = _SegmentCache(self._bpe, self.cache_size)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, special_tokens={len(self.special_tokens)})"

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def get_vocab(self) -> dict[str, int]:
        """Piece -> id (pieces spell spaces as "▁"; byte pieces are "<0xXX>")."""
        return dict(self._ids)

    def id_to_token(self, id: int) -> str:
        return self.pieces[id]

    def token_to_id(self, token: bytes | str) -> int | None:
        """The id of a piece (str), or of the piece whose text is ``token`` (bytes; a single byte: its byte piece)."""
        if isinstance(token, str):
            return self._ids.get(token)
        try:
            found = self._ids.get(token.decode("utf-8").replace(" ", SPACE))
        except UnicodeDecodeError:
            found = None
        return self._byte_ids[token[0]] if found is None and len(token) == 1 else found

    def token_to_bytes(self, id: int) -> bytes:
        """What the piece stands for: a byte piece its byte, other pieces their text with "▁" as " "."""
        return self._decoder[id]

    def _symbols(self, segment: str) -> list[int]:
        """Step 3: one piece per character, else its byte pieces, else the unknown piece (once per run)."""
        ids = list(map(self._ids.get, segment))
        if None not in ids:
            return ids
        out: list[int] = []
        unknown_run = False  # the previous character became the unknown piece
        for ch, i in zip(segment, ids, strict=True):
            if i is not None:
                out.append(i)
            elif None not in (fallback := [self._byte_ids[b] for b in ch.encode("utf-8")]):
                out.extend(fallback)
            elif self.unk_id is None:
                raise ValueError(f"character {ch!r} has no piece, no byte pieces, and there is no unknown piece")
            else:
                if not unknown_run:
                    out.append(self.unk_id)
                unknown_run = True
                continue
            unknown_run = False
        return out

    def _bpe(self, segment: str) -> list[int]:
        """Step 4 on one segment: a heap of candidate merges over a linked list of symbols."""
        return merge_ranked(self._symbols(segment), self._ranks, self._merged)

    def _segments(self, text: str) -> list[str]:
        """Cut normalized text where no merge can join the two sides (module docstring, "Speed")."""
        joined = self._joined
        cuts = [i for i, pair in enumerate(map(str.__add__, text, text[1:]), 1) if pair not in joined]
        if not self._cut_at_unknown and not self._ids.keys() >= set(text):
            cuts = [i for i in cuts if text[i - 1] in self._ids and text[i] in self._ids]
        return [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]

    def _encode_part_into(self, part: str, at_start: bool, out: list[int]) -> None:
        """Steps 2-4 for text without special tokens; ``at_start``: it begins the whole text."""
        if not part:
            return
        part = part.replace(" ", SPACE)
        if at_start and self.add_space_prefix and not part.startswith(SPACE):
            part = SPACE + part
        start = len(out)
        try:
            for ids in map(self._cache.__getitem__, self._segments(part)):
                out.extend(ids)
        except UnicodeEncodeError:  # a lone surrogate reached byte fallback: fix the text as tiktoken does
            del out[start:]
            self._encode_part_into(pt.fix_surrogates(part), False, out)  # (the prefix is already in `part`)

    def encode(
        self,
        text: str,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """Text -> ids (no bos: see ``add_bos_token``), with tiktoken's rules for special tokens as in
        `Tokenizer.encode`: allowed ones become their ids, disallowed ones (default: all others) raise."""
        allowed, disallowed = self._specials(allowed_special, disallowed_special)
        self._check(text, disallowed)
        out: list[int] = []
        for k, (part, special) in enumerate(pt.split_on_specials(text, pt.special_regex(allowed))):
            self._encode_part_into(part, k == 0, out)
            if special is not None:
                out.append(self.special_tokens[special])
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids, special tokens treated as plain text."""
        out: list[int] = []
        self._encode_part_into(text, True, out)
        return out

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The pieces' bytes, joined (the prefix space included: see ``decode``)."""
        return b"".join(map(self._decoder.__getitem__, ids))

    def decode(self, ids: Sequence[int], errors: str = "replace") -> str:
        """Ids -> text, without the leading space that ``add_space_prefix`` adds when encoding."""
        text = self.decode_bytes(ids).decode("utf-8", errors)
        return text[1:] if self.add_space_prefix and text.startswith(" ") else text


class SentencePieceIncrementalDecoder(IncrementalDecoder):
    """`IncrementalDecoder` that also drops the prefix space: the pieces of a stream add up to ``decode(ids)``.

    The plain `IncrementalDecoder` adds up to ``decode_bytes(ids)`` decoded, which keeps that space: right for
    the continuation of a prompt (" time" after "Once upon a"), where the space is part of the text.
    """

    def __init__(self, tokenizer: SentencePieceTokenizer) -> None:
        super().__init__(tokenizer)
        self._at_start = tokenizer.add_space_prefix

    def _strip(self, text: str) -> str:
        if self._at_start and text:
            self._at_start = False
            return text[1:] if text[0] == " " else text
        return text

    def add(self, id: int) -> str:
        return self._strip(super().add(id))

    def flush(self) -> str:
        text = self._strip(super().flush())
        self._at_start = self.tokenizer.add_space_prefix
        return text


ROLES = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token", "eot": "eot_token"}


def _gguf_array(meta: dict[str, Any], key: str, where: str, ok, what: str, n: int | None) -> list | None:
    """``meta[key]`` (None when absent) checked to be a list of `n` items that pass `ok` (each: `what`)."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise TokenizerFileError(f"{where}: {key}: expected an array of {what}, got {type(value).__name__}")
    if n is not None and len(value) != n:
        raise TokenizerFileError(f"{where}: {key} has {len(value)} entries for {n} tokens")
    bad = next((i for i, v in enumerate(value) if not ok(v)), None)
    if bad is not None:
        raise TokenizerFileError(f"{where}: {key}[{bad}]: expected {what}, got {value[bad]!r}")
    return value


def _is_int(v: Any) -> bool:
    return type(v) is int


def gguf_vocab_keys(meta: dict[str, Any], where: str) -> tuple[list[str], list[int] | None, dict[str, int]]:
    """The checked vocabulary keys every GGUF tokenizer has: tokenizer.ggml.tokens (a non-empty array of unique
    strings), tokenizer.ggml.token_type (ints, one per token, optional) and the role ids (``bos_token`` ... ->
    id, from ``tokenizer.ggml.{bos,eos,unknown,padding,eot}_token_id``). A role id that is not a token is ignored
    with a warning, as llama.cpp does; one that is not an integer is refused."""
    key = "tokenizer.ggml.tokens"
    tokens = _gguf_array(meta, key, where, lambda v: isinstance(v, str), "a string", None)
    if not tokens:
        raise TokenizerFileError(f"{where}: {key} is missing or empty")
    first: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if first.setdefault(token, i) != i:
            raise TokenizerFileError(f"{where}: {key}[{i}]: token {token!r} repeats {key}[{first[token]}]")
    n = len(tokens)
    types = _gguf_array(meta, "tokenizer.ggml.token_type", where, _is_int, "an integer token type", n)
    named: dict[str, int] = {}
    for role, attr in ROLES.items():
        key = f"tokenizer.ggml.{role}_token_id"
        tid = meta.get(key)
        if tid is None:
            continue
        if type(tid) is not int:
            raise TokenizerFileError(f"{where}: {key}: expected an integer token id, got {tid!r}")
        if 0 <= tid < n:
            named[attr] = tid
        else:
            warnings.warn(f"{where}: {key}={tid!r} is not a token id (0..{n - 1}); ignored", stacklevel=3)
    for key in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix"):
        if not isinstance(meta.get(key, False), bool):
            raise TokenizerFileError(f"{where}: {key}: expected a bool, got {meta[key]!r}")
    if not isinstance(meta.get("tokenizer.chat_template", ""), str):
        raise TokenizerFileError(f"{where}: tokenizer.chat_template: expected a string")
    return tokens, types, named


def _is_score(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def sentencepiece_from_gguf(meta: dict[str, Any], where: str) -> SentencePieceTokenizer:
    """The tokenizer of GGUF metadata with ``tokenizer.ggml.model == "llama"`` (keys checked: `gguf_vocab_keys`, and
    tokenizer.ggml.scores: one number per token, not NaN)."""
    pieces, types, named = gguf_vocab_keys(meta, where)
    key = "tokenizer.ggml.scores"
    if key not in meta:
        raise TokenizerFileError(f"{where}: {key} is missing: a 'llama' vocabulary orders its merges by score")
    scores = _gguf_array(meta, key, where, _is_score, "a number", len(pieces))
    tok = SentencePieceTokenizer(
        pieces,
        scores,
        types,
        add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix", True),
        add_bos_token=meta.get("tokenizer.ggml.add_bos_token", True),
        special_ids=named.values(),
        unk_id=named.get("unk_token"),
    )
    for attr, tid in named.items():
        setattr(tok, attr, pieces[tid])
    tok.chat_template = meta.get("tokenizer.chat_template")
    return tok
