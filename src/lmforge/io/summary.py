"""Summaries of model files, without loading the weights into memory (what `lmforge info` shows).

    describe(path)          a Hugging Face directory or GGUF file: architecture, config fields, parameters,
                            dtype, size on disk
    describe_gguf(path)     a GGUF file: its metadata, tensor types and the lmforge config it loads as
    gguf_tensor_rows(path)  (name, type, shape, size) of every tensor of a GGUF file
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.utils.errors import LmforgeError


def _count_params(cfg: ModelConfig) -> int:
    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(cfg).num_parameters()


def describe(path: str | Path) -> dict[str, Any]:
    """Architecture, config fields, parameter count, dtype and file size of a model directory or GGUF file."""
    from lmforge.io.hf import read_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix == ".gguf":
        return describe_gguf(path)
    if not path.is_dir():
        raise LmforgeError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    cfg, sources = read_model(path)  # config.json checked against the safetensors headers before counting
    files = set(sources.values())
    dtypes = sorted({str(f.get(k).dtype).removeprefix("torch.") for f in files for k in f.keys()})  # noqa: SIM118
    summary: dict[str, Any] = {"architecture": cfg.arch}
    params = _count_params(cfg)
    summary["parameters"] = f"{params:,} ({params / 1e6:.1f}M)"
    summary["dtype"] = ", ".join(dtypes)
    size = sum(f.path.stat().st_size for f in files)
    summary["file size"] = _human_size(size)
    return summary | _config_rows(cfg)


def _config_rows(cfg: ModelConfig) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name in ("arch", "extra") or value is None or value is False:
            continue
        summary[field.name] = value
    return summary


def describe_gguf(path: Path) -> dict[str, Any]:
    """A GGUF file: its metadata (long arrays summarised), tensor types with their sizes, and the
    lmforge config it loads as (when the architecture is supported)."""
    from collections import Counter

    from lmforge.io.gguf import GGUFFile
    from lmforge.io.gguf_model import check_structure, config_from_gguf

    with GGUFFile(path) as gguf:
        summary: dict[str, Any] = {"format": f"GGUF v{gguf.version}", "file size": _human_size(path.stat().st_size)}
        counts: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        for info in gguf.tensors.values():
            counts[info.type_name] += 1
            sizes[info.type_name] += info.n_bytes
        params = sum(info.n_elements for info in gguf.tensors.values())
        summary["parameters"] = f"{params:,} ({params / 1e6:.1f}M) in {len(gguf.tensors)} tensors"
        summary["tensor types"] = ", ".join(f"{t}: {counts[t]} ({_human_size(sizes[t])})" for t in sorted(counts))
        for key, value in gguf.metadata.items():
            if isinstance(value, list) and len(value) > 8:
                value = f"[{len(value)} items] {', '.join(map(repr, value[:3]))}, ..."
            elif isinstance(value, str) and len(value) > 200:
                value = value[:200] + f"... ({len(value)} characters)"
            summary[key] = value
        try:
            cfg = config_from_gguf(gguf)
            check_structure(gguf, cfg)
        except LmforgeError as e:
            summary["lmforge"] = f"cannot load: {e}"
            return summary
    return summary | {f"lmforge {k}": v for k, v in _config_rows(cfg).items()}


def gguf_tensor_rows(path: str | Path) -> list[tuple[str, str, str, str]]:
    """(name, type, shape, size) of every tensor of a GGUF file, in file order."""
    from lmforge.io.gguf import GGUFFile

    path = Path(path)
    if path.suffix != ".gguf":
        raise LmforgeError(f"{path}: --tensors lists the tensors of a .gguf file")
    with GGUFFile(path) as gguf:
        return [
            (t.name, t.type_name, "x".join(map(str, t.shape)), _human_size(t.n_bytes)) for t in gguf.tensors.values()
        ]


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
