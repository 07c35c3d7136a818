"""Evaluation of a model on text and tasks. perplexity.py: llama.cpp's perplexity (chunks of n_ctx tokens, the
second half of each scored):

    import lmforge
    from lmforge.eval.perplexity import text_perplexity
    model, tokenizer = lmforge.load("model.gguf")
    text_perplexity(model, tokenizer, open("wiki.test.raw").read(), n_ctx=512).ppl
"""
