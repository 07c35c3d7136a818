"""Hugging Face model directories in and out.

A directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Loading builds the model on the meta device (no
memory), maps every checkpoint tensor onto its lmforge parameter with the
per-architecture tables of `lmforge.io.hf_arch`, and assigns the memory-mapped
tensors directly, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge.config import ModelConfig
from lmforge.io.hf_arch import HF_CLASSES, IGNORED, tensor_maps
from lmforge.io.safetensors_mmap import SafetensorsFile
from lmforge.model.transformer import Transformer
from lmforge.utils.atomic import atomic_path, atomic_write
from lmforge.utils.errors import LmforgeError

SHARD_BYTES = 4 * 1024**3
KEEP_FP32 = ("score_bias",)  # routing-critical buffers that stay float32 whatever dtype is asked for


class CheckpointError(LmforgeError):
    """A checkpoint's files do not match its config; the message names the tensor or file."""


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None


def _open_weights(path: Path) -> dict[str, SafetensorsFile]:
    """Checkpoint tensor name -> the file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {f: SafetensorsFile(path / f) for f in sorted(set(weight_map.values()))}
        return {name: files[f] for name, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json (found: {found})")
    f = SafetensorsFile(single)
    return dict.fromkeys(f.keys(), f)


def _ignored(name: str, cfg: ModelConfig) -> bool:
    """Checkpoint tensors that are not weights of the model: derived buffers, a tied head's copy, and
    DeepSeek-V3's multi-token-prediction layers (numbered from n_layers on; used only for training)."""
    if any(re.search(p, name) for p in IGNORED) or (cfg.tie_embeddings and name == "lm_head.weight"):
        return True
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    return cfg.arch == "deepseek_v3" and layer is not None and int(layer.group(1)) >= cfg.n_layers


def load_hf(path: str | Path, dtype: torch.dtype | None = None, **overrides: Any) -> Transformer:
    """Load a Hugging Face model directory as a `Transformer` (eval mode)."""
    path = Path(path)
    cfg = ModelConfig.from_hf(read_config(path)).replace(**overrides)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = dict(model.state_dict())
    sources = _open_weights(path)
    stored = {n: n for n in sources}  # canonical name -> name in the file
    if cfg.arch == "gpt2":  # the original GPT-2 checkpoints have no "transformer." prefix
        stored = {(n if n.startswith(("transformer.", "lm_head")) else f"transformer.{n}"): n for n in sources}
    used: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    for m in tensor_maps(cfg, list(expected)):
        missing = [n for n in m.theirs if n not in stored]
        if missing:
            raise CheckpointError(f"{path}: missing tensor {missing[0]!r} (needed for {m.ours[0]})")
        used.update(m.theirs)
        for name, t in zip(m.ours, m.load([sources[stored[n]].get(stored[n]) for n in m.theirs]), strict=True):
            if tuple(t.shape) != tuple(expected[name].shape):
                raise CheckpointError(
                    f"{path}: tensor {m.theirs[0]!r} has shape {tuple(t.shape)}; "
                    f"the config needs {tuple(expected[name].shape)} for {name}"
                )
            keep = not t.is_floating_point() or name.endswith(KEEP_FP32)
            state[name] = t.to(dtype) if dtype is not None and not keep else t
    extra = [n for n in stored if n not in used and not _ignored(n, cfg)]
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} unused in all)")
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face checkpoint names."""
    cfg = model.config
    ours = dict(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for m in tensor_maps(cfg, list(ours)):
        for name, t in zip(m.theirs, m.save([ours[n] for n in m.ours]), strict=True):
            out[name] = t.detach().contiguous()
    return out


def save_hf(model: Transformer, path: str | Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Write `config.json` and safetensors weights (sharded with an index above `shard_bytes`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    config = model.config.to_hf()
    config["architectures"] = [HF_CLASSES[model.config.arch]]
    config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        _atomic_save_tensors(shards[0], path / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save_tensors(shard, path / fname)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(path / "model.safetensors.index.json", json.dumps(index, indent=2))
    atomic_write(path / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
