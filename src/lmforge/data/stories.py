"""A synthetic corpus whose true entropy is known: children's stories from a probabilistic grammar.

The grammar is a probabilistic context-free grammar (PCFG): every symbol <X> has weighted alternatives, each a
sequence of literal text and symbols. Generating a story draws one alternative per symbol, so the probability
of a story is the product of the probabilities of its choices:

    log2 P(story) = sum over choices c of log2 p(c)

The grammar is *unambiguous*: every text it can produce has exactly one derivation (tests/data/test_stories.py
parses thousands of samples with an independent chart parser and finds one parse each, with the same
probability). So P(text) = P(derivation), and the corpus' entropy rate is

    H = sum over stories of -log2 P(story)  /  sum over stories of UTF-8 bytes      (bits per byte)

(the end of a story is a choice too: the document separator's bytes are counted by the caller, see
`write_corpus`). No model can beat H on held-out stories in expectation, so validation bits per byte
minus H is exactly how much a model has left to learn.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.utils.atomic import atomic_path

Alternative = tuple[float, tuple[str, ...]]  # (weight, parts); a part "<x>" is a symbol, anything else literal text
_SYMBOL = re.compile(r"<[a-z_]+>")


def _alts(*options: str | tuple[float, str]) -> list[Alternative]:
    """Alternatives from template strings ("a <x> b"), optionally weighted; weights are normalised."""
    weighted = [o if isinstance(o, tuple) else (1.0, o) for o in options]
    total = sum(w for w, _ in weighted)
    return [(w / total, _parts(t)) for w, t in weighted]


def _parts(template: str) -> tuple[str, ...]:
    """ "a <x> b" -> ("a ", "<x>", " b")."""
    out, pos = [], 0
    for m in _SYMBOL.finditer(template):
        if m.start() > pos:
            out.append(template[pos : m.start()])
        out.append(m.group())
        pos = m.end()
    if pos < len(template):
        out.append(template[pos:])
    return tuple(out)


HEROES = {"she": ("Lily", "Mia", "Zoe", "Ada"), "he": ("Max", "Sam", "Ben", "Leo")}


def _grammar() -> dict[str, list[Alternative]]:
    """The story grammar. The hero (and so the pronoun of every later sentence) is chosen first: one copy of
    the story symbols per pronoun keeps the grammar context-free while the story stays consistent."""
    g: dict[str, list[Alternative]] = {"<story>": _alts(*(f"<story_{h}>" for h in HEROES))}
    for h, names in HEROES.items():
        she = h.capitalize()
        g |= {
            f"<story_{h}>": _alts(f"<opening_{h}> <middle_{h}><ending_{h}>"),
            f"<name_{h}>": _alts(*names),
            f"<opening_{h}>": _alts(
                f"Once upon a time, there was a <size> <animal> named <name_{h}>.",
                f"One <time_of_day>, <name_{h}> the <animal> went to the <place>.",
                f"<name_{h}> was a <size> <animal> who lived near the <place>.",
            ),
            # the number of middle sentences is geometric: another one with probability 0.6
            f"<middle_{h}>": _alts((0.6, f"<event_{h}> <middle_{h}>"), (0.4, f"<event_{h}> ")),
            f"<event_{h}>": _alts(
                f"{she} found a <color> <thing> and felt <feeling>.",
                f"{she} met a <animal> who wanted to play.",
                'The <animal> said, "<saying>"',
                f"It was <weather>, so {h} stayed by the <place>.",
                f"{she} saw <count> <plural_thing> under a tree.",
            ),
            f"<ending_{h}>": _alts(
                "In the end, everyone was <feeling>.",
                f"From that day on, {h} loved the <place>.",
                "The end.",
            ),
        }
    return g | {
        "<size>": _alts("little", "big", "tiny", "brave", "sleepy"),
        "<animal>": _alts("cat", "dog", "fox", "bird", "bear", "rabbit", "frog", "duck"),
        "<time_of_day>": _alts("morning", "evening", "night", "afternoon"),
        "<place>": _alts("river", "forest", "park", "garden", "hill", "lake"),
        "<color>": _alts("red", "blue", "green", "yellow", "shiny"),
        "<thing>": _alts("ball", "stone", "leaf", "box", "hat", "key"),
        "<plural_thing>": _alts("apples", "flowers", "shells", "acorns"),
        "<count>": _alts("two", "three", "four", "five"),
        "<feeling>": _alts("happy", "sad", "proud", "surprised", "calm"),
        "<weather>": _alts("sunny", "rainy", "windy", "cold"),
        "<saying>": _alts("Let us be friends!", "I am hungry.", "Look at the sky!", "Where is my home?"),
    }


GRAMMAR = _grammar()
START = "<story>"


@dataclass(frozen=True)
class Story:
    text: str
    log2_prob: float  # log2 P(text): the sum of the log2 probabilities of every choice made


def sample_story(rng: random.Random, grammar: dict[str, list[Alternative]] = GRAMMAR) -> Story:
    """Draw one story (iteratively: the geometric <middle> recursion never grows the Python stack)."""
    out: list[str] = []
    log2p = 0.0
    stack = [START]
    while stack:
        part = stack.pop()
        if part not in grammar:
            out.append(part)
            continue
        alternatives = grammar[part]
        weights = [w for w, _ in alternatives]
        i = rng.choices(range(len(alternatives)), weights=weights)[0] if len(alternatives) > 1 else 0
        log2p += math.log2(weights[i])
        stack.extend(reversed(alternatives[i][1]))
    return Story("".join(out), log2p)


def stories(seed: int, n: int) -> Iterator[Story]:
    rng = random.Random(seed)
    for _ in range(n):
        yield sample_story(rng)


def parse_count(text: str, grammar: dict[str, list[Alternative]] = GRAMMAR) -> tuple[int, float]:
    """(number of derivations of `text` from START, their total probability): an independent chart parser.

    inside(X, i) = {j: (derivations of text[i:j] from X, their probability)}, by memoised recursion over
    the alternatives; literal parts must match the text exactly."""
    import functools
    import sys

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    @functools.cache
    def inside(symbol: str, i: int) -> dict[int, tuple[int, float]]:
        result: dict[int, tuple[int, float]] = {}
        for weight, parts in grammar[symbol]:
            spans = {i: (1, weight)}
            for part in parts:
                nxt: dict[int, tuple[int, float]] = {}
                for pos, (count, prob) in spans.items():
                    if part in grammar:
                        ends = inside(part, pos).items()
                    else:
                        ends = [(pos + len(part), (1, 1.0))] if text.startswith(part, pos) else []
                    for end, (c, p) in ends:
                        old = nxt.get(end, (0, 0.0))
                        nxt[end] = (old[0] + count * c, old[1] + prob * p)
                spans = nxt
            for end, (count, prob) in spans.items():
                old = result.get(end, (0, 0.0))
                result[end] = (old[0] + count, old[1] + prob)
        return result

    return inside(START, 0).get(len(text), (0, 0.0))


def write_corpus(directory: str | Path, n_stories: int, seed: int = 0, per_file: int = 1000) -> dict[str, float]:
    """Write `n_stories` stories as text files of `per_file` stories each, one story per line.

    Returns {"stories", "bytes", "bits", "bits_per_byte"}: bytes count each story and its newline (the
    separator is forced, so it costs no bits: its information is in the grammar's stop choice)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    total_bits = total_bytes = 0.0
    batch: list[str] = []
    index = 0
    for story in stories(seed, n_stories):
        batch.append(story.text + "\n")
        total_bits -= story.log2_prob
        total_bytes += len(story.text.encode("utf-8")) + 1
        if len(batch) == per_file:
            index = _write_batch(directory, index, batch)
            batch = []
    if batch:
        _write_batch(directory, index, batch)
    return {"stories": n_stories, "bytes": total_bytes, "bits": total_bits, "bits_per_byte": total_bits / total_bytes}


def _write_batch(directory: Path, index: int, batch: list[str]) -> int:
    with atomic_path(directory / f"stories_{index:05d}.txt") as tmp:
        tmp.write_text("".join(batch), encoding="utf-8")
    return index + 1
