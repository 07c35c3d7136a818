"""Loading a model and its tokenizer from whatever a user points at: a Hugging Face directory or a GGUF file.

`lmforge.load` / `lmforge.load_tokenizer` (api.py) and the engine's `LLM(path)` both call these."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmforge.model.runtime import RuntimeOptions
from lmforge.model.transformer import Transformer
from lmforge.utils.memory import paused_gc

if TYPE_CHECKING:
    from lmforge.tokenizer import BaseTokenizer


@paused_gc()  # ~1e5 small objects of a tokenizer: utils/memory.py
def load_model(
    path: str | Path, dtype: torch.dtype | None = None, **overrides: Any
) -> tuple[Transformer, BaseTokenizer | None]:
    """`(model, tokenizer)` of a Hugging Face directory or a GGUF file, with runtime and config `overrides`; the
    tokenizer is None when a directory has none (`lmforge.load` documents the arguments)."""
    from lmforge.io.hf import load_hf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    runtime = {name: overrides.pop(name) for name in RuntimeOptions.names() if name in overrides}
    quantized = overrides.pop("quantized", None)
    tokenizer = None
    if path.is_file() and path.suffix == ".gguf":
        from lmforge.io.gguf import GGUFFile
        from lmforge.io.gguf_model import load_gguf_model

        gguf = GGUFFile(path)  # parsed once, for the tokenizer and the model
        tokenizer = _gguf_tokenizer(gguf)
        keep = dtype is None if quantized is None else quantized  # quantized unless a float dtype is asked for
        model = load_gguf_model(gguf, dtype=dtype, quantized=keep, **overrides)
    else:
        from lmforge.io.hf import quant_method
        from lmforge.io.hf_gptq import HF_FORMATS, load_hf_quantized
        from lmforge.io.quantized import QUANT_METHOD, load_quantized

        method = quant_method(path)
        if method == QUANT_METHOD or method in HF_FORMATS:
            reader = load_quantized if method == QUANT_METHOD else load_hf_quantized
            model = reader(path, dtype=dtype, **overrides)
            if quantized is False:
                from lmforge.quant.modules import dequantize_model

                dequantize_model(model, dtype)
        elif quantized:
            raise ValueError(f"{path}: quantized=True keeps a GGUF file's or a quantized model directory's "
                             "quantized weights; this directory holds a float model")  # fmt: skip
        else:
            model = load_hf(path, dtype=dtype, **overrides)
        with contextlib.suppress(FileNotFoundError):
            tokenizer = load_tokenizer(path)
    _set_runtime(model, runtime)
    return model, tokenizer


def _set_runtime(model: Transformer, options: dict[str, Any]) -> None:
    """Set `options` on the model's one `RuntimeOptions` object (shared by its layers), checked first."""
    checked = dataclasses.replace(model.runtime, **options)
    for name in options:
        setattr(model.runtime, name, getattr(checked, name))


@paused_gc()
def load_tokenizer(path: str | Path, **kwargs: Any) -> BaseTokenizer:
    """A tokenizer from a directory (tokenizer.json, or vocab.json + merges.txt), a `.tiktoken` file or a
    GGUF file.

    A `.tiktoken` file holds only the ranks: pass `pattern=` and `special_tokens=` for it (the
    defaults are cl100k's)."""
    from lmforge.tokenizer.formats import load_tokenizer as load_any

    if Path(path).suffix == ".gguf" and Path(path).is_file():
        from lmforge.io.gguf import GGUFFile

        with GGUFFile(path) as gguf:
            return _gguf_tokenizer(gguf)
    return load_any(path, **kwargs)


def _gguf_tokenizer(gguf: Any) -> BaseTokenizer:
    """The tokenizer of an open `GGUFFile`."""
    from lmforge.tokenizer.gguf_vocab import tokenizer_from_gguf

    tok = tokenizer_from_gguf(gguf.metadata, str(gguf.path))
    tok.source = str(gguf.path)
    return tok
