"""`lmforge eval tasks` end to end on the tiny model directory: the printed table and --json are the library's
results; errors name the task, file or line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.eval.tasks import evaluate_task
from lmforge.eval.taskspec import load_spec, shipped_spec

runner = CliRunner()


def test_shipped_tasks_table_and_json(model_dir, loaded, tmp_path):
    out = tmp_path / "results.json"
    result = runner.invoke(app, ["eval", "tasks", str(model_dir), "--tasks", "cloze,arithmetic", "--limit", "3",
                                 "--batch", "2", "--num-fewshot", "1", "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    model, tok = loaded
    want = {name: evaluate_task(model, tok, shipped_spec(name), num_fewshot=1, limit=3, batch_size=2)
            for name in ("cloze", "arithmetic")}  # fmt: skip
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["task", "shots", "metric", "value", "stderr", "n"]
    cloze = want["cloze"].metrics
    assert lines[1].split() == ["cloze", "1", "acc", f"{cloze['acc'].value:.4f}", f"{cloze['acc'].stderr:.4f}", "3"]
    assert [line.split()[:3] for line in lines[2:]] == [["cloze", "1", "acc_norm"], ["arithmetic", "1", "exact_match"]]
    saved = json.loads(out.read_text())
    assert list(saved["results"]) == ["cloze", "arithmetic"]
    for name, r in want.items():
        assert saved["results"][name]["metrics"] == {k: {"value": v.value, "stderr": v.stderr, "n": v.n}
                                                     for k, v in r.metrics.items()}  # fmt: skip
        assert saved["results"][name]["samples"] == json.loads(json.dumps(r.samples))
    assert "loglikelihood" in result.stderr and "generate" in result.stderr  # progress bars on stderr


def test_task_file(model_dir, loaded, make_spec):
    rows = [{"q": f"Who is {n}?", "choices": ["a prince", "a king"], "label": i % 2}
            for i, n in enumerate(["Hamlet", "Lear", "Claudius"])]  # fmt: skip
    path = make_spec(rows, output_type="multiple_choice", doc_to_text="{{q}}", doc_to_choice="choices",
                     doc_to_target="label")  # fmt: skip
    result = runner.invoke(app, ["eval", "tasks", str(model_dir), "--task-file", str(path)])
    assert result.exit_code == 0, result.output
    want = evaluate_task(*loaded, load_spec(path)).metrics["acc_norm"]
    assert result.stdout.strip().splitlines()[2].split() == ["toy", "0", "acc_norm", f"{want.value:.4f}",
                                                             f"{want.stderr:.4f}", "3"]  # fmt: skip


def error(*args: str) -> str:
    result = runner.invoke(app, ["eval", "tasks", *args])
    assert result.exit_code == 1, result.output
    return " ".join(result.stderr.split())


def test_errors_come_before_the_model_loads(tmp_path, make_spec):
    missing_model = str(tmp_path / "no-model")  # never read: the tasks are checked first
    assert error(missing_model, "--tasks", "cloze,mmlu") == (
        "error: unknown task 'mmlu'; the shipped tasks are: arithmetic, cloze, shakespeare_letter, shakespeare_play"
    )
    assert error(missing_model, "--tasks", " , ").startswith("error: --tasks=' , ': no task names (the shipped tasks")
    path = make_spec([{"q": "x", "a": "y"}], output_type="generate_until", doc_to_text="q", doc_to_target="a")
    (tmp_path / "test.jsonl").write_text('{"q": "x", "a": "y"}\n{"q": "x", "a": \n', encoding="utf-8")
    assert error(missing_model, "--task-file", str(path)).startswith(f"error: {tmp_path / 'test.jsonl'}:2: not valid")
    assert error(missing_model, "--task-file", str(tmp_path / "none.yaml")) == (
        f"error: {tmp_path / 'none.yaml'}: No such file or directory"
    )
