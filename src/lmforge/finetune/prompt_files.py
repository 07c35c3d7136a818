"""Prompt and prefix tuning to and from PEFT's files (`io.peft`): PROMPT_TUNING and PREFIX_TUNING adapters.

A directory holds adapter_config.json and adapter_model.safetensors, with one tensor, as PEFT writes it:

    PROMPT_TUNING   prompt_embeddings (n, token_dim): the prompt P; token_dim = hidden size
    PREFIX_TUNING   prompt_embeddings (n, num_layers 2 token_dim): the prefix itself, the encoder's OUTPUT (with
                    prefix_projection the MLP is not saved: PEFT writes its result, and loads the file into a
                    plain embedding, inference mode); token_dim = Hkv head_dim and num_attention_heads = Hkv (PEFT's
                    GQA rule), row i viewed as (2 num_layers, Hkv, head_dim): layer l's key 2l, value 2l + 1

The config's num_virtual_tokens, token_dim, num_layers, num_attention_heads, num_transformer_submodules (1: a
decoder), task_type CAUSAL_LM, prefix_projection and encoder_hidden_size are written as PEFT writes them. Loading
checks each against the model and the tensor, and refuses (naming the file and the field) what does not fit or
what lmforge does not implement (another peft_type, modules_to_save, an encoder-decoder's two submodules).
A loaded prefix is the plain (unprojected) encoder holding the file's prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.finetune.prefix_tuning import add_prefix_tuning
from lmforge.finetune.prompt_tuning import PromptEmbedding, add_prompt_tuning, find_tuning
from lmforge.io.peft import CONFIG_FILE, WEIGHTS_FILE, PeftFormatError, read_peft, write_peft

__all__ = ["PromptFileError", "load_prompt", "save_prompt"]

TENSOR = "prompt_embeddings"
_INITS = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}


class PromptFileError(PeftFormatError):
    """A PROMPT_TUNING or PREFIX_TUNING directory that does not fit the model, or asks for what lmforge does not
    implement; the message names the file and the field."""


def save_prompt(model: nn.Module, directory: str | Path, *, base_model: str = "",
                tokenizer_name_or_path: str = "") -> None:  # fmt: skip
    """Write the model's prompt or prefix (`find_tuning`) to `directory` in PEFT's format. `base_model` goes in
    base_model_name_or_path; a prompt started from text records prompt_tuning_init TEXT only with
    `tokenizer_name_or_path` (PEFT refuses TEXT without one), else RANDOM."""
    tuning, cfg = find_tuning(model), model.config
    common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
              "num_virtual_tokens": tuning.n_virtual, "num_layers": cfg.n_layers, "num_transformer_submodules": 1,
              "inference_mode": True, "modules_to_save": None, "revision": None, "auto_mapping": None}  # fmt: skip
    if isinstance(tuning, PromptEmbedding):
        init = _INITS[tuning.init] if tuning.init != "text" or tokenizer_name_or_path else "RANDOM"
        config = common | {
            "peft_type": "PROMPT_TUNING", "token_dim": tuning.embedding_dim, "num_attention_heads": cfg.n_heads,
            "prompt_tuning_init": init, "prompt_tuning_init_text": tuning.init_text if init == "TEXT" else None,
            "tokenizer_name_or_path": tokenizer_name_or_path or None, "tokenizer_kwargs": None,
        }  # fmt: skip
        tensor = tuning.prompt
    else:
        config = common | {
            "peft_type": "PREFIX_TUNING", "token_dim": tuning.token_dim, "num_attention_heads": tuning.n_kv_heads,
            "prefix_projection": tuning.projection, "encoder_hidden_size": tuning.encoder_hidden_size,
            "init_weights": None,
        }  # fmt: skip
        with torch.no_grad():
            tensor = tuning()
    write_peft(directory, config, {TENSOR: tensor.detach().cpu()})


def load_prompt(model: nn.Module, directory: str | Path) -> nn.Module:
    """Give `model` the prompt (PROMPT_TUNING) or prefix (PREFIX_TUNING) in PEFT directory `directory`; returns
    it (`model.embed` or `model.prefix_encoder`)."""
    config, tensors = read_peft(directory)
    where, weights = Path(directory) / CONFIG_FILE, Path(directory) / WEIGHTS_FILE
    cfg = model.config
    kind = config.get("peft_type")
    if kind not in ("PROMPT_TUNING", "PREFIX_TUNING"):
        hint = " (a LoRA adapter: finetune.adapter_files.load_adapter)" if kind == "LORA" else ""
        raise PromptFileError(f"{where}: peft_type={kind!r}; lmforge loads PROMPT_TUNING and PREFIX_TUNING here"
                              f"{hint}")  # fmt: skip
    _expect(where, config, "task_type", ("CAUSAL_LM", None), "lmforge's models are causal LMs")
    _expect(where, config, "num_transformer_submodules", (1, None), "1 (a decoder-only model)")
    if config.get("modules_to_save") not in (None, []):
        raise PromptFileError(f"{where}: modules_to_save={config['modules_to_save']!r} is not supported by lmforge's "
                              "prompt learning")  # fmt: skip
    n = config.get("num_virtual_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise PromptFileError(f"{where}: num_virtual_tokens={n!r}: expected a positive integer")
    prompt = kind == "PROMPT_TUNING"
    token_dim = cfg.d_model if prompt else cfg.kv_heads * cfg.dim_head
    _expect(where, config, "token_dim", (token_dim,), f"this model's {'hidden size' if prompt else 'Hkv * head_dim'}")
    if not prompt:
        _expect(where, config, "num_layers", (cfg.n_layers,), "this model's layer count")
        _expect(where, config, "num_attention_heads", (cfg.kv_heads,), "this model's key/value head count")
    if set(tensors) != {TENSOR}:
        raise PromptFileError(f"{weights}: tensors {sorted(tensors)}; a {kind} file holds exactly {TENSOR!r}")
    tensor = tensors[TENSOR]
    shape = (n, token_dim if prompt else cfg.n_layers * 2 * token_dim)
    if tuple(tensor.shape) != shape or not tensor.is_floating_point():
        raise PromptFileError(f"{weights}: {TENSOR} has shape {tuple(tensor.shape)} ({tensor.dtype}); "
                              f"num_virtual_tokens and token_dim say {shape} (floating point)")  # fmt: skip
    if prompt:
        tuning = add_prompt_tuning(model, n, init="random", generator=torch.Generator().manual_seed(0))
        target = tuning.prompt
        tuning.init = _lmforge_init(config.get("prompt_tuning_init"))
        tuning.init_text = config.get("prompt_tuning_init_text") if tuning.init == "text" else None
    else:
        tuning = add_prefix_tuning(model, n, zero_init=True)
        target = tuning.embedding.weight
    with torch.no_grad():
        target.copy_(tensor.to(target.dtype))
    return tuning


def _lmforge_init(peft_init: Any) -> str:
    return {v: k for k, v in _INITS.items()}.get(peft_init, "random")


def _expect(where: Path, config: dict[str, Any], field: str, allowed: tuple[Any, ...], what: str) -> None:
    value = config.get(field)
    if value not in allowed or isinstance(value, bool):
        raise PromptFileError(f"{where}: {field}={value!r}; expected {allowed[0]!r} ({what})")
