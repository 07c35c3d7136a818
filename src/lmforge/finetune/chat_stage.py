"""The speedrun's chat stage: the pre-trained story model, fine-tuned (SFT) to answer questions about a story.

    data      conversations about stories of the grammar (`data.story_chat`: the story and a question in the user
              turn, the exact answer in the assistant's), rendered with the tokenizer's ChatML template: 32 per
              SFT step (about one epoch), another 200 for validation, 60 more held out for the score
    before    exact-match accuracy of the pre-trained model on the held-out questions (greedy, the answer ends
              at <|im_end|>, the tokenizer's end of turn)
    SFT       `finetune.run.finetune`, full fine-tuning (a model this small trains all its weights quickly),
              loss on the answers only, packed under the document mask                  -> chat/
    after     the same score for the fine-tuned model, and a few dialogues for the report

The result is the chat model the speedrun exports (hf/, model.gguf), which `lmforge chat` and `lmforge serve` use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.story_chat import conversations
from lmforge.finetune.run import FinetuneConfig, finetune
from lmforge.infer.generate import generate_text
from lmforge.io.load import load_model
from lmforge.utils.atomic import atomic_write

__all__ = ["ChatStage", "exact_match", "run_chat_stage"]

HELD_OUT = 60
VAL = 200
PER_STEP = 32


@dataclass
class ChatStage:
    """What the chat stage measured and made."""

    steps: int
    examples: int
    val_loss: float | None
    before: float  # exact-match accuracy of the pre-trained model on the held-out questions
    after: float  # ... and of the fine-tuned one
    by_question: dict[str, tuple[int, int]]  # question kind -> (right, asked) after SFT
    dialogues: list[tuple[str, str, str]]  # (user turn, expected answer, the model's answer)
    model: Any  # the fine-tuned model (eval mode)
    directory: Path  # its Hugging Face directory


def answers(model: Any, tokenizer: Any, items: list[dict[str, Any]], max_tokens: int = 24) -> list[str]:
    """The model's greedy answer (stripped) to each conversation's user turn."""
    out = []
    for item in items:
        prompt = tokenizer.apply_chat_template(item["messages"][:1], add_generation_prompt=True)
        out.append(generate_text(model, tokenizer, prompt, temperature=0.0, max_tokens=max_tokens).strip())
    return out


def exact_match(model: Any, tokenizer: Any, items: list[dict[str, Any]]) -> tuple[float, list[str]]:
    """The fraction of `items` whose greedy answer is exactly the assistant's, and the answers."""
    got = answers(model, tokenizer, items)
    return sum(g == item["messages"][1]["content"] for g, item in zip(got, items, strict=True)) / len(items), got


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def run_chat_stage(base: Path, tokenizer: Any, out: Path, steps: int, seq_len: int, batch_size: int = 16,
                   lr: float = 1e-3, progress: bool = True) -> ChatStage:  # fmt: skip
    """SFT of the model in `base` (a Hugging Face directory) for `steps` steps into `out` (module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    train, val = out / "train.jsonl", out / "val.jsonl"
    _write_jsonl(train, conversations(seed=1, n=steps * PER_STEP))
    _write_jsonl(val, conversations(seed=2, n=VAL))
    held = conversations(seed=3, n=HELD_OUT)
    pretrained, _ = load_model(base)
    before, _ = exact_match(pretrained.eval(), tokenizer, held)
    config = FinetuneConfig(method="full", lr=lr, max_steps=steps, batch_size=batch_size, seq_len=seq_len,
                            warmup_steps=max(1, steps // 10), eval_every=max(1, steps // 4), log_every=5,
                            checkpoint_every=0, skip_invalid=True)  # fmt: skip
    result = finetune(base, train, out, config, val=val, progress=progress)
    model, _ = load_model(out / "hf")
    model.eval()
    after, got = exact_match(model, tokenizer, held)
    dialogues = [(h["messages"][0]["content"], h["messages"][1]["content"], g)
                 for h, g in zip(held[:4], got[:4], strict=True)]  # fmt: skip
    by_question: dict[str, tuple[int, int]] = {}
    for item, answer in zip(held, got, strict=True):
        kind = " ".join(item["messages"][0]["content"].rsplit("\n", 1)[1].split()[:2])  # "Who is", "Where did", ...
        right, asked = by_question.get(kind, (0, 0))
        by_question[kind] = (right + (answer == item["messages"][1]["content"]), asked + 1)
    return ChatStage(result.step, result.examples, result.metrics.get("val_loss"), before, after, by_question,
                     dialogues, model, out / "hf")  # fmt: skip
