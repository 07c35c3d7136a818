"""Shared by the quantization tests: a small byte-level tokenizer for the GGUF files and model directories they
write."""

from __future__ import annotations

import pytest

from lmforge.tokenizer.bpe import train_bpe


@pytest.fixture(scope="module")
def tok():
    """300 tokens (256 bytes, merges, <|endoftext|> as eos)."""
    t = train_bpe(["to be or not to be, that is the question " * 40], vocab_size=300,
                  special_tokens=["<|endoftext|>"], progress=False)  # fmt: skip
    t.eos_token = "<|endoftext|>"
    return t
