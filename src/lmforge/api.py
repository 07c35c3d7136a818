"""The public entry points: `lmforge.load`, `lmforge.load_tokenizer`, `lmforge.save`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmforge.io import load as loading
from lmforge.model.transformer import Transformer

if TYPE_CHECKING:
    from lmforge.tokenizer import BaseTokenizer, Tokenizer


def load(
    path: str | Path, dtype: torch.dtype | None = None, *, adapter: str | Path | None = None, **overrides: Any
) -> tuple[Transformer, BaseTokenizer | None]:
    """Load a model directory and return `(model, tokenizer)`.

    `path` is a Hugging Face model directory (config.json + safetensors, and tokenizer files when
    it has them; the tokenizer is None when it has none), a directory `lmforge quantize` wrote (its quantized
    layers kept: `lmforge.io.quantized`), a Hugging Face GPTQ / AWQ checkpoint (its block linears kept quantized:
    `lmforge.io.hf_gptq`), or a GGUF file (llama.cpp). A GGUF file's Q8_0 / Q4_0 / Q4_1 / Q4_K /
    Q6_K matrices stay quantized (`lmforge.quant.weight_only`: the same logits as the dequantized model, bit for
    bit; `use_kernel(model)` runs the 4-bit ones on torch's int4 CPU kernel) unless a float `dtype` is asked for,
    which dequantizes every weight into it. `quantized=False` dequantizes a quantized model into `dtype` (default
    float32); `quantized=True` keeps it quantized whatever `dtype` (which then casts the other float tensors).
    `dtype` casts floating-point weights. `adapter` is a PEFT
    adapter directory (adapter_config.json + adapter_model.safetensors, from `lmforge finetune` or `peft`): a
    LoRA / rsLoRA / DoRA adapter is added as the active adapter "default" (`lmforge.finetune.lora`:
    `merge_and_unload` folds it into the weights), a prompt or prefix as `model.embed` / `model.prefix_encoder`
    (`lmforge.finetune.prompt_tuning`: `generate_tuned` generates with it).
    `overrides` naming `RuntimeOptions` fields set `model.runtime` (how to compute, e.g. `attn_backend="eager"`);
    the others replace `ModelConfig` fields (what the checkpoint defines, e.g. `max_seq_len=4096`).
    """
    model, tokenizer = loading.load_model(path, dtype, **overrides)
    if adapter is not None:
        from lmforge.finetune.adapter_files import apply_adapter

        apply_adapter(model, adapter)
    return model, tokenizer


def load_tokenizer(path: str | Path, **kwargs: Any) -> BaseTokenizer:
    """A tokenizer from a directory (tokenizer.json, or vocab.json + merges.txt), a `.tiktoken` file or a
    GGUF file.

    A `.tiktoken` file holds only the ranks: pass `pattern=` and `special_tokens=` for it (the
    defaults are cl100k's)."""
    return loading.load_tokenizer(path, **kwargs)


def save(model: Transformer, path: str | Path, tokenizer: Tokenizer | None = None, qtype: str = "f16") -> None:
    """Write `model` (and `tokenizer`, if given) as a Hugging Face directory that `transformers` loads,
    or, when `path` ends in `.gguf`, as one GGUF file (`qtype`: f32, f16, q8_0, q5_0, q4_0, q4_1 or q4_k; a
    tokenizer is required) that llama.cpp, transformers and `lmforge.load` read. A model holding quantized layers
    (`lmforge quantize`, a GGUF file loaded quantized) is written as it is held, in lmforge's quantized layout
    (io/quantized.py, which `lmforge.load` reads back bit for bit), or dequantized into the GGUF `qtype`."""
    if str(path).endswith(".gguf"):
        from lmforge.io.gguf_export import save_gguf

        save_gguf(model, tokenizer, path, qtype)
        return
    from lmforge.quant.modules import quantized_layers

    if quantized_layers(model):
        from lmforge.io.quantized import save_quantized

        save_quantized(model, path, tokenizer)
        return
    from lmforge.io.hf import save_hf

    save_hf(model, path, tokenizer=tokenizer)
