"""Pre-tokenization: regex splitting, special tokens, exact chunking and parallel counting.

Byte-level BPE never merges across a *pre-token* boundary. A regex splits the text into pre-tokens
(words with their leading space, digit groups, punctuation runs, whitespace runs) and BPE then works
inside each pre-token separately. The patterns are the ones the reference tokenizers use:

- ``GPT2_PATTERN``: GPT-2 / r50k (tiktoken's form, with possessive quantifiers),
- ``CL100K_PATTERN``: GPT-4's cl100k (case-insensitive contractions, digits in groups of 1-3),
- ``LLAMA3_PATTERN``: Llama-3 (the cl100k rules as written in Llama-3's tokenizer.json),

and any other pattern the ``regex`` module accepts. Special tokens (``<|endoftext|>``) are cut out of
the text *before* the regex runs, so no pre-token, and hence no merge, ever spans one.

Split rules. A tokenizer.json ``Split`` pre-tokenizer is a pattern, a ``behavior`` and ``invert``; `SplitRule`
reproduces the ``tokenizers`` library exactly. The text is cut into *segments*, alternately the gaps between matches
and the matches (``invert`` swaps which are "matches"); every character lies in one segment, and empty segments are
dropped at the end. The behaviors then form the pre-tokens from the segments, for matches ``1``, ``2``, ``3``
(pattern ``\\d``) in ``"ab12c3"``::

    Isolated            every segment alone              ab | 1 | 2 | c | 3
    Removed             gaps only (matches dropped)      ab | c
    MergedWithPrevious  a match joins the segment before ab1 | 2 | c3      (a match after a match stays alone)
    MergedWithNext      a match joins the segment after  ab | 1 | 2c | 3
    Contiguous          runs of one kind joined          ab | 12 | c | 3

Matches are found as Oniguruma (``tokenizers``' regex engine) finds them: an empty match right where the previous
match ended is skipped, and the search goes on one character further. The built-in patterns match every character,
so there the rule is plain ``findall``: `SplitRule.split` takes that fast path whenever the matches cover the text.

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
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import regex

from lmforge.utils.pool import cpu_count, pool_context

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
def compile_pattern(pattern: str, flags: int = 0) -> regex.Pattern:
    """Compile a pre-tokenization pattern (cached; the workers compile it once too)."""
    return regex.compile(pattern, flags)


SPLIT_BEHAVIORS = ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous")


def _match_spans(pat: regex.Pattern, text: str) -> Iterator[tuple[int, int]]:
    """The matches of `pat` in `text` as Oniguruma's iterator gives them: an empty match at the end of the previous
    match is skipped (the search restarts one character later), every other match is taken."""
    pos, last_end, n = 0, -1, len(text)
    while pos <= n and (m := pat.search(text, pos)) is not None:
        start, end = m.span()
        if start == end == last_end:
            pos = end + 1
            continue
        yield start, end
        pos = last_end = end


def _segments(pat: regex.Pattern, text: str, invert: bool) -> list[tuple[int, int, bool]]:
    """``(start, end, is_match)`` for the gaps and matches of `text`, in order, covering every character."""
    out, prev = [], 0
    for start, end in _match_spans(pat, text):
        if start != prev:
            out.append((prev, start, invert))
        out.append((start, end, not invert))
        prev = end
    if prev != len(text):
        out.append((prev, len(text), invert))
    return out


def _join(segments: Iterable[tuple[int, int, bool]], behavior: str) -> list[list[int]]:
    """The ``[start, end]`` of each pre-token made from the segments by `behavior` (module docstring, "Split
    rules"); for MergedWithNext the caller passes the segments reversed (and gets the spans reversed)."""
    spans: list[list[int]] = []
    previous = False
    for start, end, is_match in segments:
        # Contiguous: a run of one kind; MergedWithPrevious (and MergedWithNext walking backwards): a match
        join = is_match == previous if behavior == "Contiguous" else is_match and not previous
        if join and spans:
            spans[-1][0], spans[-1][1] = min(spans[-1][0], start), max(spans[-1][1], end)
        else:
            spans.append([start, end])
        previous = is_match
    return spans


@dataclass(frozen=True)
class SplitRule:
    """A ``Split`` pre-tokenizer: `pattern` (a regex), `behavior` (one of `SPLIT_BEHAVIORS`) and `invert`.

    ``split(text)`` gives the pre-tokens, every character of the text kept except where ``Removed`` drops the
    matches (module docstring). The default, Isolated, equals ``findall`` for a pattern that matches every character.
    `line_anchors`: ``^`` and ``$`` match at every line start and end, as in Oniguruma (tokenizer.json patterns);
    else only at the ends of the text, as in tiktoken. (The built-in patterns give the same pieces either way. Other
    differences between the engines are not emulated: ``\\b`` and ``\\w`` treat joiners and combining marks
    differently.)
    """

    pattern: str
    behavior: str = "Isolated"
    invert: bool = False
    line_anchors: bool = False
    _compiled: regex.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.behavior not in SPLIT_BEHAVIORS:
            raise ValueError(f"split behavior {self.behavior!r} is not one of {', '.join(SPLIT_BEHAVIORS)}")
        if not isinstance(self.invert, bool):
            raise ValueError(f"split invert={self.invert!r} is not a bool")
        try:
            compiled = compile_pattern(self.pattern, regex.MULTILINE if self.line_anchors else 0)
        except (regex.error, TypeError) as e:
            raise ValueError(f"pre-tokenizer pattern {self.pattern!r} does not compile ({e})") from None
        object.__setattr__(self, "_compiled", compiled)

    @property
    def cuts_at_word_ends(self) -> bool:
        """Whether streams may be cut at word ends (`iter_pieces`): for Isolated, not inverted, the rule of the
        built-in patterns; the other behaviors join segments across such a cut, so their streams are cut only at
        special tokens."""
        return self.behavior == "Isolated" and not self.invert

    def split(self, text: str) -> list[str]:
        """The pre-tokens of `text` (no empty ones)."""
        pat = self._compiled
        if self.behavior == "Isolated" and not pat.groups:  # fast path: matches that cover the text are the pieces
            pieces = pat.findall(text)
            if "" not in pieces and sum(map(len, pieces)) == len(text):
                return pieces
        segments = _segments(pat, text, self.invert)
        if self.behavior == "Isolated":
            spans = [(s, e) for s, e, _ in segments]
        elif self.behavior == "Removed":
            spans = [(s, e) for s, e, is_match in segments if not is_match]
        elif self.behavior == "MergedWithNext":
            spans = _join(reversed(segments), self.behavior)[::-1]
        else:
            spans = _join(segments, self.behavior)
        return [text[s:e] for s, e in spans if e > s]


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
    cut_at_word_ends: bool = True,
) -> Iterator[tuple[str, str | None]]:
    """Stream ``"".join(chunks)`` as ``(piece, special_or_None)`` pairs, holding back only a short tail.

    Each piece can be pre-tokenized on its own and gives exactly the pre-tokens that the joined text
    gives in that range (see the module docstring); ``special`` is the special token that follows
    the piece, or None where the piece was cut at a word end. ``max_special_len`` is the length of
    the longest special token that must be seen whole (for ``check``, too). ``check(buffer)`` is
    called on each buffer of held-back text plus a new chunk: every occurrence of a special token in
    the joined text lies whole inside one of those buffers (used to reject disallowed specials).
    Memory is bounded by the chunk size plus the longest run of text without a word end. With
    ``cut_at_word_ends=False`` (split rules that join segments: `SplitRule.cuts_at_word_ends`) pieces end only at
    special tokens, which is exact for any rule; memory is then bounded by the longest text between two of them.
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
        if cut_at_word_ends and pos < limit:
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


def _count_batch(args: tuple[SplitRule, list[str]]) -> Counter[str]:
    rule, pieces = args
    counts: Counter[str] = Counter()
    for piece in pieces:
        counts.update(rule.split(piece))
    return counts


def count_pretokens(
    pattern: str | SplitRule,
    texts: Iterable[str] | None = None,
    files: Sequence[str | Path] | None = None,
    special_tokens: Sequence[str] = (),
    workers: int | None = None,
    batch_chars: int = BATCH_CHARS,
) -> Counter[str]:
    """``Counter`` of pre-tokens over the corpus, counted by ``workers`` processes (default: all cores).

    `pattern` is a regex (Isolated: ``findall`` for the built-in patterns) or a `SplitRule`. Files are cut into
    pieces at word ends (`iter_pieces`), so a rule that joins segments may see a segment split there: one place per
    chunk read, which changes the counts of a large corpus by a few pre-tokens at most.
    """
    rule = pattern if isinstance(pattern, SplitRule) else SplitRule(pattern)
    workers = workers or cpu_count()
    tasks = ((rule, b) for b in _batches(iter_corpus_pieces(texts, files, special_tokens), batch_chars))
    first = next(tasks, None)
    second = next(tasks, None) if first is not None else None
    total: Counter[str] = Counter()
    if second is None or workers <= 1:  # small corpus or one core: no processes
        for task in itertools.chain((first, second), tasks):
            if task is not None:
                total.update(_count_batch(task))
        return total
    with pool_context().Pool(workers) as pool:
        pending = []  # at most 2 tasks per worker in flight: memory stays bounded on huge corpora
        for task in itertools.chain((first, second), tasks):
            while len(pending) >= 2 * workers:
                total.update(pending.pop(0).get())
            pending.append(pool.apply_async(_count_batch, (task,)))
        for result in pending:
            total.update(result.get())
    return total
