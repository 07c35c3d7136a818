"""Shared by the evaluation tests: a tiny random transformers Llama with a real byte-level BPE tokenizer (trained
here with `tokenizers` on Hamlet), saved as a Hugging Face directory that transformers, lm_eval and lmforge read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"
CONTEXT = 128


def train_tokenizer(add_bos: bool):
    """A 400-token byte-level BPE (`tokenizers`) with <|endoftext|> (eos) and <s> (bos), as transformers'
    fast tokenizer; `add_bos`: its post-processor puts <s> first (as Llama's tokenizer.json does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = (SHAKESPEARE / "hamlet_gut.txt").read_text(encoding="utf-8")[:100_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([text], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>")


def save_model_dir(directory: Path, add_bos: bool) -> Path:
    """A random 2-layer Llama (context 128, weights drawn with std 0.1 so choices differ clearly) and its tokenizer."""
    import transformers as T

    tokenizer = train_tokenizer(add_bos)
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                           initializer_range=0.1, bos_token_id=1, eos_token_id=0)  # fmt: skip
    T.LlamaForCausalLM(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The model directory whose tokenizer adds no bos token."""
    return save_model_dir(tmp_path_factory.mktemp("llama"), add_bos=False)


@pytest.fixture(scope="session")
def bos_model_dir(tmp_path_factory) -> Path:
    """The same weights with a tokenizer whose post-processor puts <s> first."""
    return save_model_dir(tmp_path_factory.mktemp("llama-bos"), add_bos=True)


@pytest.fixture(scope="session")
def loaded(model_dir):
    """lmforge's load of `model_dir`: (model, tokenizer)."""
    return lmforge.load(model_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def make_spec(tmp_path):
    """make_spec(test_rows, train_rows=None, **keys) -> the path of a JSON task spec over JSONL files written to a
    temporary folder (splits "test" and, when given, "train" as the few-shot split)."""

    def make(test_rows: list[dict], train_rows: list[dict] | None = None, **keys) -> Path:
        files = {"test": write_jsonl(tmp_path / "test.jsonl", test_rows).name}
        if train_rows is not None:
            files["train"] = write_jsonl(tmp_path / "train.jsonl", train_rows).name
            keys.setdefault("fewshot_split", "train")
        spec = {"task": "toy", "dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test",
                **keys}  # fmt: skip
        path = tmp_path / "toy.json"
        path.write_text(json.dumps(spec), encoding="utf-8")
        return path

    return make
