"""Prompts and few-shot examples (eval/prompts.py): hand-written prompt strings, and the draws of lm-eval's own
samplers (`lm_eval.api.samplers.ContextSampler`, `FirstNSampler`) as the oracle."""

from __future__ import annotations

import pytest

from lmforge.eval import prompts
from lmforge.eval.taskspec import load_spec

QA = [{"q": f"question {i}", "a": f"answer {i}", "options": ["yes", "no", "maybe"], "label": i % 3} for i in range(7)]
TRAIN = [{"q": f"example {i}", "a": f"shot {i}", "options": ["red", "blue", "green"], "label": i % 3}
         for i in range(5)]  # fmt: skip


def test_prompt_with_first_n_examples_hand_written(make_spec):
    spec = load_spec(make_spec(QA, TRAIN, output_type="generate_until", doc_to_text="Q: {{q}}\nA:", doc_to_target="a",
                               fewshot_config={"sampler": "first_n"}, description="Answer briefly.\n"))  # fmt: skip
    examples = prompts.FewshotSampler(spec).sample(2, QA[0])
    assert prompts.context(spec, QA[0], examples) == (
        "Answer briefly.\nQ: example 0\nA: shot 0\n\nQ: example 1\nA: shot 1\n\nQ: question 0\nA:"
    )


def test_multiple_choice_shots_answer_with_the_gold_choice(make_spec):
    spec = load_spec(make_spec(QA, TRAIN, output_type="multiple_choice", doc_to_text="{{q}}?", doc_to_choice="options",
                               doc_to_target="{{label}}", target_delimiter=" -> ", fewshot_delimiter="\n"))  # fmt: skip
    assert prompts.doc_to_target(spec, TRAIN[2]) == 2  # a template rendering digits is an index
    assert prompts.context(spec, QA[1], [TRAIN[1], TRAIN[2]]) == "example 1? -> blue\nexample 2? -> green\nquestion 1?"


def test_target_rules(make_spec):
    rows = [{"q": "x", "n": 7, "many": ["a", "b"], "empty": ""}]
    spec = load_spec(make_spec(rows, output_type="generate_until", doc_to_text="q", doc_to_target="n"))
    assert prompts.doc_to_target(spec, rows[0]) == 7  # a field: its value as it is
    spec = load_spec(make_spec(rows, output_type="generate_until", doc_to_text="q", doc_to_target="{{n}}"))
    assert prompts.doc_to_target(spec, rows[0]) == "7"  # digits stay text without choices
    spec = load_spec(make_spec(rows, output_type="generate_until", doc_to_text="q", doc_to_target="{{many}}"))
    assert prompts.doc_to_target(spec, rows[0]) == ["a", "b"]  # a rendered list: several targets
    spec = load_spec(make_spec(rows, output_type="generate_until", doc_to_text="{{q}}!", doc_to_target="empty"))
    assert prompts.shot(spec, rows[0]) == "x!"  # an empty target: the text alone, no delimiters


@pytest.mark.parametrize("exclude", [False, True])
def test_default_sampler_draws_as_lm_eval(make_spec, exclude):
    from lm_eval.api.samplers import ContextSampler

    keys = {"output_type": "generate_until", "doc_to_text": "q", "doc_to_target": "a"}
    path = make_spec(QA, None, fewshot_split="test", **keys) if exclude else make_spec(QA, TRAIN, **keys)
    spec = load_spec(path)
    assert spec.exclude_eval_doc is exclude
    ours = prompts.FewshotSampler(spec, seed=1234)
    theirs = ContextSampler(list(spec.fewshot_docs), rnd=1234)
    for doc in QA:  # one generator for the task: each doc's draw follows the one before
        got = ours.sample(3, doc)
        assert got == list(theirs.sample(3, eval_doc=doc if exclude else None))
        assert (doc not in got) or not exclude
    assert prompts.FewshotSampler(spec, seed=1).sample(3, QA[0]) != prompts.FewshotSampler(spec).sample(3, QA[0])


def test_first_n_sampler_as_lm_eval(make_spec):
    from lm_eval.api.samplers import FirstNSampler

    spec = load_spec(make_spec(QA, None, fewshot_split="test", output_type="generate_until", doc_to_text="q",
                               doc_to_target="a", fewshot_config={"sampler": "first_n"}))  # fmt: skip
    theirs = FirstNSampler(list(spec.fewshot_docs))
    for doc in QA[:3]:
        assert prompts.FewshotSampler(spec).sample(2, doc) == theirs.sample(2, eval_doc=doc)  # the doc left out


def test_too_many_shots_names_the_pool(make_spec):
    spec = load_spec(make_spec(QA, TRAIN, output_type="generate_until", doc_to_text="q", doc_to_target="a"))
    with pytest.raises(ValueError, match=r"num_fewshot=6: the few-shot pool holds only 5 docs"):
        prompts.FewshotSampler(spec).sample(6, QA[0])
