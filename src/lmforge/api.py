"""The public entry points: `lmforge.load`, `lmforge.load_tokenizer`, `lmforge.save`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.model.transformer import Transformer


def load(path: str | Path, dtype: torch.dtype | None = None, **overrides: Any) -> tuple[Transformer, Any]:
    """Load a model directory and return `(model, tokenizer)`.

    `path` is a Hugging Face model directory (config.json + safetensors). `dtype`
    casts floating-point weights; `overrides` replace `ModelConfig` fields (e.g.
    `attn_backend="eager"`). The tokenizer is None until tokenizer loading lands.
    """
    from lmforge.io.hf import load_hf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return load_hf(path, dtype=dtype, **overrides), load_tokenizer(path)


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer stored with a model, or None when there is none (tokenizers arrive in a later release)."""
    return None


def save(model: Transformer, path: str | Path, tokenizer: Any = None) -> None:
    """Write `model` as a Hugging Face directory that `transformers` loads."""
    from lmforge.io.hf import save_hf

    save_hf(model, path)
    if tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(path)
