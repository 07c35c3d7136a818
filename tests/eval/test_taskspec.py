"""Task specs (eval/taskspec.py): the shipped tasks, YAML and JSON specs, and errors that name the file and the key
or line."""

from __future__ import annotations

import json

import make_shipped_tasks
import pytest

from lmforge.eval.taskspec import SHIPPED, SHIPPED_DIR, TaskSpecError, load_spec, shipped_spec

ROW = {"q": "Who?", "choices": ["Hamlet", "Lear"], "label": 0}
MC = {"output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "choices", "doc_to_target": "label"}


def test_shipped_tasks_are_what_the_script_makes():
    made = make_shipped_tasks.files()
    assert sorted(p.name for p in SHIPPED_DIR.iterdir()) == sorted(made)
    for name, content in made.items():
        assert (SHIPPED_DIR / name).read_text(encoding="utf-8") == content, name


def test_shipped_tasks_load():
    assert SHIPPED == ("arithmetic", "cloze", "shakespeare_letter", "shakespeare_play")
    sizes = {name: (len(shipped_spec(name).docs), len(shipped_spec(name).fewshot_docs)) for name in SHIPPED}
    assert sizes == {"arithmetic": (100, 8), "cloze": (40, 4), "shakespeare_letter": (100, 8),
                     "shakespeare_play": (100, 8)}  # fmt: skip
    play = shipped_spec("shakespeare_play")
    assert all(len(d["choices"]) == 4 and 0 <= d["label"] < 4 for d in play.docs)
    assert shipped_spec("arithmetic").extract == "number" and shipped_spec("shakespeare_letter").extract == "letter"


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(TaskSpecError) as e:
        shipped_spec("hellaswag")
    assert str(e.value) == ("unknown task 'hellaswag'; the shipped tasks are: arithmetic, cloze, shakespeare_letter, "
                            "shakespeare_play")  # fmt: skip


def test_yaml_and_json_read_alike(make_spec, tmp_path):
    path = make_spec([ROW], **MC)
    yaml_path = tmp_path / "toy.yaml"
    spec = json.loads(path.read_text())
    yaml_path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in spec.items()) + "\n", encoding="utf-8")
    assert load_spec(yaml_path).__dict__ | {"source": ""} == load_spec(path).__dict__ | {"source": ""}
    assert load_spec(path).metrics == ("acc", "acc_norm")  # lm-eval's defaults for multiple_choice


def test_a_malformed_row_names_the_file_and_line(make_spec, tmp_path):
    path = make_spec([ROW, ROW], **MC)
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps(ROW) + "\n\n" + '{"q": "Who?", "choices": [}\n', encoding="utf-8")
    with pytest.raises(TaskSpecError, match=rf"^{data}:3: not valid JSON \(Expecting value at column 27\)$"):
        load_spec(path)
    data.write_text(json.dumps(ROW) + "\n" + "[1, 2]\n", encoding="utf-8")
    with pytest.raises(TaskSpecError, match=rf"^{data}:2: expected a JSON object, got list$"):
        load_spec(path)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"doc_to_txt": "q"}, "doc_to_txt: not a task key this reader knows"),
        ({"dataset_path": "hellaswag"}, "dataset_path: expected json (local JSONL), got 'hellaswag'"),
        ({"output_type": "loglikelihood_rolling"}, "output_type: 'loglikelihood_rolling' is not one of"),
        ({"doc_to_choice": None}, "doc_to_choice: missing (a multiple_choice task needs its choices)"),
        ({"test_split": "validation"}, "test_split: 'validation' is not a split of dataset_kwargs.data_files (test)"),
        ({"num_fewshot": "2"}, "num_fewshot: expected int, got '2'"),
        ({"metric_list": [{"metric": "bleu"}]}, "metric_list: 'bleu' is not a multiple_choice metric here"),
        ({"fewshot_config": {"sampler": "balanced"}}, "fewshot_config.sampler: 'balanced' is not one of"),
        ({"generation_kwargs": {"until": "\n", "max_gen_toks": 0}}, "generation_kwargs.max_gen_toks: expected an"),
    ],
)  # fmt: skip
def test_spec_errors_name_the_file_and_key(make_spec, keys, message):
    path = make_spec([ROW], **{**MC, **keys})
    with pytest.raises(TaskSpecError) as e:
        load_spec(path)
    assert str(e.value).startswith(f"{path}: {message}")


def test_a_missing_data_file_is_an_os_error(make_spec, tmp_path):
    path = make_spec([ROW], **MC)
    (tmp_path / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError):
        load_spec(path)
