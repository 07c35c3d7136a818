"""The README's commands stay true: CI runs the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m1 -E '^python3 -m venv \\.venv .*pytest$' README.md" in ci
    test_lines = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv") and "pytest" in line]
    assert len(test_lines) == 1 and test_lines[0].endswith("pytest")
