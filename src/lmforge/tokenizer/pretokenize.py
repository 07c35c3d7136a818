"""Pre-tokenization: regex splitting, special tokens, exact chunking and parallel counting.

Byte-level BPE never merges across a *pre-token* boundary. A regex splits the text into pre-tokens
(words with their leading space, digit groups, punctuation runs, whitespace runs) and BPE then works
inside each pre-token separately. The patterns are the ones the reference tokenizers use:

- ``GPT2_PATTERN``: GPT-2 / r50k (tiktoken's form, with possessive quantifiers),
- ``CL100K_PATTERN``: GPT-4's cl100k (case-insensitive contractions, digits in groups of 1-3),
- ``LLAMA3_PATTERN``: Llama-3 (the cl100k rules as written in Llama-3's tokenizer.json),

and any other pattern the ``regex`` module accepts. Special tokens (``<|endoftext|>``) are cut out of
the text *before* the regex runs, so no pre-token, and hence no merge, ever spans one.

Exact chunking. Training reads files in blocks and ``Tokenizer.encode_iterable`` reads a stream in
chunks, yet both must see exactly the pre-tokens of the whole text. A cut at an arbitrary place can
change the pre-tokens on both sides of it (``"don't"`` cut after ``"don'"``; a whitespace run cut in
the middle; ``\\s*[\\r\\n]`` looking far ahead). We cut only where the result cannot depend on the
text that follows:

1. at a special token (the text is split there anyway), or
2. at a *word end*: a letter followed by a non-letter, or a digit followed by a non-digit.

For the three built-in patterns no pre-token continues across a word end, and no alternative looks
past the character that ends the word, so the pre-tokens before the cut are final and matching
restarts cleanly after it. (A custom pattern that lets a pre-token run on from a letter into a
non-letter, like o200k's ``word's``, can be cut inexactly there.) Special tokens are found with the
longest one winning at a given position; a chunk keeps the last ``max_special_len - 1`` characters back
so that a special token split between two chunks is still seen whole.

Parallel counting. Training only needs ``count[pre-token]``. The corpus is cut (as above) into batches
of about ``batch_chars`` characters; worker processes pre-tokenize batches and count with
``collections.Counter``; the main process adds the counters up. Files are read ``chunk_chars``
characters at a time, so memory stays bounded by the batches in flight, not by the corpus size.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import regex

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)
# tokenizers' Sequence[Digits(individual_digits=True), ByteLevel] (SmolLM, StarCoder) as one regex: every
# digit alone, and a whitespace run that ends before a digit kept whole (there it ended its segment).
DIGITS_GPT2_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++|\s++(?:$|(?=\p{N}))|\s+(?!\S)|\s"""

# Reverse search ((?r)) for the last word end before a limit: m.end() is the cut position.
_WORD_END = regex.compile(r"(?r)\p{L}(?=\P{L})|\p{N}(?=\P{N})")

CHUNK_CHARS = 1 << 20  # characters read from a file at a time
BATCH_CHARS = 1 << 18  # characters per counting task sent to a worker


@functools.lru_cache(maxsize=32)
def compile_pattern(pattern: str) -> regex.Pattern:
    """Compile a pre-tokenization pattern (cached; the workers compile it once too)."""
    return regex.compile(pattern)


@functools.lru_cache(maxsize=64)
def special_regex(tokens: frozenset[str] | tuple[str, ...]) -> regex.Pattern | None:
    """A regex matching any of ``tokens`` literally, longest first (so ``<|a|>b`` beats ``<|a|>``)."""
    tokens = sorted({t for t in tokens if t}, key=lambda s: (-len(s), s))
    if not tokens:
        return None
    return regex.compile("|".join(regex.escape(t) for t in tokens))


def fix_surrogates(text: str) -> str:
    """What tiktoken does to a str that is not valid Unicode: join surrogate pairs, replace lone surrogates."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def valid_unicode(chunks: Iterable[str]) -> Iterator[str]:
    """``fix_surrogates`` applied to a stream (a surrogate pair may be split between two chunks)."""
    carry = ""
    for chunk in chunks:
        chunk, carry = carry + chunk, ""
        if chunk and "\ud800" <= chunk[-1] <= "\udbff":  # a high surrogate: its pair may come next
            chunk, carry = chunk[:-1], chunk[-1]
        try:
            chunk.encode("utf-8")
        except UnicodeEncodeError:
            chunk = fix_surrogates(chunk)
        yield chunk
    if carry:
        yield fix_surrogates(carry)


def split_on_specials(text: str, special_re: regex.Pattern | None) -> Iterator[tuple[str, str | None]]:
    """Split ``text`` at special tokens: yields ``(ordinary_text, special_or_None)`` pairs in order."""
    start = 0
    if special_re is not None:
        for m in special_re.finditer(text):
            yield text[start : m.start()], m.group()
            start = m.end()
    yield text[start:], None


def iter_pieces(
    chunks: Iterable[str],
    special_re: regex.Pattern | None,
    max_special_len: int = 0,
    check: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, str | None]]:
    """Stream ``"".join(chunks)`` as ``(piece, special_or_None)`` pairs, holding back only a short tail.

    Each piece can be pre-tokenized on its own and gives exactly the pre-tokens that the joined text
    gives in that range (see the module docstring); ``special`` is the special token that follows
    the piece, or None where the piece was cut at a word end. ``max_special_len`` is the length of
    the longest special token that must be seen whole (for ``check``, too). ``check(buffer)`` is
    called on each buffer of held-back text plus a new chunk: every occurrence of a special token in
    the joined text lies whole inside one of those buffers (used to reject disallowed specials).
    Memory is bounded by the chunk size plus the longest run of text without a word end.
    """
    hold = max(max_special_len - 1, 0)
    buf = ""
    for chunk in chunks:
        if not chunk:
            continue
        buf += chunk
        if check is not None:
            check(buf)
        limit = len(buf) - hold  # a special token starting before `limit` is visible whole
        pos = 0
        if special_re is not None:
            for m in special_re.finditer(buf):
                if m.start() >= limit:
                    break
                yield buf[pos : m.start()], m.group()
                pos = m.end()
        if pos < limit:
            m = _WORD_END.search(buf, pos, limit)
            if m is not None:
                yield buf[pos : m.end()], None
                pos = m.end()
        buf = buf[pos:]
    yield from split_on_specials(buf, special_re)


def read_chunks(path: str | Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Read a UTF-8 text file ``chunk_chars`` characters at a time, line endings untouched (CRLF stays)."""
    with open(path, encoding="utf-8", newline="") as f:
        while True:
            try:
                chunk = f.read(chunk_chars)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not valid UTF-8 text: {e}") from None
            if not chunk:
                return
            yield chunk


def iter_corpus_pieces(
    texts: Iterable[str] | None = None,
    files: Sequence[str | Path] | None = None,
    special_tokens: Sequence[str] = (),
    chunk_chars: int = CHUNK_CHARS,
) -> Iterator[str]:
    """The ordinary text of a corpus as independent pieces, special tokens removed.

    Each file and each text of ``texts`` is one document: pre-tokens never span two documents.
    """
    special_re = special_regex(tuple(special_tokens))
    max_len = max(map(len, special_tokens), default=0)
    if isinstance(texts, str):
        texts = [texts]
    for path in files or ():
        if not Path(path).is_file():
            raise FileNotFoundError(f"training file not found: {path}")

    def documents() -> Iterator[Iterable[str]]:
        for path in files or ():
            yield read_chunks(path, chunk_chars)
        for text in texts or ():
            yield (text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars))

    for doc in documents():
        for piece, _special in iter_pieces(doc, special_re, max_len):
            if piece:
                yield piece


def _batches(pieces: Iterable[str], batch_chars: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _count_batch(args: tuple[str, list[str]]) -> Counter[str]:
    pattern, pieces = args
    findall = compile_pattern(pattern).findall
    counts: Counter[str] = Counter()
    for piece in pieces:
        counts.update(findall(piece))
    return counts


def cpu_count() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds (spawn would re-import torch through lmforge/__init__).
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


_SHARED: tuple = ()


def _init_shared(*shared) -> None:
    global _SHARED
    _SHARED = shared


def _call_shared(fn_item: tuple[Callable, object]):
    fn, item = fn_item
    return fn(item, *_SHARED)


def map_in_pool(fn: Callable, items: Sequence, workers: int, *shared) -> list:
    """``[fn(item, *shared) for item in items]`` in ``workers`` processes; ``shared`` is sent once per worker."""
    with _pool_context().Pool(min(workers, len(items)), _init_shared, shared) as pool:
        return pool.map(_call_shared, [(fn, item) for item in items], chunksize=max(1, len(items) // (4 * workers)))


def count_pretokens(
    pattern: str,
    texts: Iterable[str] | None = None,
    files: Sequence[str | Path] | None = None,
    special_tokens: Sequence[str] = (),
    workers: int | None = None,
    batch_chars: int = BATCH_CHARS,
) -> Counter[str]:
    """``Counter`` of pre-tokens over the corpus, counted by ``workers`` processes (default: all cores)."""
    workers = workers or cpu_count()
    tasks = ((pattern, b) for b in _batches(iter_corpus_pieces(texts, files, special_tokens), batch_chars))
    first = next(tasks, None)
    second = next(tasks, None) if first is not None else None
    total: Counter[str] = Counter()
    if second is None or workers <= 1:  # small corpus or one core: no processes
        for task in itertools.chain((first, second), tasks):
            if task is not None:
                total.update(_count_batch(task))
        return total
    with _pool_context().Pool(workers) as pool:
        pending = []  # at most 2 tasks per worker in flight: memory stays bounded on huge corpora
        for task in itertools.chain((first, second), tasks):
            while len(pending) >= 2 * workers:
                total.update(pending.pop(0).get())
            pending.append(pool.apply_async(_count_batch, (task,)))
        for result in pending:
            total.update(result.get())
    return total
