"""Answer extraction (eval/extract.py) on hand-written generations."""

from __future__ import annotations

import pytest

from lmforge.eval.extract import UNKNOWN, extract, last_boxed, normalize_number, normalize_target


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (" 12 + 7 = 19", "19"),  # the last number
        ("She has 3 left, so the answer is 3.", "3"),  # the sentence's full stop is not a decimal point
        ("That costs 1,200.00 dollars", "1200"),  # separators and a zero decimal part dropped
        ("It is -4 degrees", "-4"),
        ("about 2.50 each", "2.50"),  # a real decimal part stays
        ("first 5 then \\boxed{42} and 7 more", "42"),  # a boxed answer beats the last number
        ("\\boxed{1} then \\boxed{ 8 }", "8"),  # the last box, stripped
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{3,000}", "3000"),  # a boxed number normalised
        ("an unclosed \\boxed{12 and 5", "5"),  # no whole box: the last number
        ("I do not know.", UNKNOWN),
        ("", UNKNOWN),
    ],
)
def test_number(text, want):
    assert extract(text, "number") == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("The answer is (C).", "C"),
        ("answer: B because", "B"),
        ("ANSWER IS D", "D"),
        (" B. Hamlet", "B"),  # a letter that starts the text
        ("(A) Macbeth", "A"),
        ("A", "A"),
        ("I think it is D", "D"),  # "I" is a word, not a choice
        ("A good guess is the answer is C", "C"),  # an explicit "answer is" beats an article
        ("the answer is a mystery", UNKNOWN),  # a lower-case word is not a letter
        ("no idea", UNKNOWN),
    ],
)
def test_letter(text, want):
    assert extract(text, "letter") == want


def test_none_strips():
    assert extract("  Hamlet \n", "none") == "Hamlet"


def test_helpers():
    assert normalize_number("+1,000.0") == "1000"
    assert normalize_number("0.05") == "0.05"
    assert last_boxed("no box") is None
    assert normalize_target(" 1,000 ", "number") == "1000"
    assert normalize_target(" Hamlet ", "none") == "Hamlet"
