"""mergekit as the reference of the merging tests: its merge of a config, and a checkpoint's tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def mergekit_merge(config: dict, out: Path, **options) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    opts = MergeOptions(cuda=False, copy_tokenizer=False, write_model_card=False, quiet=True, **options)
    run_merge(MergeConfiguration.model_validate(config), str(out), opts)
    return read_weights(out)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out
