"""A PEFT LoRA adapter as a task vector: the change it makes to each weight it adapts.

A LoRA adapter on a linear layer W (out, in) computes x W^T + s x A^T B^T with A (r, in), B (out, r) and the
scaling s = alpha / r (alpha / sqrt(r) with rsLoRA), so merged into the weight it is

    W' = W + delta W,    delta W = (B @ A) * s

which is what PEFT's `merge_and_unload` writes (and mergekit's "MODEL+LORA" references load). The task vector
{"model.layers.0.self_attn.q_proj.weight": delta W, ...} is keyed by checkpoint tensor name, so it adds to a
Hugging Face checkpoint (or enters task arithmetic) directly. Files and fields are read by `io.peft` and checked
as `finetune.adapter_files` checks them when loading an adapter (DoRA, per-module ranks, trained biases refused).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from lmforge.finetune.adapter_files import _lora_config
from lmforge.io.peft import CONFIG_FILE, WEIGHTS_FILE, PeftFormatError, read_peft, split_key


def lora_factors(directory: str | Path) -> dict[str, tuple[Tensor, Tensor, float]]:
    """{checkpoint weight name: (B, A, scaling)} for every module the PEFT LoRA adapter in `directory` adapts (the
    low-rank factors: a merge forms each delta W only when it reads that weight)."""
    directory = Path(directory)
    config, tensors = read_peft(directory)
    lora = _lora_config(config, directory / CONFIG_FILE)
    if lora.dora:
        raise PeftFormatError(f"{directory / CONFIG_FILE}: use_dora=true: a DoRA adapter is not a task vector "
                              "(its magnitude rescales whole columns); merge it with lmforge finetune")  # fmt: skip
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        module, kind = split_key(key, str(directory / WEIGHTS_FILE))
        parts.setdefault(module, {})[kind] = t
    factors = {}
    for module, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise PeftFormatError(f"{directory / WEIGHTS_FILE}: module {module!r} has {sorted(ab)}, "
                                  "not one lora_A and one lora_B")  # fmt: skip
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise PeftFormatError(f"{directory / WEIGHTS_FILE}: module {module!r}: lora_B {tuple(b.shape)} @ "
                                  f"lora_A {tuple(a.shape)} is not a matrix product")  # fmt: skip
        factors[f"{module}.weight"] = (b, a, lora.scaling)
    return factors


def delta_weight(b: Tensor, a: Tensor, scaling: float) -> Tensor:
    """delta W = (B @ A) * scaling, in PEFT's order of operations."""
    return (b @ a) * scaling


def lora_task_vector(directory: str | Path) -> dict[str, Tensor]:
    """{checkpoint weight name: (B @ A) * scaling} for every module the PEFT LoRA adapter in `directory` adapts."""
    return {name: delta_weight(*f) for name, f in lora_factors(directory).items()}
