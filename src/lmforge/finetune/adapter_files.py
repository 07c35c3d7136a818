"""Adapters to and from PEFT's files (`io.peft`): what `peft` loads onto the transformers model, and back.

Saving writes the adapter's config (r, alpha, dropout, rsLoRA, DoRA) and, per adapted module, its tensors under
the transformers module name; the base weights are not written. Loading reads a PEFT LoRA directory (from
`peft`'s `save_pretrained` or from `save_adapter`), adds the adapter to the modules its tensors name and copies
them in. Fields PEFT may set that would change the computation and that lmforge does not implement (per-module
`rank_pattern` / `alpha_pattern`, trained biases, `modules_to_save`, other adapter types) are refused with the
field named, never silently dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.finetune.lora import (
    LoraConfig,
    LoRAError,
    adapter_state_dict,
    add_adapter,
    layers,
    load_adapter_state_dict,
    resolve_adapter,
)
from lmforge.finetune.prompt_files import load_prompt
from lmforge.io.peft import CONFIG_FILE, PeftFormatError, hf_module_name, peft_key, read_peft, split_key, write_peft

__all__ = ["apply_adapter", "load_adapter", "save_adapter"]


def save_adapter(model: nn.Module, directory: str | Path, name: str | None = None, *, base_model: str = "") -> None:
    """Write adapter `name` (default: the active one) of `model` to `directory` in PEFT's format;
    `base_model` goes in the config's base_model_name_or_path."""
    name = resolve_adapter(model, name)
    state = adapter_state_dict(model, name)
    configs = {layer.adapters[name].config for _, layer in layers(model) if name in layer.adapters}
    if len(configs) != 1:
        raise LoRAError(f"adapter {name!r} has modules of different shapes; PEFT's file holds one r and alpha")
    config = configs.pop()
    tensors, modules = {}, []
    for key, t in state.items():
        module, _, kind = key.rpartition(".")
        if t.dim() != {"magnitude": 1}.get(kind, 2):
            raise PeftFormatError(f"{module}: MoE expert adapters have no PEFT file format here yet")
        hf = hf_module_name(model.config, module)
        tensors[peft_key(hf, kind)] = t
        if kind == "lora_A":
            modules.append(hf)
    write_peft(directory, _peft_config(config, sorted(modules), base_model), tensors)


def _peft_config(config: LoraConfig, modules: list[str], base_model: str) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.rslora,
        "use_dora": config.dora, "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "lora_bias": False,
    }  # fmt: skip


# fields whose non-default value changes what the adapter computes, and lmforge does not implement
_REFUSED = {"rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "modules_to_save": None, "lora_bias": False,
            "layer_replication": None, "trainable_token_indices": None, "target_parameters": None,
            "use_qalora": False, "alora_invocation_tokens": None}  # fmt: skip


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> list[str]:
    """Add the PEFT LoRA adapter in `directory` to `model` as adapter `name` (made active); returns the lmforge
    names of the modules it adapts."""
    config, tensors = read_peft(directory)
    where = Path(directory) / CONFIG_FILE
    lora = _lora_config(config, where)
    ours = {hf_module_name(model.config, n): n for n in _linear_names(model)}
    state: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        hf, kind = split_key(key, str(Path(directory) / "adapter_model.safetensors"))
        if hf not in ours:
            raise PeftFormatError(f"{directory}: tensor {key!r} adapts {hf!r}, which this {model.config.arch} "
                                  "model does not have (an adapter for another base model?)")  # fmt: skip
        state[f"{ours[hf]}.{kind}"] = t
    modules = sorted({key.rpartition(".")[0] for key in state})
    if not modules:
        raise PeftFormatError(f"{directory}: the adapter holds no LoRA tensors")
    added = add_adapter(model, lora, name, where=modules)
    model_dtype = next(iter(adapter_state_dict(model, name).values())).dtype
    load_adapter_state_dict(model, {k: t.to(model_dtype) for k, t in state.items()}, name)
    return added


def apply_adapter(model: nn.Module, directory: str | Path) -> None:
    """Give `model` the PEFT adapter in `directory`, whichever kind it is: LoRA (`load_adapter`: adapter "default",
    active), or a prompt or prefix (`prompt_files.load_prompt`)."""
    config, _ = read_peft(directory)
    if config.get("peft_type") in ("PROMPT_TUNING", "PREFIX_TUNING"):
        load_prompt(model, directory)
    else:
        load_adapter(model, directory)


def _linear_names(model: nn.Module) -> list[str]:
    """The model's linear modules that have a transformers name (the LoRA base under an adapter counts as its
    layer)."""
    names = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and n.startswith("blocks."):
            n = n.removesuffix(".base")
            try:
                hf_module_name(model.config, n)
            except PeftFormatError:
                continue
            names.append(n)
    return names


def _lora_config(config: dict[str, Any], where: Path) -> LoraConfig:
    if config.get("peft_type") != "LORA":
        raise PeftFormatError(f"{where}: peft_type={config.get('peft_type')!r}; lmforge loads LORA adapters here")
    for field, default in _REFUSED.items():
        if config.get(field, default) not in (default, None, {}, []):
            raise PeftFormatError(f"{where}: {field}={config[field]!r} is not supported by lmforge's LoRA")
    try:
        return LoraConfig(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                          rslora=bool(config.get("use_rslora", False)), dora=bool(config.get("use_dora", False)),
                          target=("*",))  # fmt: skip
    except KeyError as e:
        raise PeftFormatError(f"{where}: the field {e.args[0]!r} is missing") from None
