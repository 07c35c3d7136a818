"""Task scoring (eval/tasks.py): acc / acc_norm / acc_bytes and the standard error against hand-computed values and
lm-eval's `mean_stderr`; generation tasks against transformers' greedy `generate` on the same tiny model."""

from __future__ import annotations

import pytest
import torch

from lmforge.eval.extract import extract
from lmforge.eval.loglikelihood import encode
from lmforge.eval.tasks import argmax, evaluate_task, mean_stderr, score_choices
from lmforge.eval.taskspec import TaskSpecError, load_spec

QUESTIONS = [{"q": f"Who speaks line {i} of the play?", "choices": ["Hamlet", "Horatio", "Ophelia", "the Ghost"],
              "label": i % 4, "answer": str(i)} for i in range(6)]  # fmt: skip


def test_acc_norm_divides_by_characters_and_acc_bytes_by_bytes():
    # ℓ = (-4, -5, -9): acc picks 0; per character (-4/2, -5/5, -9/9) = (-2, -1, -1) picks 1, the first of equal
    # values; per byte "é" counts twice: (-4/3, -5/5, -9/9) -> 1
    scores = score_choices([-4.0, -5.0, -9.0], ["éa", "abcde", "abcdefghi"], gold=1)
    assert scores == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0}
    assert score_choices([-3.0, -3.0], ["ab", "abc"], gold=1) == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0}
    # ℓ = (-3, -3.3) over "éé" (2 characters, 4 bytes) and "abc": per character (-1.5, -1.1), per byte (-0.75, -1.1)
    assert score_choices([-3.0, -3.3], ["éé", "abc"], gold=1) == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 0.0}
    assert argmax([1.0, 3.0, 3.0]) == 1


def test_stderr_is_lm_evals():
    from lm_eval.api.metrics import mean_stderr as lm_eval_stderr

    scores = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    assert mean_stderr(scores) == pytest.approx(lm_eval_stderr(scores), rel=1e-12)
    assert mean_stderr([1.0]) is None


def test_multiple_choice_gold_as_text_or_index(make_spec, loaded):
    model, tok = loaded
    keys = {"output_type": "multiple_choice", "doc_to_text": "{{q}}\nAnswer:", "doc_to_choice": "choices"}
    by_index = evaluate_task(model, tok, load_spec(make_spec(QUESTIONS, doc_to_target="label", **keys)))
    by_text = evaluate_task(model, tok, load_spec(make_spec(QUESTIONS, doc_to_target="{{choices[label]}}", **keys)))
    assert [s["gold"] for s in by_text.samples] == [d["label"] for d in QUESTIONS]
    assert by_index.samples == by_text.samples
    assert by_index.metrics["acc"].value == sum(s["acc"] for s in by_index.samples) / 6
    assert by_index.metrics["acc"].n == 6 and by_index.num_fewshot == 0
    bad = [{**QUESTIONS[0], "label": 4}]
    with pytest.raises(TaskSpecError, match=r"doc 0: target 4 is not one of its 4 choices"):
        evaluate_task(model, tok, load_spec(make_spec(bad, doc_to_target="label", **keys)))


def hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """transformers' greedy generation from each prompt's ids, decoded."""
    import transformers as T

    hf = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = T.AutoTokenizer.from_pretrained(model_dir)
    texts = []
    for ids in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        texts.append(tok.decode(out[0, len(ids) :], skip_special_tokens=True))
    return texts


def test_generation_is_greedy_decoding_cut_at_the_stop_string(make_spec, loaded, model_dir):
    model, tok = loaded
    wants = hf_greedy(model_dir, [encode(tok, doc["q"] + " Say") for doc in QUESTIONS[:3]], 12)
    stop = wants[0][len(wants[0]) // 2]  # a character the first reply holds
    keys = {"output_type": "generate_until", "doc_to_text": "{{q}} Say", "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": [stop], "max_gen_toks": 12}}  # fmt: skip
    result = evaluate_task(model, tok, load_spec(make_spec(QUESTIONS[:3], **keys)), batch_size=2)
    for want, sample in zip(wants, result.samples, strict=True):
        assert sample["generation"] == want.split(stop)[0]  # the text ends before the stop string
        assert sample["answer"] == sample["generation"].strip()  # extract: none
    assert len(result.samples[0]["generation"]) < len(wants[0])
    assert any(len(s["generation"]) > 2 for s in result.samples)


def test_exact_match_of_the_extracted_answer(make_spec, loaded):
    model, tok = loaded
    keys = {"output_type": "generate_until", "doc_to_text": "{{q}} The answer is", "extract": "none",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6}}  # fmt: skip
    first = evaluate_task(model, tok, load_spec(make_spec(QUESTIONS[:2], doc_to_target="{{answer}}", **keys)))
    produced = [s["generation"] for s in first.samples]
    assert [s["answer"] for s in first.samples] == [extract(g, "none") for g in produced]
    # targets: what the model says for doc 0 (a match), something else for doc 1
    docs = [{**QUESTIONS[0], "answer": produced[0].strip()}, {**QUESTIONS[1], "answer": "never said"}]
    result = evaluate_task(model, tok, load_spec(make_spec(docs, doc_to_target="{{answer}}", **keys)))
    assert [s["exact_match"] for s in result.samples] == [1.0, 0.0]
    assert result.metrics["exact_match"].value == 0.5
    assert result.metrics["exact_match"].stderr == pytest.approx(0.5)  # sqrt(0.5 / 2)
