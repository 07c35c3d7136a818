"""The input models of a merge, opened without reading their weights, and checked against each other before any
work: same architecture (config.json `model_type` and `architectures`), same vocabulary (tokenizer files), every
tensor the merge needs present in every model with one shape.

A model is a Hugging Face directory read through `io.hf.open_weights` (safetensors headers validated, tensors
memory-mapped: reading one costs only its own pages). "DIR+ADAPTER" adds a PEFT LoRA's task vector
(`merge.lora`) to the weights it adapts as they are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmforge.io.hf import open_weights, read_config
from lmforge.io.safetensors_mmap import SafetensorsFile
from lmforge.merge.config import ModelRef
from lmforge.merge.lora import delta_weight, lora_factors
from lmforge.merge.methods import MergeConfigError
from lmforge.merge.plan import TensorTask

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")  # fmt: skip


class InputModel:
    """One input: its config.json, its tensors (name -> memory-mapped file), and a LoRA adapter's factors if any."""

    def __init__(self, ref: ModelRef, where: str) -> None:
        self.ref = ref
        if not (ref.path / "config.json").is_file():
            raise MergeConfigError(f"{where}: model {ref.path}: not a model directory (no config.json; "
                                   "lmforge merges local Hugging Face directories)")  # fmt: skip
        self.config: dict[str, Any] = read_config(ref.path)
        self.files: dict[str, SafetensorsFile] = open_weights(ref.path)
        self.lora = lora_factors(ref.lora) if ref.lora else {}
        for name, (b, a, _) in self.lora.items():
            shape = (b.shape[0], a.shape[1])
            if name not in self.files or self.files[name].shape(name) != shape:
                have = self.files[name].shape(name) if name in self.files else "no such tensor"
                raise MergeConfigError(f"{ref.lora}: the adapter's update of {name!r} has shape {shape}; "
                                       f"model {ref.path} has {have}")  # fmt: skip

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[name].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.files[name].get(name).dtype  # a view of the memory map: nothing is read

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `name` (the LoRA update added), cast to `dtype` when given."""
        t = self.files[name].get(name)
        if name in self.lora:
            t = (t + delta_weight(*self.lora[name])).to(t.dtype)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _vocabulary(path: Path) -> tuple[str, Any] | None:
    """(file, what defines its vocabulary) of a model directory's tokenizer, None without one."""
    if (path / "tokenizer.json").is_file():
        try:
            data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MergeConfigError(f"{path / 'tokenizer.json'}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise MergeConfigError(f"{path / 'tokenizer.json'}: expected a JSON object")
        added = [(t.get("id"), t.get("content")) for t in data.get("added_tokens") or []]
        return "tokenizer.json", ((data.get("model") or {}).get("vocab"), added)
    for name in ("tokenizer.model", "vocab.json"):
        if (path / name).is_file():
            return name, (path / name).read_bytes()
    return None


def check_models(models: list[InputModel], tasks: list[TensorTask]) -> None:
    """Refuse, naming the file or tensor, models that differ in architecture or vocabulary, and tensors that are
    missing from one input or differ in shape between inputs."""
    first = models[0]
    for m in models[1:]:
        for key in ("model_type", "architectures"):
            if m.config.get(key) != first.config.get(key):
                raise MergeConfigError(f"{m.ref.path / 'config.json'}: {key} is {m.config.get(key)!r}, but "
                                       f"{first.ref.path / 'config.json'} has {first.config.get(key)!r}")  # fmt: skip
    vocabularies = [(m, v) for m in models if (v := _vocabulary(m.ref.path))]
    for m, (file, vocab) in vocabularies[1:]:
        first_model, (first_file, first_vocab) = vocabularies[0]
        if (file, vocab) != (first_file, first_vocab):
            raise MergeConfigError(f"{m.ref.path / file}: the vocabulary differs from "
                                   f"{first_model.ref.path / first_file}'s (lmforge merges models that share one "
                                   "tokenizer)")  # fmt: skip
    by_ref = {m.ref: m for m in models}
    for task in tasks:
        shapes = []
        for ref, name in task.inputs:
            if name not in by_ref[ref].files:
                raise MergeConfigError(f"{ref.path}: no tensor {name!r} (needed for output tensor {task.name!r})")
            shapes.append((ref, by_ref[ref].shape(name)))
        for ref, shape in shapes[1:]:
            if shape != shapes[0][1]:
                raise MergeConfigError(f"tensor {task.name!r}: shape {shape} in {ref.path}, but {shapes[0][1]} in "
                                       f"{shapes[0][0].path}")  # fmt: skip
