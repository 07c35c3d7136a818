"""Byte-level BPE: training, encoding and decoding (the GPT-2 / GPT-4 / Llama-3 family).

Vocabulary. Token ids 0..255 are the single bytes; every merge adds one token. A *merge* ``(a, b)`` of
rank ``r`` says: wherever token ``a`` is followed by token ``b`` inside one pre-token, they may be
replaced by the token whose bytes are ``bytes(a) + bytes(b)``; a lower rank merges first. A trained
vocabulary of size V with S special tokens holds 256 bytes, V - 256 - S merges (ids 256..) and the
special tokens after them (ids V - S..V - 1).

Training (Sennrich et al. 2016, byte-level as in GPT-2). Pre-tokenize the corpus and count each
distinct pre-token w (its count is c(w)); each word starts as its UTF-8 bytes. The count of a pair is

    count(a, b) = sum over words w of c(w) * (number of adjacent (a, b) in w).

Repeat: take the pair with the largest count (ties: the lexicographically greatest
``(bytes(a), bytes(b))``), give ``bytes(a) + bytes(b)`` the next id z, and replace each occurrence of
``a b`` in each word, left to right, by z. A pair whose bytes already form a token is skipped: it
would give a second id to the same bytes (a guard; real corpora have not been seen to need it).

Incremental update. A full recount costs O(corpus) per merge. But replacing ``x a b y`` by ``x z y``
in a word of count c only changes the pairs that touch the occurrence:

    count(x, a) -= c   count(b, y) -= c   count(x, z) += c   count(z, y) += c

(with x the *already merged* left neighbour, so that ``a b a b`` -> ``z z`` is counted right), and
``count(a, b)`` drops to zero. We keep ``pair -> count`` and ``pair -> set of words that contain it``,
so a merge touches only the words in its set. The best pair comes from a max-heap with lazy
deletion: counts only grow when a pair is born (it contains the new token z), so an entry is pushed
then; when a popped entry's count is stale (too high) it is pushed back with the current count.

Encoding. Split the text at the allowed special tokens, pre-tokenize each part (the tokenizer's
`SplitRule`: a regex, by default Isolated, which for the built-in regexes is ``findall``), and encode each
pre-token through a cache (most pre-tokens repeat). A cache miss runs BPE on the pre-token's bytes:
its parts form a doubly linked list and a heap holds candidate merges ``(rank, position)``; pop the
lowest rank (the leftmost on ties), skip it if either part has changed since it was pushed (lazy
invalidation), merge, and push the two new pairs with the neighbours: O(n log n) for n bytes. This is
the same result as "repeatedly merge the lowest-ranked adjacent pair".

Decoding concatenates token bytes and decodes UTF-8, replacing invalid sequences; ``IncrementalDecoder``
(``base.py``) does the same one token at a time without ever splitting a character. What `Tokenizer` shares with
the SentencePiece tokenizer (tiktoken's special-token rules, batches, chat templates, decoding) is written once in
`lmforge.tokenizer.base.BaseTokenizer`, the interface it implements.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

import lmforge.tokenizer.pretokenize as pt
import lmforge.tokenizer.writers as writers
from lmforge.tokenizer.base import BaseTokenizer
from lmforge.tokenizer.base import IncrementalDecoder as IncrementalDecoder  # re-exported: its home before base.py
from lmforge.utils.errors import LmforgeError


def merge_ranked(parts: list[int | None], ranks: dict[tuple[int, int], int], merged: list[int]) -> list[int]:
    """Merge adjacent pairs of `parts` best rank first (leftmost on ties) until none has a rank; `merged[rank]` is
    the id a merge makes. A heap of candidate merges over a linked list of parts (O(n log n) for n parts) that
    works in `parts` itself (the caller's fresh list)."""
    n = len(parts)
    heap = [
        (r, i, parts[i], parts[i + 1]) for i in range(n - 1) if (r := ranks.get((parts[i], parts[i + 1]))) is not None
    ]
    if not heap:
        return parts
    heapq.heapify(heap)
    nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
    while heap:
        rank, i, a, b = heapq.heappop(heap)
        j = nxt[i]
        if parts[i] != a or j >= n or parts[j] != b:  # a part changed since the entry was pushed
            continue
        z = parts[i] = merged[rank]
        parts[j] = None
        k = nxt[i] = nxt[j]
        if k < n:
            prv[k] = i
            if (r := ranks.get((z, parts[k]))) is not None:
                heapq.heappush(heap, (r, i, z, parts[k]))
        if (p := prv[i]) >= 0 and (r := ranks.get((parts[p], z))) is not None:
            heapq.heappush(heap, (r, p, parts[p], z))
    return [t for t in parts if t is not None]


def _descending(token: bytes) -> bytes:
    """A key that sorts byte strings in reverse: s < t exactly when key(s) > key(t).

    Byte c becomes (1, 255 - c) and the string ends with 2, which beats any (1, ...) so that a prefix
    sorts after the longer string. Keys are self-delimiting, so key(a) + key(b) orders pairs too.
    """
    return bytes(v for c in token for v in (1, 255 - c)) + b"\x02"


def _learn_merges(counts: dict[str, int], n_merges: int, progress: bool) -> list[tuple[int, int]]:
    """The merges of BPE training on pre-token counts, with incremental pair counts (module docstring).

    A word is kept as a str with one character per token (``chr(id)``), and a pair as a 2-character
    str: ``str.replace`` then merges every occurrence of a pair, left to right, at C speed. The heap
    holds ``(-count, descending bytes key, pair)``: a min-heap pops the largest count, ties going to
    the greatest ``(bytes(a), bytes(b))``.
    """
    vocab = [bytes([i]) for i in range(256)]
    keys = [_descending(t) for t in vocab]
    known = set(vocab)
    words, freqs = [], []
    for piece, c in counts.items():
        try:
            data = piece.encode("utf-8")
        except UnicodeEncodeError:
            data = pt.fix_surrogates(piece).encode("utf-8")
        if len(data) > 1:
            words.append(data.decode("latin-1"))  # byte i -> chr(i)
            freqs.append(c)
    pair_counts: dict[str, int] = defaultdict(int)
    where: dict[str, set[int]] = defaultdict(set)
    for wi, word in enumerate(words):
        c = freqs[wi]
        for pair in map(str.__add__, word, word[1:]):
            pair_counts[pair] += c
            where[pair].add(wi)
    heap = [(-c, keys[ord(p[0])] + keys[ord(p[1])], p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    bar = tqdm(total=n_merges, desc="BPE merges", unit="merge", disable=not progress)
    while heap and len(merges) < n_merges:
        neg, key, ab = heapq.heappop(heap)
        count = pair_counts.get(ab, 0)
        if count != -neg:  # stale entry: the count went down since it was pushed
            if count > 0:
                heapq.heappush(heap, (-count, key, ab))
            continue
        a, b = ord(ab[0]), ord(ab[1])
        if (merged := vocab[a] + vocab[b]) in known:
            continue
        z = chr(len(vocab))
        vocab.append(merged)
        keys.append(_descending(merged))
        known.add(merged)
        merges.append((a, b))
        bar.update()
        del pair_counts[ab]
        delta: dict[str, int] = defaultdict(int)
        for wi in where.pop(ab):
            old = words[wi]
            words[wi] = new = old.replace(ab, z)
            if len(new) == len(old):  # the word no longer holds the pair (sets are cleaned lazily)
                continue
            c = freqs[wi]
            j = new.find(z)
            while j >= 0:  # each z replaced "a b"; x z y was x a b y (x may be a z itself: "a b a b")
                if j > 0:
                    x = new[j - 1]
                    delta[x + z] += c
                    delta[ab[1] + ab[0] if x == z else x + ab[0]] -= c
                    where[x + z].add(wi)
                if j + 1 < len(new) and (y := new[j + 1]) != z:
                    delta[z + y] += c
                    delta[ab[1] + y] -= c
                    where[z + y].add(wi)
                j = new.find(z, j + 1)
        for pair, d in delta.items():
            if d == 0 or pair == ab:
                continue
            count = pair_counts[pair] = pair_counts[pair] + d
            if not count:
                del pair_counts[pair]
            elif z in pair:  # a new pair: the only kind whose count grows
                heapq.heappush(heap, (-count, keys[ord(pair[0])] + keys[ord(pair[1])], pair))
    bar.close()
    return merges


def train_bpe(
    texts: Iterable[str] | None = None,
    files: Sequence[str | Path] | None = None,
    vocab_size: int = 8192,
    pattern: str | pt.SplitRule = pt.GPT2_PATTERN,
    special_tokens: Sequence[str] = (),
    progress: bool = True,
    workers: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``files`` and/or ``texts`` (each one document).

    ``vocab_size`` counts the 256 bytes, the merges and the special tokens. Training stops early
    (a smaller vocabulary) if no pair is left to merge. ``workers`` processes count pre-tokens
    (default: all cores). ``pattern``: the pre-tokenizer regex, or a `SplitRule` (regex, behavior, invert).
    """
    specials = list(dict.fromkeys(special_tokens))
    if "" in specials:
        raise ValueError("special tokens must not be empty")
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is smaller than 256 byte tokens + {len(specials)} special tokens")
    if texts is None and not files:
        raise ValueError("train_bpe needs texts or files")
    counts = pt.count_pretokens(pattern, texts, files, specials, workers)
    merges = _learn_merges(counts, vocab_size - 256 - len(specials), progress)
    vocab = {i: bytes([i]) for i in range(256)}
    for z, (a, b) in enumerate(merges, start=256):
        vocab[z] = vocab[a] + vocab[b]
    n = 256 + len(merges)
    return Tokenizer(vocab, merges, pattern, {s: n + i for i, s in enumerate(specials)})


class _PieceCache(dict):
    """pre-token str -> ids; a miss runs BPE. Bounded: emptied when it reaches ``size`` entries."""

    def __init__(self, bpe, size: int) -> None:
        super().__init__()
        self.bpe, self.size = bpe, size

    def __missing__(self, piece: str) -> list[int]:
        ids = self.bpe(piece.encode("utf-8"))  # a lone surrogate raises UnicodeEncodeError here
        if len(self) >= self.size:
            self.clear()
        self[piece] = ids
        return ids


METADATA = (
    "chat_template", "bos_token", "eos_token", "pad_token", "unk_token", "model_max_length", "eot_token",
    "add_bos_token",
)  # fmt: skip


def _rebuild(vocab, merges, pattern: str | pt.SplitRule, special_tokens, ignore_merges, meta) -> Tokenizer:
    tok = Tokenizer(vocab, merges, pattern, special_tokens, ignore_merges=ignore_merges)
    for key, value in meta.items():
        setattr(tok, key, value)
    return tok


class Tokenizer(BaseTokenizer):
    """A byte-level BPE tokenizer: ``vocab`` (id -> bytes), ranked ``merges``, a ``pattern``, specials.

    ``vocab`` ids need not be contiguous nor follow merge order (imported vocabularies); the merge
    ``(left, right)`` produces the id whose bytes are ``vocab[left] + vocab[right]``. ``special_tokens``
    maps text to id. With ``ignore_merges`` (Llama-3), a pre-token that is itself in the vocabulary
    is emitted as that one token. ``pattern`` is the pre-tokenizer regex (Isolated: every match and
    every gap between matches is a pre-token) or a whole `SplitRule`; ``split_rule`` is the rule,
    ``pattern`` its regex. Treat the attributes as read-only: lookups are built from them here.
    """

    cache_size = 1 << 16  # pre-tokens kept in the encode cache
    # the metadata (chat_template, bos_token, ...: `BaseTokenizer`) is set from tokenizer_config.json by
    # lmforge.tokenizer.formats

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: list[tuple[int, int]],
        pattern: str | pt.SplitRule,
        special_tokens: dict[str, int] | None = None,
        *,
        ignore_merges: bool = False,
    ) -> None:
        self.split_rule = pattern if isinstance(pattern, pt.SplitRule) else pt.SplitRule(pattern)
        self.vocab, self.merges, self.pattern = dict(vocab), [tuple(m) for m in merges], self.split_rule.pattern
        self.special_tokens, self.ignore_merges = dict(special_tokens or {}), ignore_merges
        self._bytes_to_id = {b: i for i, b in sorted(self.vocab.items(), reverse=True)}  # shared bytes: lowest id
        self._byte_ids = [self._bytes_to_id.get(bytes([i])) for i in range(256)]
        self._ranks: dict[tuple[int, int], int] = {}
        self._merged: list[int] = []
        vocab, bytes_to_id, ranks, merged = self.vocab, self._bytes_to_id, self._ranks, self._merged
        for rank, pair in enumerate(self.merges):
            a, b = pair
            if a not in vocab or b not in vocab:
                raise ValueError(f"merge {rank} ({a}, {b}) uses an id that is not in the vocabulary")
            z = bytes_to_id.get(vocab[a] + vocab[b])
            if z is None:
                raise ValueError(f"merge {rank} ({a}, {b}): {vocab[a] + vocab[b]!r} is not in the vocabulary")
            ranks.setdefault(pair, rank)
            merged.append(z)
        self._split = self.split_rule.split
        self._decoder = dict(self.vocab) | {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self._special_by_id = {i: s for s, i in self.special_tokens.items()}
        self._cache = _PieceCache(self._bpe, self.cache_size)

    def __reduce__(self):  # pickle the definition and metadata, not the cache
        meta = {k: getattr(self, k) for k in METADATA if getattr(self, k) is not None}
        return _rebuild, (self.vocab, self.merges, self.split_rule, self.special_tokens, self.ignore_merges, meta)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and tokenizer.tiktoken into ``directory``."""
        writers.save_tokenizer(self, directory)

    def __repr__(self) -> str:
        n, specials = len(self.merges), len(self.special_tokens)
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={n}, special_tokens={specials})"

    @property
    def vocab_size(self) -> int:
        """1 + the largest id (ordinary or special)."""
        return 1 + max(max(self.vocab, default=-1), max(self.special_tokens.values(), default=-1))

    def get_vocab(self) -> dict[bytes | str, int]:
        """Token -> id: ``bytes`` keys for ordinary tokens, ``str`` keys for special tokens."""
        return dict(self._bytes_to_id) | self.special_tokens

    def token_to_bytes(self, id: int) -> bytes:
        return self._decoder[id]

    def id_to_token(self, id: int) -> bytes | str:
        """The token's bytes, or its text for a special token."""
        return self._special_by_id[id] if id in self._special_by_id else self.vocab[id]

    def token_to_id(self, token: bytes | str) -> int | None:
        return self.special_tokens.get(token) if isinstance(token, str) else self._bytes_to_id.get(token)

    def _bpe(self, data: bytes) -> list[int]:
        """BPE on one pre-token: heap of candidate merges over a linked list of parts (module docstring)."""
        if self.ignore_merges and data in self._bytes_to_id:
            return [self._bytes_to_id[data]]
        ids = [self._byte_ids[b] for b in data]
        if None in ids:
            raise LmforgeError(
                f"{self.source or 'tokenizer'}: cannot encode {data[:40]!r}: byte {data[ids.index(None)]:#04x} has "
                "no token in this vocabulary"
            )
        return merge_ranked(ids, self._ranks, self._merged)

    def _encode_ordinary_into(self, text: str, out: list[int]) -> None:
        """Append the ids of ``text`` (no special tokens) to ``out``: pre-tokenize, then look up the cache."""
        start, extend = len(out), out.extend
        try:
            for ids in map(self._cache.__getitem__, self._split(text)):
                extend(ids)
        except UnicodeEncodeError:  # lone surrogates: fix the text as tiktoken does, then start over
            del out[start:]
            for ids in map(self._cache.__getitem__, self._split(pt.fix_surrogates(text))):
                extend(ids)

    def encode(
        self,
        text: str,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """Text -> ids, with tiktoken's rules: specials in ``allowed_special`` become their ids, those in
        ``disallowed_special`` (default: every other special) raise ValueError, the rest are plain text."""
        allowed, disallowed = self._specials(allowed_special, disallowed_special)
        self._check(text, disallowed)
        out: list[int] = []
        for part, special in pt.split_on_specials(text, pt.special_regex(allowed)):
            self._encode_ordinary_into(part, out)
            if special is not None:
                out.append(self.special_tokens[special])
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids, special tokens treated as plain text."""
        out: list[int] = []
        self._encode_ordinary_into(text, out)
        return out

    def encode_iterable(
        self,
        chunks: Iterable[str],
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> Iterator[int]:
        """Stream ids of ``"".join(chunks)``, identical to ``encode`` of the joined text, in bounded memory
        (the chunks are cut only where the pre-tokens cannot change: see ``pretokenize.iter_pieces``;
        a split rule other than Isolated is cut only at special tokens).
        A disallowed special token raises when it is reached, after the ids before it were yielded."""
        allowed, disallowed = self._specials(allowed_special, disallowed_special)
        check = (lambda buf: self._check(buf, disallowed)) if disallowed else None
        longest = max(map(len, allowed | disallowed), default=0)
        pieces = pt.iter_pieces(
            pt.valid_unicode(chunks), pt.special_regex(allowed), longest, check, self.split_rule.cuts_at_word_ends
        )
        for piece, special in pieces:
            out: list[int] = []
            self._encode_ordinary_into(piece, out)
            yield from out
            if special is not None:
                yield self.special_tokens[special]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(map(self._decoder.__getitem__, ids))
