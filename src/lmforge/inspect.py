"""Summaries of model files for `lmforge info`, without loading the weights into memory."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig


def _count_params(cfg: ModelConfig) -> int:
    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(cfg).num_parameters()


def describe(path: str | Path) -> dict[str, Any]:
    """Architecture, config fields, parameter count, dtype and file size of a model directory."""
    from lmforge.io.hf import _open_weights, read_config

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ValueError(f"{path}: expected a Hugging Face model directory")
    cfg = ModelConfig.from_hf(read_config(path))
    files = set(_open_weights(path).values())
    dtypes = sorted({str(f.get(k).dtype).removeprefix("torch.") for f in files for k in f.keys()})  # noqa: SIM118
    summary: dict[str, Any] = {"architecture": cfg.arch}
    params = _count_params(cfg)
    summary["parameters"] = f"{params:,} ({params / 1e6:.1f}M)"
    summary["dtype"] = ", ".join(dtypes)
    size = sum(f.path.stat().st_size for f in files)
    summary["file size"] = _human_size(size)
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name in ("arch", "extra", "attn_backend") or value is None or value is False:
            continue
        summary[field.name] = value
    return summary


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
