"""Task specs: a YAML or JSON file in the shape of an lm-evaluation-harness task YAML, over local JSONL data.

    task: arithmetic                      # the name results are reported under
    dataset_path: json                    # the only kind: JSON Lines files, one JSON object (a "doc") per line
    dataset_kwargs:
      data_files: {test: arithmetic.jsonl, train: arithmetic_train.jsonl}   # relative to the spec file
    test_split: test                      # the docs evaluated (else validation_split)
    fewshot_split: train                  # the few-shot pool (else training_split, validation_split, test_split)
    output_type: multiple_choice          # or generate_until
    doc_to_text: "Question: {{question}}\\nAnswer:"   # a jinja template over the doc, or one of its fields
    doc_to_choice: "{{choices}}"          # a field, a template rendering a Python list, or a list
    doc_to_target: label                  # a field or template: the index of the gold choice, or its text
    target_delimiter: " "                 # between the prompt and the answer
    fewshot_delimiter: "\\n\\n"           # after each few-shot example
    description: ""                       # a template put before everything (as lm-eval: no delimiter added)
    num_fewshot: 0                        # the default when the command line gives none
    fewshot_config: {sampler: default}    # default: a seeded random draw; first_n: the pool's first N docs
    metric_list: [{metric: acc}, {metric: acc_norm}]   # acc, acc_norm, acc_bytes (multiple choice), exact_match
    generation_kwargs: {until: ["\\n\\n"], max_gen_toks: 32}   # generate_until: stop strings, token budget
    extract: number                       # generate_until, lmforge's own key: number | letter | none (extract.py)

Every key is one lm-eval reads the same way, except `extract` (lm-eval expresses extraction as `filter_list`
regexes); other keys are refused, naming the file and the key. Templates render as lm-eval's do (jinja2,
undefined variables are errors, the trailing newline kept, a `regex_replace` filter) but in jinja2's immutable
sandbox, since a spec file is user input. `data_files` may be one path (the split is then called "train", as the
`datasets` library names it) or a mapping from split to path. Relative paths are taken from the spec file's
folder (lm-eval takes them from the working directory). A JSONL line that is not a JSON object is refused,
naming the file and line.

The tasks shipped in lmforge/eval/tasks/ (`SHIPPED`, `shipped_spec(name)`) are such specs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.utils.errors import LmforgeError

__all__ = ["SHIPPED", "TaskSpec", "TaskSpecError", "load_spec", "read_jsonl", "shipped_spec"]

SHIPPED_DIR = Path(__file__).with_name("tasks")
SHIPPED = tuple(sorted(p.stem for p in SHIPPED_DIR.glob("*.json")))
OUTPUT_TYPES = ("multiple_choice", "generate_until")
METRICS = {"multiple_choice": ("acc", "acc_norm", "acc_bytes"), "generate_until": ("exact_match",)}
EXTRACT = ("number", "letter", "none")
SAMPLERS = ("default", "first_n")
KEYS = {
    "task", "dataset_path", "dataset_kwargs", "test_split", "validation_split", "training_split", "fewshot_split",
    "output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter", "fewshot_delimiter",
    "description", "num_fewshot", "fewshot_config", "metric_list", "generation_kwargs", "extract", "metadata",
}  # fmt: skip


class TaskSpecError(LmforgeError):
    """A task spec or its data is wrong; the message names the file and the key, line or doc."""


@dataclass(frozen=True)
class TaskSpec:
    """A task ready to run: its docs read, its keys checked (module docstring for their meaning). `fewshot_docs` is
    the pool few-shot examples are drawn from; `exclude_eval_doc` says whether a doc is kept out of its own
    draws (lm-eval: when the few-shot split is the test split)."""

    name: str
    source: str
    output_type: str
    docs: tuple[dict, ...]
    fewshot_docs: tuple[dict, ...]
    exclude_eval_doc: bool
    doc_to_text: str | int
    doc_to_target: str | int | list
    doc_to_choice: str | list | None = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    num_fewshot: int = 0
    sampler: str = "default"
    metrics: tuple[str, ...] = ()
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256
    extract: str = "none"

    @property
    def features(self) -> frozenset[str]:
        """The docs' field names (what a `doc_to_*` string names instead of being a template)."""
        return frozenset(key for doc in self.docs for key in doc)


def read_jsonl(path: Path) -> list[dict]:
    """The docs of a JSON Lines file: one JSON object per non-blank line (errors name the file and line)."""
    docs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TaskSpecError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskSpecError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(doc, dict):
            raise TaskSpecError(f"{path}:{lineno}: expected a JSON object, got {type(doc).__name__}")
        docs.append(doc)
    if not docs:
        raise TaskSpecError(f"{path}: no docs (the file holds no JSON object)")
    return docs


def _read_spec(path: Path) -> dict:
    """The spec file's mapping: JSON, or YAML (`.yaml` / `.yml`, read with PyYAML)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise TaskSpecError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskSpecError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise TaskSpecError(f"{path}: expected a mapping of task keys, got {type(data).__name__}")
    return data


def _field(data: dict, key: str, kinds: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    """data[key], checked to be of `kinds` (never a bool); `default` when absent or null."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise TaskSpecError(f"{where}: {key}: expected {names}, got {value!r}")
    return value


def _data_files(data: dict, path: Path) -> dict[str, Path]:
    """split -> JSONL path, from dataset_kwargs.data_files."""
    where = f"{path}: dataset_kwargs.data_files"
    files = (data.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, str):
        files = {"train": files}
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise TaskSpecError(f"{where}: expected a path or a mapping from split name to path, got {files!r}")
    return {split: path.parent / file for split, file in files.items()}


def _split_docs(data: dict, path: Path) -> tuple[list[dict], list[dict], bool]:
    """(the evaluated docs, the few-shot pool, whether a doc is kept out of its own draws), as lm-eval picks them:
    eval = test_split else validation_split; pool = fewshot_split, else training_split, validation_split,
    test_split, the first that is set."""
    files = _data_files(data, path)
    splits = {key: _field(data, key, str, str(path)) for key in ("test_split", "validation_split", "training_split",
                                                                  "fewshot_split")}  # fmt: skip
    for key, split in splits.items():
        if split is not None and split not in files:
            raise TaskSpecError(f"{path}: {key}: {split!r} is not a split of dataset_kwargs.data_files "
                                f"({', '.join(files)})")  # fmt: skip
    eval_split = splits["test_split"] or splits["validation_split"]
    if eval_split is None:
        raise TaskSpecError(f"{path}: test_split: give test_split or validation_split (the docs to evaluate)")
    order = ("fewshot_split", "training_split", "validation_split", "test_split")
    pool_split = next(splits[key] for key in order if splits[key] is not None)
    cache: dict[str, list[dict]] = {}
    read = lambda split: cache.setdefault(split, read_jsonl(files[split]))
    return read(eval_split), read(pool_split), splits["fewshot_split"] == splits["test_split"]


def _metrics(data: dict, output_type: str, where: str) -> tuple[str, ...]:
    entries = data.get("metric_list")
    if entries is None:
        return ("acc", "acc_norm") if output_type == "multiple_choice" else ("exact_match",)
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "metric" in e for e in entries):
        raise TaskSpecError(f"{where}: metric_list: expected a list of {{metric: name}}, got {entries!r}")
    names = tuple(e["metric"] for e in entries)
    for name in names:
        if name not in METRICS[output_type]:
            raise TaskSpecError(f"{where}: metric_list: {name!r} is not a {output_type} metric here "
                                f"({', '.join(METRICS[output_type])})")  # fmt: skip
    return names


def _choice_of(value: str, allowed: tuple[str, ...], key: str, where: str) -> str:
    if value not in allowed:
        raise TaskSpecError(f"{where}: {key}: {value!r} is not one of {', '.join(allowed)}")
    return value


def load_spec(path: str | Path) -> TaskSpec:
    """Read and check a task spec (module docstring) and its JSONL docs."""
    path = Path(path)
    data = _read_spec(path)
    where = str(path)
    if unknown := sorted(set(data) - KEYS):
        raise TaskSpecError(f"{where}: {unknown[0]}: not a task key this reader knows ({', '.join(sorted(KEYS))})")
    if data.get("dataset_path") != "json":
        raise TaskSpecError(f"{where}: dataset_path: expected json (local JSONL), got {data.get('dataset_path')!r}")
    output_type = _choice_of(data.get("output_type", "generate_until"), OUTPUT_TYPES, "output_type", where)
    for key in ("doc_to_text", "doc_to_target"):
        if key not in data:
            raise TaskSpecError(f"{where}: {key}: missing")
    if output_type == "multiple_choice" and data.get("doc_to_choice") is None:
        raise TaskSpecError(f"{where}: doc_to_choice: missing (a multiple_choice task needs its choices)")
    docs, pool, exclude = _split_docs(data, path)
    fewshot = _field(data, "fewshot_config", dict, where, {})
    generation = _field(data, "generation_kwargs", dict, where, {})
    fewshot_delimiter = _field(data, "fewshot_delimiter", str, where, "\n\n")
    until = generation.get("until", [fewshot_delimiter])
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
        raise TaskSpecError(f"{where}: generation_kwargs.until: expected a list of non-empty strings, got {until!r}")
    max_gen_toks = generation.get("max_gen_toks", 256)
    if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
        raise TaskSpecError(f"{where}: generation_kwargs.max_gen_toks: expected an integer >= 1, got {max_gen_toks!r}")
    num_fewshot = _field(data, "num_fewshot", int, where, 0)
    if num_fewshot < 0:
        raise TaskSpecError(f"{where}: num_fewshot: must be at least 0, got {num_fewshot}")
    return TaskSpec(
        name=_field(data, "task", str, where, path.stem),
        source=where,
        output_type=output_type,
        docs=tuple(docs),
        fewshot_docs=tuple(pool),
        exclude_eval_doc=exclude,
        doc_to_text=_field(data, "doc_to_text", (str, int), where),
        doc_to_target=_field(data, "doc_to_target", (str, int, list), where),
        doc_to_choice=_field(data, "doc_to_choice", (str, list), where),
        target_delimiter=_field(data, "target_delimiter", str, where, " "),
        fewshot_delimiter=fewshot_delimiter,
        description=_field(data, "description", str, where, ""),
        num_fewshot=num_fewshot,
        sampler=_choice_of(fewshot.get("sampler", "default"), SAMPLERS, "fewshot_config.sampler", where),
        metrics=_metrics(data, output_type, where),
        until=tuple(until),
        max_gen_toks=max_gen_toks,
        extract=_choice_of(data.get("extract", "none"), EXTRACT, "extract", where),
    )


def shipped_spec(name: str) -> TaskSpec:
    """A task shipped with lmforge, by name; an unknown name is refused, listing the known ones."""
    if name not in SHIPPED:
        raise TaskSpecError(f"unknown task {name!r}; the shipped tasks are: {', '.join(SHIPPED)}")
    return load_spec(SHIPPED_DIR / f"{name}.json")
