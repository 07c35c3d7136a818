"""Prompts of a task, built as lm-evaluation-harness 0.4.13 builds them (`ConfigurableTask.doc_to_text`,
`doc_to_target`, `doc_to_choice`, `fewshot_context`, `build_qa_turn`; `ContextSampler`, `FirstNSampler`).

**Fields.** A `doc_to_*` string that names a field of the docs is that field's value; any other string is a jinja
template rendered over the doc. doc_to_text / doc_to_target rendering to digits is an index (when the task has
choices), a target rendering to ``[...]`` is a list of targets; doc_to_choice renders to a Python list literal.

**The prompt** for doc d with k few-shot examples e_1 … e_k:

    description + Σ_i [ text(e_i) + target_delimiter + answer(e_i) + fewshot_delimiter ] + text(d)

where answer(e) = choices(e)[target(e)] when the target is an index, the first target of a list, else the target
itself. A multiple-choice request then scores each continuation target_delimiter + choice after that prompt; a
generation task generates from it.

**Drawing the examples** (lm-eval's samplers; one generator for the whole task, drawing for the docs in order):

* ``default``: `random.Random(seed)` (lm-eval's `fewshot_random_seed`, 1234 unless set); per doc
  ``rnd.sample(pool, k)``, or, when the doc may be in the pool (the few-shot split is the test split), draw
  k + 1, drop the doc itself, keep the first k;
* ``first_n``: the pool's first k docs (without the doc itself when it may be there), the same for every doc.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Sequence
from functools import cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.eval.taskspec import TaskSpec, TaskSpecError

__all__ = [
    "FewshotSampler", "answer_text", "context", "doc_to_choice", "doc_to_target", "doc_to_text", "render", "shot",
]  # fmt: skip


@cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


@cache
def _template(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def render(template: str, doc: dict, where: str = "template") -> str:
    """`template` rendered over the doc's fields, as lm-eval's `utils.apply_template` (errors name `where`)."""
    try:
        return _template(template).render(**doc)
    except jinja2.TemplateError as e:
        raise TaskSpecError(f"{where}: {template!r}: {e}") from None


def _resolve(spec: TaskSpec, key: str, doc: dict) -> object:
    """A field of the doc when `spec.<key>` names one; else the template rendered (non-strings as they are)."""
    value = getattr(spec, key)
    if not isinstance(value, str):
        return value
    if value in spec.features:
        return doc[value]
    return render(value, doc, f"{spec.source}: {key}")


def doc_to_text(spec: TaskSpec, doc: dict) -> str:
    """The doc's question text."""
    text = _resolve(spec, "doc_to_text", doc)
    if isinstance(text, int) or (spec.doc_to_choice is not None and isinstance(text, str) and text.isdigit()):
        raise TaskSpecError(f"{spec.source}: doc_to_text: gives an index ({text!r}): tasks whose choices are the "
                            "contexts (lm-eval's multiple inputs) are not supported")  # fmt: skip
    if not isinstance(text, str):
        raise TaskSpecError(f"{spec.source}: doc_to_text: expected text, got {text!r}")
    return text


def doc_to_target(spec: TaskSpec, doc: dict) -> int | str | list:
    """The doc's target: an index into its choices, the answer text, or a list of them."""
    target = _resolve(spec, "doc_to_target", doc)
    if isinstance(spec.doc_to_target, str) and spec.doc_to_target not in spec.features:
        if target.isdigit() and spec.doc_to_choice is not None:
            return int(target)
        if len(target) >= 2 and target[0] == "[" and target[-1] == "]":
            try:
                return ast.literal_eval(target)
            except (SyntaxError, ValueError):
                return target
    return target


def doc_to_choice(spec: TaskSpec, doc: dict) -> list[str]:
    """The doc's choices (a list of strings)."""
    value = spec.doc_to_choice
    if isinstance(value, str):
        if value in spec.features:
            value = doc[value]
        else:
            text = render(value, doc, f"{spec.source}: doc_to_choice")
            try:
                value = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                raise TaskSpecError(f"{spec.source}: doc_to_choice: renders to {text!r}, not a Python list") from None
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise TaskSpecError(f"{spec.source}: doc_to_choice: expected a non-empty list of strings, got {value!r}")
    return value


def answer_text(spec: TaskSpec, doc: dict) -> str:
    """What follows a few-shot example's text: the gold choice, the first target of a list, or the target."""
    target = doc_to_target(spec, doc)
    if spec.doc_to_choice is not None and isinstance(target, int):
        return doc_to_choice(spec, doc)[target]
    answer = target[0] if isinstance(target, list) else target
    if not isinstance(answer, str):
        raise TaskSpecError(f"{spec.source}: doc_to_target: expected text for a few-shot answer, got {answer!r}")
    return answer


class FewshotSampler:
    """The few-shot examples of each doc, drawn as lm-eval draws them (module docstring); one per task run, asked
    for the docs in order."""

    def __init__(self, spec: TaskSpec, seed: int | None = 1234) -> None:
        self.spec, self.pool, self.rnd = spec, list(spec.fewshot_docs), random.Random(seed)

    def sample(self, k: int, doc: dict) -> list[dict]:
        if k == 0:
            return []
        exclude = self.spec.exclude_eval_doc
        pool = [d for d in self.pool if d != doc] if exclude else self.pool
        if k > len(pool):
            raise TaskSpecError(f"{self.spec.source}: num_fewshot={k}: the few-shot pool holds only {len(pool)} docs")
        if self.spec.sampler == "first_n":
            return pool[:k]
        if not exclude:
            return self.rnd.sample(self.pool, k)
        drawn = [d for d in self.rnd.sample(self.pool, min(k + 1, len(self.pool))) if d != doc][:k]
        return drawn if len(drawn) == k else self.rnd.sample(pool, k)


def context(spec: TaskSpec, doc: dict, examples: Sequence[dict]) -> str:
    """The prompt for `doc` after the few-shot `examples` (module docstring)."""
    description = render(spec.description, doc, f"{spec.source}: description") if spec.description else ""
    return description + "".join(shot(spec, e) for e in examples) + doc_to_text(spec, doc)


def shot(spec: TaskSpec, example: dict) -> str:
    """One few-shot example: text + target_delimiter + answer + fewshot_delimiter (the text alone when its target
    is empty, as lm-eval's `build_qa_turn`)."""
    if doc_to_target(spec, example) in (None, ""):
        return doc_to_text(spec, example)
    return doc_to_text(spec, example) + spec.target_delimiter + answer_text(spec, example) + spec.fewshot_delimiter
