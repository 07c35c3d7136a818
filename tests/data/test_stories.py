"""The story grammar: unambiguous (so its recorded log-probabilities are the texts' true probabilities)."""

from __future__ import annotations

import math
import random

import pytest

from lmforge.data.stories import GRAMMAR, parse_count, sample_story, stories, write_corpus


def test_every_sampled_story_has_exactly_one_derivation_with_the_recorded_probability():
    rng = random.Random(1)
    for _ in range(300):
        story = sample_story(rng)
        count, prob = parse_count(story.text)
        assert count == 1, story.text
        assert math.log2(prob) == pytest.approx(story.log2_prob, abs=1e-9)


def test_the_parser_can_see_ambiguity_and_non_stories():
    ambiguous = {"<story>": [(0.5, ("<a>", "<a>")), (0.5, ("ab",))], "<a>": [(0.5, ("a",)), (0.5, ("b",))]}
    assert parse_count("ab", ambiguous) == (2, 0.5 + 0.125)  # "ab" directly, or <a>="a" then <a>="b"
    assert parse_count("Once upon a time.")[0] == 0


def test_grammar_is_well_formed():
    for symbol, alternatives in GRAMMAR.items():
        assert sum(w for w, _ in alternatives) == pytest.approx(1.0), symbol
        for _, parts in alternatives:
            assert all(p in GRAMMAR for p in parts if p.startswith("<") and p.endswith(">")), (symbol, parts)
    texts = [s.text for s in stories(seed=3, n=200)]
    assert texts == [s.text for s in stories(seed=3, n=200)] and texts != [s.text for s in stories(seed=4, n=200)]
    she = [t for t in texts if t.startswith(("Lily", "Mia", "Zoe", "Ada"))]
    assert she and all(" He " not in t and " he " not in t for t in she)  # the pronoun follows the hero


def test_write_corpus_reports_the_entropy_of_what_it_wrote(tmp_path):
    stats = write_corpus(tmp_path, n_stories=2500, seed=5, per_file=1000)
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["stories_00000.txt", "stories_00001.txt", "stories_00002.txt"]
    lines = [line for f in files for line in f.read_text().splitlines()]
    assert len(lines) == 2500 and lines == [s.text for s in stories(seed=5, n=2500)]
    assert stats["bytes"] == sum(f.stat().st_size for f in files)
    bits = -sum(s.log2_prob for s in stories(seed=5, n=2500))
    assert stats["bits"] == pytest.approx(bits) and stats["bits_per_byte"] == pytest.approx(bits / stats["bytes"])
    assert 0.1 < stats["bits_per_byte"] < 0.4  # measured 0.21
