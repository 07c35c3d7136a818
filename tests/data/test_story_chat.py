"""Conversations about the grammar's stories (data/story_chat.py): every answer is a fact the story states.

Oracle: hand-written stories of each opening and event, and stories of the grammar (each parsed to its one
derivation): every answer names the hero and is made of the story's own words."""

from __future__ import annotations

import pytest

from lmforge.data.stories import parse_count, stories
from lmforge.data.story_chat import conversations, questions_about, story_facts


def test_each_opening_and_event_gives_its_questions():
    story = ("One morning, Leo the bear went to the hill. He found a blue key and felt proud. He saw two shells "
             "under a tree. He found a red hat and felt calm. The end.")  # fmt: skip
    assert questions_about(story) == [
        ("Who is the story about?", "Leo."), ("What kind of animal is Leo?", "Leo is a bear."),
        ("Where did Leo go?", "Leo went to the hill."), ("What did Leo find?", "Leo found a blue key."),
        ("How many shells did Leo see?", "Leo saw two shells."),
    ]  # fmt: skip
    assert story_facts("Zoe was a tiny duck who lived near the lake. The end.") == {
        "name": "Zoe", "animal": "duck", "lived": "lake"}  # fmt: skip
    assert story_facts("Once upon a time, there was a sleepy cat named Max. The end.") == {
        "name": "Max", "animal": "cat"}  # fmt: skip
    with pytest.raises(ValueError, match="not a story of the grammar"):
        story_facts("To be, or not to be.")


def test_the_facts_are_the_storys_own_words():
    for story in stories(7, 300):
        assert parse_count(story.text)[0] == 1  # a story of the grammar (one derivation)
        facts = story_facts(story.text)
        assert facts["name"] in story.text.split(".")[0] and facts["animal"] in story.text.split(".")[0]
        for _, answer in questions_about(story.text):
            assert answer.startswith(facts["name"]) and answer.endswith(".")
            assert all(word in story.text for word in answer.rstrip(".").split()[1:] if word not in ("is", "a"))


def test_conversations_are_deterministic_short_and_answerable():
    a, b = conversations(3, 50), conversations(3, 50)
    assert a == b and a != conversations(4, 50) and len(a) == 50
    for c in a:
        user, assistant = c["messages"]
        story, question = user["content"].split("\n\n")
        assert len(story) <= 400 and (question, assistant["content"]) in questions_about(story)
        assert (user["role"], assistant["role"]) == ("user", "assistant")
