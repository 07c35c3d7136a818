"""Evaluation of a model on text and tasks (docs/evaluation.md).

* perplexity.py: llama.cpp's perplexity (chunks of n_ctx tokens, the second half of each scored) and bits per byte;
* loglikelihood.py: log p(continuation | context) and is_greedy, as lm-evaluation-harness computes them;
* taskspec.py, prompts.py: tasks in lm-eval's task-YAML shape over local JSONL, their prompts and few-shot draws;
* tasks.py, extract.py: multiple choice (acc, acc_norm) and generation (extracted answer, exact match) scoring;
  tasks/ holds the shipped tasks.

    import lmforge
    from lmforge.eval.perplexity import text_perplexity
    from lmforge.eval.taskspec import shipped_spec
    from lmforge.eval.tasks import evaluate_task
    model, tokenizer = lmforge.load("model.gguf")
    text_perplexity(model, tokenizer, open("wiki.test.raw").read(), n_ctx=512).bits_per_byte
    evaluate_task(model, tokenizer, shipped_spec("cloze")).metrics["acc_norm"].value
"""
