"""`param_groups(model, weight_decay)` puts norms, biases (every < 2-D parameter) and embedding
tables in a group with no weight decay, the usual practice (decaying a norm's gain towards 0 or shrinking rare
token rows only hurts). Tied weights count once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn


def _module_param_ids(model: nn.Module, keep: Callable[[str, nn.Module], bool]) -> set[int]:
    return {id(p) for name, m in model.named_modules() if keep(name, m) for p in m.parameters(recurse=False)}


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float | None = None,
    no_decay: Sequence[str] = (),
    *,
    muon: bool = False,
    head_names: Sequence[str] = ("lm_head",),
) -> list[dict[str, Any]]:
    """Parameter groups for an optimizer: `weight_decay` on matrices, none on norms, biases and embeddings.

    No decay for: every parameter with fewer than 2 dims, the weights of `nn.Embedding` modules, and any parameter
    whose name contains one of the `no_decay` strings. A parameter reachable twice (tied weights) appears once.
    `lr`, if given, is set on every group. With `muon=True` each group also gets `use_muon`: True for 2-D
    parameters that are neither embeddings nor in a module named in `head_names`, False for the rest (AdamW).
    Empty groups are left out.
    """
    embeddings = _module_param_ids(model, lambda _, m: isinstance(m, nn.Embedding))
    heads = _module_param_ids(model, lambda name, _: name.split(".")[-1] in head_names)
    groups: dict[tuple[bool, bool], list[Tensor]] = {}
    for name, p in model.named_parameters():  # named_parameters yields a shared Parameter once
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and id(p) not in embeddings and not any(s in name for s in no_decay)
        hidden = muon and p.ndim == 2 and id(p) not in embeddings and id(p) not in heads
        groups.setdefault((hidden, decay), []).append(p)
    result = []
    for (hidden, decay), ps in sorted(groups.items(), reverse=True):
        group: dict[str, Any] = {"params": ps, "weight_decay": weight_decay if decay else 0.0}
        if lr is not None:
            group["lr"] = lr
        if muon:
            group["use_muon"] = hidden
        result.append(group)
    return result
