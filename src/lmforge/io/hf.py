"""Hugging Face model directories in and out.

A directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Loading builds the model on the meta device (no
memory), maps every checkpoint tensor onto its lmforge parameter with the
per-architecture tables of `lmforge.io.hf_arch`, and assigns the memory-mapped
tensors directly, so peak memory stays near one copy of the weights.

Nothing in the directory is trusted before it is checked (`read_model`): config.json's keys are
typed at the boundary (`hf_arch.config_from_hf`), every safetensors header is validated when opened,
an index may name only shards inside the model directory (symlinks included; a Hugging Face hub
cache snapshot may link into its repo's blobs/), and the layer, expert, head, vocabulary and size
counts are checked against the tensors' header shapes before a single module is built. Every
failure is one `LmforgeError` naming the file and its key or tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge.config import ModelConfig
from lmforge.io.hf_arch import (
    HF_CLASSES,
    IGNORED,
    ModelFilesError,
    check_structure,
    config_from_hf,
    config_to_hf,
    tensor_maps,
)
from lmforge.io.safetensors_mmap import SafetensorsFile
from lmforge.model.transformer import Transformer
from lmforge.utils.atomic import atomic_directory, atomic_path, atomic_write

SHARD_BYTES = 4 * 1024**3
KEEP_FP32 = ("score_bias",)  # routing-critical buffers that stay float32 whatever dtype is asked for


INDEX = "model.safetensors.index.json"
CheckpointError = ModelFilesError  # the name before ModelFilesError (kept working): not train.checkpoint's error


def _read_json(path: Path) -> Any:
    """A JSON file's value; a ModelFilesError naming the file when it is not valid UTF-8 JSON."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelFilesError(f"{path}: invalid JSON ({e})") from None


def read_config(path: Path) -> dict[str, Any]:
    """The config.json of a model directory, as a dict (a ModelFilesError naming the file otherwise)."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelFilesError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    d = _read_json(cfg_path)
    if not isinstance(d, dict):
        raise ModelFilesError(f"{cfg_path}: must be a JSON object, got a {type(d).__name__}")
    return d


def _allowed_roots(path: Path) -> list[Path]:
    """Where a shard may live: inside the model directory, or for a Hugging Face hub cache snapshot
    (`<repo>/snapshots/<rev>/`, whose files are symlinks to `<repo>/blobs/`) in that repo's blobs."""
    root = path.resolve()
    return [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]


def _shard_path(path: Path, name: Any, index: Path) -> Path:
    """The file an index's weight_map names, refused when the name leaves the model directory: an
    absolute path, a `..` component, or a symlink resolving elsewhere."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ModelFilesError(f"{index}: weight_map values must be shard file names, got {name!r:.80}")
    parts = PurePosixPath(name.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or PureWindowsPath(name).drive:
        raise ModelFilesError(f"{index}: shard {name!r} is outside the model directory")
    shard = path / name
    try:
        target = shard.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ModelFilesError(f"{index}: shard {name!r} cannot be resolved ({e})") from None
    if not any(target.is_relative_to(root) for root in _allowed_roots(path)):
        raise ModelFilesError(f"{index}: shard {name!r} resolves to {target}, outside the model directory")
    if not shard.is_file():
        raise ModelFilesError(f"{index}: shard {name!r} does not exist")
    return shard


def _read_weight_map(index: Path) -> dict[str, str]:
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelFilesError(f"{index}: weight_map must be an object mapping tensor names to shard file names")
    return weight_map


def quant_method(path: str | Path) -> str | None:
    """The `quantization_config.quant_method` of a model directory's config.json ("lmforge", "gptq", "awq", ...),
    or None (no config.json, or a float model)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return None
    quant = read_config(path).get("quantization_config")
    return quant.get("quant_method") if isinstance(quant, dict) else None


def open_weights(path: Path) -> dict[str, SafetensorsFile]:
    """Checkpoint tensor name -> the file holding it (every header validated by SafetensorsFile)."""
    index = path / INDEX
    if index.is_file():
        weight_map = _read_weight_map(index)
        files = {f: SafetensorsFile(_shard_path(path, f, index)) for f in sorted(set(weight_map.values()))}
        for name, f in weight_map.items():
            if name not in files[f]:
                raise ModelFilesError(f"{index}: weight_map maps tensor {name!r} to {f}, which does not hold it")
        return {name: files[f] for name, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise ModelFilesError(f"{path}: no model.safetensors or {INDEX} (found: {found})")
    f = SafetensorsFile(single)
    return dict.fromkeys(f.keys(), f)


def _canonical(arch: str, names: Iterable[str]) -> dict[str, str]:
    """Canonical tensor name -> name in the file (the original GPT-2 checkpoints have no "transformer." prefix)."""
    if arch != "gpt2":
        return {n: n for n in names}
    return {(n if n.startswith(("transformer.", "lm_head")) else f"transformer.{n}"): n for n in names}


def read_model(path: str | Path, **overrides: Any) -> tuple[ModelConfig, dict[str, SafetensorsFile]]:
    """A model directory's config and weight files, checked against each other before anything is built:
    config.json's keys (typed, named in errors), every safetensors header, and the layer, expert, head and
    size counts against the tensors present (`hf_arch.check_structure`). Returns (config, name -> file)."""
    path = Path(path)
    cfg = config_from_hf(read_config(path), where=str(path / "config.json")).replace(**overrides)
    sources = open_weights(path)
    stored = _canonical(cfg.arch, sources)
    check_structure(cfg, {c: sources[n].shape(n) for c, n in stored.items()}, str(path / "config.json"))
    return cfg, sources


def _ignored(name: str, cfg: ModelConfig) -> bool:
    """Checkpoint tensors that are not weights of the model: derived buffers, a tied head's copy, and
    DeepSeek-V3's multi-token-prediction layers (numbered from n_layers on; used only for training)."""
    if any(re.search(p, name) for p in IGNORED) or (cfg.tie_embeddings and name == "lm_head.weight"):
        return True
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    return cfg.arch == "deepseek_v3" and layer is not None and int(layer.group(1)) >= cfg.n_layers


def stored_names(cfg: ModelConfig, sources: dict[str, SafetensorsFile]) -> dict[str, str]:
    """Canonical checkpoint tensor name -> the name in the files (`sources`, from `open_weights`)."""
    return _canonical(cfg.arch, sources)


def load_hf(path: str | Path, dtype: torch.dtype | None = None, **overrides: Any) -> Transformer:
    """Load a Hugging Face model directory as a `Transformer` (eval mode)."""
    path = Path(path)
    cfg, sources = read_model(path, **overrides)
    with torch.device("meta"):
        model = Transformer(cfg)
    return fill_float_tensors(model, path, sources, dtype)


def fill_float_tensors(
    model: Transformer, path: Path, sources: dict[str, SafetensorsFile], dtype: torch.dtype | None = None,
    used: Iterable[str] = (),
) -> Transformer:  # fmt: skip
    """Assign every tensor `model` (built on the meta device) still lacks from the checkpoint `sources`, cast to
    `dtype` (floating-point ones but KEEP_FP32), and return it in eval mode. A checkpoint tensor neither read here
    nor in `used` (canonical names another reader took: a quantized layer's words) is an error."""
    cfg = model.config
    expected = {name: t for name, t in model.state_dict().items() if t.is_meta}
    stored = stored_names(cfg, sources)  # canonical name -> name in the file
    used = set(used)
    state: dict[str, torch.Tensor] = {}
    for m in tensor_maps(cfg, list(expected)):
        missing = [n for n in m.theirs if n not in stored]
        if missing:
            raise ModelFilesError(f"{path}: missing tensor {missing[0]!r} (needed for {m.ours[0]})")
        used.update(m.theirs)
        for name, t in zip(m.ours, m.load([sources[stored[n]].get(stored[n]) for n in m.theirs]), strict=True):
            if tuple(t.shape) != tuple(expected[name].shape):
                raise ModelFilesError(
                    f"{path}: tensor {m.theirs[0]!r} has shape {tuple(t.shape)}; "
                    f"the config needs {tuple(expected[name].shape)} for {name}"
                )
            if t.is_floating_point() != expected[name].is_floating_point():
                kind = "a floating-point" if expected[name].is_floating_point() else f"a {expected[name].dtype}"
                raise ModelFilesError(f"{path}: tensor {m.theirs[0]!r} has dtype {t.dtype}; {name} needs {kind} tensor")
            keep = not t.is_floating_point() or name.endswith(KEEP_FP32)
            state[name] = t.to(dtype) if dtype is not None and not keep else t
    extra = [n for n in stored if n not in used and not _ignored(n, cfg)]
    if extra:
        raise ModelFilesError(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} unused in all)")
    model.load_state_dict(state, assign=True, strict=False)
    if left := [n for n, t in model.state_dict().items() if t.is_meta]:
        raise ModelFilesError(f"{path}: no tensor for {left[0]} ({len(left)} in all)")
    return model.eval()


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


def hf_state_dict(model: Transformer, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights (or `state`, some of them) under Hugging Face checkpoint names."""
    cfg = model.config
    ours = dict(model.state_dict()) if state is None else state
    out: dict[str, torch.Tensor] = {}
    for m in tensor_maps(cfg, list(ours)):
        for name, t in zip(m.theirs, m.save([ours[n] for n in m.ours]), strict=True):
            out[name] = t.detach().contiguous()
    return out


def save_hf(
    model: Transformer, path: str | Path, shard_bytes: int = SHARD_BYTES, tokenizer: Any | None = None
) -> None:
    """Write `config.json` and safetensors weights (sharded with an index above `shard_bytes`), and the
    tokenizer's files when given (`write_model_directory`)."""
    tensors = hf_state_dict(model)
    write_model_directory(path, tensors, hf_config(model, tensors), shard_bytes=shard_bytes, tokenizer=tokenizer)


def hf_config(model: Transformer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The config.json of `model` as transformers reads it, its dtype that of the first of `tensors`."""
    config = config_to_hf(model.config)
    config["architectures"] = [HF_CLASSES[model.config.arch]]
    config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    return config


def write_model_directory(path: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], *,
                          shard_bytes: int = SHARD_BYTES, tokenizer: Any | None = None) -> None:  # fmt: skip
    """`config` as config.json and `tensors` as model.safetensors, or shards listed in an index above
    `shard_bytes`, and the tokenizer's files when given. The directory is replaced whole (`atomic_directory`): a
    reader, or a process killed mid-save, sees the old model or the new one, never a mix; other files already in
    it are kept, and the old version's weight files and index are not."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    with atomic_directory(path, replaces=_is_weight_file) as out:
        if len(shards) == 1:
            _atomic_save_tensors(shards[0], out / "model.safetensors")
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                _atomic_save_tensors(shard, out / fname)
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write(out / INDEX, json.dumps(index, indent=2))
        atomic_write(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save(out)


def _is_weight_file(name: str) -> bool:
    """A file of a model's weights (a shard or the index) that a new save replaces rather than keeps."""
    return name == INDEX or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", name) is not None
