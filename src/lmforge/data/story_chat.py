"""Conversations about the grammar's stories (`data.stories`), with exact answers: the speedrun's chat stage.

Every story of the grammar opens by naming its hero and the hero's animal, and may say where the hero went or
lived, what the hero found and how many things the hero saw. Those facts are read back from the text with the
grammar's own templates (`story_facts`), so each question below has exactly one right answer, written in a
fixed form:

    Who is the story about?                    Mia.
    What kind of animal is Mia?                Mia is a fox.
    Where did Mia go? / Where did Mia live?    Mia went to the river. / Mia lived near the river.
    What did Mia find?                         Mia found a red ball.        (when the story says so)
    How many apples did Mia see?               Mia saw three apples.        (when the story says so)

A conversation is one user turn (the story, a blank line, the question) and the assistant's answer
(`conversations`); `questions_about` lists every question a story supports. Answering needs reading the story,
not memorising: the facts are drawn independently of each other, so held-out stories (another seed) measure
whether the model learnt to look them up. Exact match of the answer is the score.
"""

from __future__ import annotations

import random
import re
from typing import Any

from lmforge.data.stories import stories

__all__ = ["conversations", "questions_about", "story_facts"]

_OPENINGS = (
    re.compile(r"^Once upon a time, there was a \w+ (?P<animal>\w+) named (?P<name>\w+)\."),
    re.compile(r"^One \w+, (?P<name>\w+) the (?P<animal>\w+) went to the (?P<went>\w+)\."),
    re.compile(r"^(?P<name>\w+) was a \w+ (?P<animal>\w+) who lived near the (?P<lived>\w+)\."),
)
_FOUND = re.compile(r"\b(?:She|He) found a (?P<found>\w+ \w+) and felt")
_SAW = re.compile(r"\b(?:She|He) saw (?P<count>\w+) (?P<things>\w+) under a tree\.")


def story_facts(text: str) -> dict[str, str]:
    """The facts a story states: name, animal, and when present went / lived (a place), found (the first thing
    found), count and things (the first sighting)."""
    opening = next((m for p in _OPENINGS if (m := p.match(text))), None)
    if opening is None:
        raise ValueError(f"not a story of the grammar: {text[:60]!r}")
    facts = {k: v for k, v in opening.groupdict().items() if v is not None}
    for pattern in (_FOUND, _SAW):
        if (m := pattern.search(text)) is not None:
            facts |= m.groupdict()
    return facts


def questions_about(text: str) -> list[tuple[str, str]]:
    """(question, exact answer) for every fact the story states (module docstring)."""
    f = story_facts(text)
    name = f["name"]
    qa = [("Who is the story about?", f"{name}."), (f"What kind of animal is {name}?", f"{name} is a {f['animal']}.")]
    if "went" in f:
        qa.append((f"Where did {name} go?", f"{name} went to the {f['went']}."))
    if "lived" in f:
        qa.append((f"Where did {name} live?", f"{name} lived near the {f['lived']}."))
    if "found" in f:
        qa.append((f"What did {name} find?", f"{name} found a {f['found']}."))
    if "count" in f:
        qa.append((f"How many {f['things']} did {name} see?", f"{name} saw {f['count']} {f['things']}."))
    return qa


def conversations(seed: int, n: int, max_chars: int = 400) -> list[dict[str, Any]]:
    """`n` conversations ({"messages": [user, assistant]}) about stories of `stories(seed, ...)` at most
    `max_chars` long, one question each, drawn uniformly among those its story supports."""
    rng, out = random.Random(seed), []
    for story in stories(seed, 1 << 62):
        if len(out) == n:
            break
        if len(story.text) > max_chars:
            continue
        question, answer = rng.choice(questions_about(story.text))
        out.append({"messages": [{"role": "user", "content": f"{story.text}\n\n{question}"},
                                 {"role": "assistant", "content": answer}]})  # fmt: skip
    return out
