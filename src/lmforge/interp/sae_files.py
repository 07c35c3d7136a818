"""SAE files in SAELens' layout: a directory holding `cfg.json` and `sae_weights.safetensors`.

    sae_weights.safetensors   W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,)
    cfg.json                  {"architecture": "standard" | "topk", "d_in", "d_sae", "dtype", "device",
                               "apply_b_dec_to_input", "normalize_activations": "none", "reshape_activations":
                               "none", training fields (standard: l1_coefficient, lp_norm, l1_warm_up_steps;
                               topk: k, aux_loss_coefficient, rescale_acts_by_decoder_norm; decoder_init_norm),
                               "metadata": {"sae_lens_version", "hook_name", ...}}

This is what SAELens 6's `TrainingSAE.save_model` writes (its checkpoints), and what `SAE.load_from_disk` reads:
the weights are stored as trained (a rescaling TopK SAE keeps its decoder norms and
`rescale_acts_by_decoder_norm: true`, which SAELens' inference `TopKSAE` honours, so its outputs are ours).
`metadata.sae_lens_version` is written as "6.0.0", the format these files follow: SAELens reads files without one
as pre-6 files (hook_name at the top level) and would drop the metadata. Reading accepts the files SAELens writes
with `save_model` or `save_inference_model` (whose TopK weights come with the norms folded in: rows of unit norm,
the same outputs), for the two architectures of `interp.sae`, with `hook_name` under metadata or, as older
files have it, at the top level. A directory is written whole or not at all (`utils.atomic.atomic_directory`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.interp.sae import ARCHITECTURES, SAEConfig, SAEConfigError, SparseAutoencoder
from lmforge.io.file_keys import KeyReader
from lmforge.utils.atomic import atomic_directory
from lmforge.utils.errors import LmforgeError

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
FORMAT_VERSION = "6.0.0"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
TRAINING_FIELDS = {
    "standard": ("l1_coefficient", "lp_norm", "l1_warm_up_steps", "decoder_init_norm"),
    "topk": ("k", "aux_loss_coefficient", "rescale_acts_by_decoder_norm", "decoder_init_norm"),
}


class SAEFileError(LmforgeError):
    """An SAE directory lmforge cannot read: a missing file, a bad field or a tensor of the wrong shape."""


def sae_cfg_dict(sae: SparseAutoencoder, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cfg.json object of `sae`; `metadata` adds entries (model_name, l0, ...) to its "metadata"."""
    cfg = sae.cfg
    dtype = next(name for name, dt in DTYPES.items() if dt == sae.W_enc.dtype)
    out: dict[str, Any] = {
        "architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": dtype, "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "none",
    }  # fmt: skip
    out.update({name: getattr(cfg, name) for name in TRAINING_FIELDS[cfg.architecture]})
    if cfg.architecture == "topk":
        out["use_sparse_activations"] = False
        if cfg.aux_k is not None:
            out["aux_k"] = cfg.aux_k  # ours: SAELens always takes d_in // 2 (and ignores the key)
    meta = {"sae_lens_version": FORMAT_VERSION, "training_architecture": cfg.architecture}
    if cfg.hook_name is not None:
        meta["hook_name"] = cfg.hook_name
    out["metadata"] = {**meta, **(metadata or {})}
    return out


def save_sae(sae: SparseAutoencoder, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` to `directory` (cfg.json + sae_weights.safetensors, module docstring) atomically; returns it."""
    directory = Path(directory)
    tensors = {name: p.detach().contiguous() for name, p in sae.named_parameters()}
    text = json.dumps(sae_cfg_dict(sae, metadata), indent=2, sort_keys=True) + "\n"
    with atomic_directory(directory, replaces=lambda name: name in (CFG_FILE, WEIGHTS_FILE)) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CFG_FILE).write_text(text, encoding="utf-8")
    return directory


def read_sae_config(directory: str | Path) -> SAEConfig:
    """The `SAEConfig` of the cfg.json in `directory` (SAELens' keys; clear errors naming the file and key)."""
    path = Path(directory) / CFG_FILE
    if not path.is_file():
        raise SAEFileError(f"{path}: not found (an SAE directory holds {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFileError(f"{path}: not valid JSON ({e})") from None
    keys = KeyReader(raw, str(path), SAEFileError)
    arch = keys.text("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise SAEFileError(f"{path}: architecture {arch!r} is not supported (lmforge reads {', '.join(ARCHITECTURES)})")
    for key in ("normalize_activations", "reshape_activations"):
        if keys.text(key, "none") != "none":
            raise SAEFileError(f"{path}: {key}={raw[key]!r} is not supported (only 'none')")
    meta = keys.section("metadata")
    hook = meta.text("hook_name", None) or keys.text("hook_name", None)
    fields: dict[str, Any] = {
        "d_in": keys.size("d_in"), "d_sae": keys.size("d_sae"), "architecture": arch, "hook_name": hook,
        "apply_b_dec_to_input": keys.flag("apply_b_dec_to_input", True),
    }  # fmt: skip
    if arch == "standard":
        fields["l1_coefficient"] = keys.number("l1_coefficient", 1.0)
        fields["lp_norm"] = keys.number("lp_norm", 1.0, positive=True)
        fields["l1_warm_up_steps"] = keys.count("l1_warm_up_steps", 0)
    else:
        # SAELens' inference TopKSAEConfig defaults to no rescaling; its training config (and its files) say so
        fields["k"] = keys.size("k", 100)
        fields["aux_loss_coefficient"] = keys.number("aux_loss_coefficient", 1.0)
        fields["rescale_acts_by_decoder_norm"] = keys.flag("rescale_acts_by_decoder_norm", False)
        fields["aux_k"] = keys.size("aux_k", None)
    if "decoder_init_norm" in raw:
        fields["decoder_init_norm"] = keys.number("decoder_init_norm", None, positive=True)
    try:
        return SAEConfig(**fields)
    except SAEConfigError as e:
        raise SAEFileError(f"{path}: {e}") from None


def load_sae(directory: str | Path) -> SparseAutoencoder:
    """The SAE saved in `directory` by `save_sae` or by SAELens (`save_model` / `save_inference_model`)."""
    directory = Path(directory)
    cfg = read_sae_config(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise SAEFileError(f"{path}: not found (an SAE directory holds {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        tensors = load_file(path)
    except SafetensorError as e:
        raise SAEFileError(f"{path}: not a safetensors file ({e})") from None
    d_in, d_sae = cfg.d_in, cfg.d_sae
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in shapes.items():
        if name not in tensors:
            raise SAEFileError(f"{path}: tensor {name!r} is missing (it holds {', '.join(sorted(tensors)) or 'none'})")
        if tuple(tensors[name].shape) != shape:
            raise SAEFileError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}; "
                               f"d_in={cfg.d_in}, d_sae={cfg.d_sae} need {shape}")  # fmt: skip
        if not tensors[name].is_floating_point():
            raise SAEFileError(f"{path}: tensor {name!r} has dtype {tensors[name].dtype}; expected a float type")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise SAEFileError(f"{path}: tensors {', '.join(extra)} are not part of a {cfg.architecture} SAE")
    dtype = tensors["W_enc"].dtype
    sae = SparseAutoencoder(cfg, dtype=dtype, device="meta")
    sae.load_state_dict({name: tensors[name].to(dtype) for name in shapes}, assign=True)
    return sae
