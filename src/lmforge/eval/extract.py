"""Answer extraction for generation tasks: what a model's free text answers, compared to the target exactly.

* ``number`` (math word problems): the content of the last ``\\boxed{...}`` (braces balanced) when there is one,
  else the last number in the text. A number is ``-?digits`` with optional ``,`` thousands separators and an
  optional decimal part; it is normalised: separators dropped, a decimal part of zeros dropped (``1,200.00`` ->
  ``1200``), a leading ``+`` dropped.
* ``letter`` (multiple choice answered in words): the chosen option letter (A-Z, capital), the first found of:
  ``answer is X`` / ``answer: X`` (any case, X optionally in parentheses), ``(X)``, an ``X`` that starts the text
  followed by ``.``, ``)``, ``:`` or the end, then any standalone capital letter other than ``I``.
* ``none``: the text stripped of surrounding whitespace.

Nothing found gives ``UNKNOWN`` ("unknown"), which matches no target. exact_match is then extracted == target
(the target stripped, and passed through the same number normalisation for ``number``).
"""

from __future__ import annotations

import re

__all__ = [
    "EXTRACTORS", "UNKNOWN", "extract", "extract_letter", "extract_number", "last_boxed", "normalize_number",
    "normalize_target",
]  # fmt: skip

UNKNOWN = "unknown"
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
LETTER_PATTERNS = (
    re.compile(r"(?i:answer\s*(?:is|:))\s*\(?([A-Z])\b"),
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"^\s*([A-Z])(?:[.):]|\s*$)"),
    re.compile(r"\b([A-HJ-Z])\b"),
)


def normalize_number(text: str) -> str:
    """``1,200.00`` -> ``1200``, ``+3`` -> ``3``, ``-0.50`` -> ``-0.50`` (only an all-zero decimal part goes)."""
    text = text.replace(",", "").lstrip("+")
    whole, dot, frac = text.partition(".")
    return whole if dot and not frac.strip("0") else text


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, braces inside balanced; None when there is none (or unclosed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i].strip()
    return None


def extract_number(text: str) -> str:
    """The boxed answer, else the last number, normalised; UNKNOWN when there is neither."""
    boxed = last_boxed(text)
    if boxed is not None:
        return normalize_number(boxed) if NUMBER.fullmatch(boxed) else boxed
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else UNKNOWN


def extract_letter(text: str) -> str:
    """The chosen option letter (module docstring for the order of the rules); UNKNOWN when none."""
    for pattern in LETTER_PATTERNS:
        if found := pattern.search(text):
            return found.group(1).upper()
    return UNKNOWN


EXTRACTORS = {"number": extract_number, "letter": extract_letter, "none": str.strip}


def extract(text: str, how: str) -> str:
    """The answer `text` gives, by rule `how` (number, letter or none)."""
    return EXTRACTORS[how](text)


def normalize_target(target: str, how: str) -> str:
    """The target as an extracted answer is compared to it: stripped (and normalised as a number for ``number``)."""
    target = target.strip()
    return normalize_number(target) if how == "number" and NUMBER.fullmatch(target) else target
