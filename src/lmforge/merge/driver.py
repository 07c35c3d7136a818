"""Run a merge config from checkpoint files to a model directory, streaming: one output tensor at a time.

For each output tensor (`merge.plan`) the input tensors are read from their memory-mapped safetensors files
(cast to the config's `dtype`), merged by the method, cast to `out_dtype` and handed to a `ShardWriter`, which
writes each shard as soon as it is full. Peak memory is about one output shard plus one tensor per input, not
N models (benchmarks/merge_memory.py measures it). Everything that can be wrong with the inputs is checked before
the first tensor is merged (`inputs.check_models`, parameter resolution in `plan`).

The output directory holds config.json (the base model's, or the first model's, with `dtype` and, for slices,
the layer count updated), the weights, and the tokenizer files of that model; it is written whole or not at all
(`utils.atomic.atomic_directory`). Random methods (DARE) draw each tensor's masks from a generator seeded with
`seed` and the tensor's name, so a merge is reproducible and independent of the order tensors are processed in.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge.io.hf import SHARD_BYTES
from lmforge.merge.config import MergeConfig, read_config
from lmforge.merge.inputs import TOKENIZER_FILES, InputModel, check_models
from lmforge.merge.methods import RANDOM, MergeConfigError, MethodInputs
from lmforge.merge.plan import TensorTask, n_layers, plan
from lmforge.merge.writer import ShardWriter
from lmforge.utils.atomic import atomic_directory, atomic_write

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def merge(config: MergeConfig | str | Path, out: str | Path, *, seed: int = 0, shard_bytes: int = SHARD_BYTES,
          progress: bool = True) -> list[str]:  # fmt: skip
    """Merge as `config` (a MergeConfig or a mergekit YAML file) says and write the model to `out`; returns the
    output tensor names."""
    config = config if isinstance(config, MergeConfig) else read_config(config)
    models = {ref: InputModel(ref, config.where) for ref in config.referenced()}
    tasks = plan(config, lambda ref: models[ref].names())
    check_models(list(models.values()), tasks)
    donor = models[config.base_model or tasks[0].inputs[0][0]]
    for ref in models:
        if Path(out).resolve() == ref.path.resolve():
            raise MergeConfigError(f"{config.where}: the output directory {out} is the input model {ref.path}")
    dtypes = {t.name: _out_dtype(config, [models[r].dtype(n) for r, n in t.inputs]) for t in tasks}
    specs = [(t.name, dtypes[t.name], models[t.inputs[0][0]].shape(t.inputs[0][1])) for t in tasks]
    with atomic_directory(out, replaces=lambda name: True) as tmp, ShardWriter(tmp, specs, shard_bytes) as writer:
        for task in tqdm(tasks, desc="merging", unit="tensor", disable=not progress):
            writer.add(task.name, _merge_one(config, models, task, seed).to(dtypes[task.name]))
        writer.finish()
        atomic_write(tmp / "config.json", json.dumps(_out_config(config, donor, tasks), indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (donor.ref.path / name).is_file():
                shutil.copyfile(donor.ref.path / name, tmp / name)
    return [t.name for t in tasks]


def _promoted(dtypes: list[torch.dtype]) -> torch.dtype:
    dtype = dtypes[0]
    for d in dtypes[1:]:
        dtype = torch.promote_types(dtype, d)
    return dtype


def _out_dtype(config: MergeConfig, dtypes: list[torch.dtype]) -> torch.dtype:
    """out_dtype, else the dtype the merge computes in: `dtype`, else the inputs' promoted dtype."""
    if not all(d.is_floating_point for d in dtypes):
        return dtypes[0]
    return config.out_dtype or config.dtype or _promoted(dtypes)


def _merge_one(config: MergeConfig, models: dict, task: TensorTask, seed: int) -> torch.Tensor:
    tensors = [models[ref].get(name, config.dtype) for ref, name in task.inputs]
    if not all(t.is_floating_point() for t in tensors):  # an integer buffer: copied when every model agrees
        for (ref, _), t in zip(task.inputs[1:], tensors[1:], strict=True):
            if t.dtype != tensors[0].dtype or not torch.equal(t, tensors[0]):
                raise MergeConfigError(f"{ref.path}: non-float tensor {task.name!r} differs from "
                                       f"{task.inputs[0][0].path}'s (it cannot be merged, only copied)")  # fmt: skip
        return tensors[0].clone()
    dtype = _promoted([t.dtype for t in tensors])
    generator = None
    if config.method.name in RANDOM:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{task.name}".encode()))  # CPU: 32-bit seeds
    inputs = MethodInputs([t.to(dtype) for t in tensors], task.base, task.shared, list(task.per_input), generator)
    return config.method.run(inputs)


def _out_config(config: MergeConfig, donor: InputModel, tasks: list[TensorTask]) -> dict:
    out = dict(donor.config)
    dtype = config.out_dtype or config.dtype
    if dtype is not None:
        out["dtype"] = str(dtype).removeprefix("torch.")
        if "torch_dtype" in out:
            out["torch_dtype"] = out["dtype"]
    layers = n_layers([t.name for t in tasks])
    for key in LAYER_KEYS:
        if isinstance(out.get(key), int) and out[key] != layers:
            out[key] = layers
    return out
