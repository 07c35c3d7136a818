"""PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`, as the `peft` library writes and reads.

A LoRA adapter directory holds

    adapter_config.json         {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora",
                                 "target_modules", "bias": "none", "task_type": "CAUSAL_LM", ...}
    adapter_model.safetensors   base_model.model.<HF module>.lora_A.weight (r, in), .lora_B.weight (out, r),
                                and with DoRA .lora_magnitude_vector (out,)

where <HF module> is the module's name in the transformers model (`model.layers.0.self_attn.q_proj`); lmforge
names it `blocks.0.attn.q_proj` (`hf_module_name` maps one to the other through the checkpoint name maps of
`io.hf_arch`). `target_modules` is written as the list of full module names, which PEFT matches exactly (a name
equal to, or ending with "." + , an entry), so PEFT adapts exactly the modules lmforge did.

This module reads and writes the files (each atomically, the weights before the config, into a directory that
may hold other things: `lmforge finetune` keeps its logs and checkpoints beside them); applying the tensors to a
model is `finetune.adapter_files`' job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmforge.config import ModelConfig
from lmforge.io.hf_arch import tensor_maps
from lmforge.utils.atomic import atomic_path, atomic_write
from lmforge.utils.errors import LmforgeError

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
TENSOR_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}


class PeftFormatError(LmforgeError):
    """A PEFT directory that is missing a file, or holds a field or tensor lmforge cannot honour."""


def hf_module_name(cfg: ModelConfig, module: str) -> str:
    """The transformers name of lmforge linear module `module` (e.g. blocks.0.attn.q_proj ->
    model.layers.0.self_attn.q_proj); a module whose weight is not one checkpoint tensor of its own (GPT-2's
    fused c_attn, transposed Conv1D weights, stacked MoE experts) raises `PeftFormatError`."""
    [m] = tensor_maps(cfg, [f"{module}.weight"])
    if len(m.ours) != 1 or len(m.theirs) != 1 or not m.theirs[0].endswith(".weight") or cfg.arch == "gpt2":
        raise PeftFormatError(f"{module}: PEFT files for this {cfg.arch} module are not supported (its checkpoint "
                              f"tensor is {', '.join(m.theirs)}); adapt the llama-family projections")  # fmt: skip
    return m.theirs[0].removesuffix(".weight")


def write_peft(directory: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write `config` (adapter_config.json) and `tensors` (already under PEFT's names) to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file({k: t.detach().contiguous() for k, t in tensors.items()}, tmp, metadata={"format": "pt"})
    atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_peft(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, the tensors by their PEFT names) of `directory`; a clear error for what is missing."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise PeftFormatError(f"{path}: not found (a PEFT adapter directory holds {CONFIG_FILE} and "
                                  f"{WEIGHTS_FILE}; adapter_model.bin is not read)")  # fmt: skip
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftFormatError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise PeftFormatError(f"{config_path}: expected a JSON object")
    return config, load_file(weights_path)


def split_key(key: str, where: str) -> tuple[str, str]:
    """(HF module name, lmforge tensor kind: lora_A / lora_B / magnitude) of a PEFT tensor name."""
    for kind, suffix in TENSOR_NAMES.items():
        if key.startswith(PREFIX) and key.endswith("." + suffix):
            return key[len(PREFIX) : -len(suffix) - 1], kind
    raise PeftFormatError(f"{where}: tensor {key!r} is not a LoRA tensor lmforge reads (base_model.model.<module>."
                          f"lora_A.weight, lora_B.weight or lora_magnitude_vector)")  # fmt: skip


def peft_key(hf_module: str, kind: str) -> str:
    return f"{PREFIX}{hf_module}.{TENSOR_NAMES[kind]}"
