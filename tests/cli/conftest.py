"""Shared by the CLI tests: a tiny model directory with a ChatML tokenizer, and calibration text."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_bpe


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 2-layer Llama (vocabulary 300, context 256) saved with its tokenizer."""
    text = "To be, or not to be, that is the question. " * 40
    tok = train_bpe(texts=[text], vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"], progress=False)
    tok.eos_token = "<|im_end|>"
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=256))
    path = tmp_path_factory.mktemp("model")
    lmforge.save(model, path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """Calibration text for quantize and prune: a line of Hamlet, repeated."""
    path = tmp_path_factory.mktemp("calib") / "text.txt"
    path.write_text("Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune. " * 30)
    return path
