"""What a merge config asks for, tensor by tensor: each output tensor's input tensors and resolved parameters.

The output is laid out as mergekit lays it out: the tensors before the layers (embeddings), the layers slice by
slice (numbered on from 0 in the output), then those after (final norm, head). A checkpoint tensor is a layer's
when its name holds `layers.<i>.`; of the others, those named `embed`/`wte`/`wpe` come before the layers and take
the first slice's sources and parameters, the rest the last slice's. With `models:` every model gives all its
layers, and the base model joins the inputs if it is not among them.

Layer k (from 0) of a slice of n layers sits at t = k / (n - 1) of the gradients (t = 1 when n = 1); tensors
outside the layers at t = 0. A parameter is looked up, first to last, in the input's own `parameters`, the
slice's, then the method-wide ones (shared parameters skip the first); within each the filter matches the
input's tensor name (the output's for shared parameters). The first value found wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.merge.config import MergeConfig, ModelRef, Settings, Slice, Source, evaluate
from lmforge.merge.methods import REQUIRED, MergeConfigError, Param

LAYER = re.compile(r"^(.*?\blayers\.)(\d+)(\..+)$")
BEFORE_LAYERS = ("embed", "wte", "wpe")


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: its inputs (model, tensor name) in input order, the base's position among them, and the
    resolved parameters (shared, and one dict per input)."""

    name: str
    inputs: tuple[tuple[ModelRef, str], ...]
    base: int | None
    shared: dict[str, Any]
    per_input: tuple[dict[str, Any], ...]


def layer_of(name: str) -> tuple[str, int, str] | None:
    """(prefix, layer index, suffix) of a layer tensor's name (model.layers.3.mlp.up_proj.weight), else None."""
    m = LAYER.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def n_layers(names: Sequence[str]) -> int:
    return 1 + max((lay[1] for n in names if (lay := layer_of(n))), default=-1)


def plan(config: MergeConfig, names: Callable[[ModelRef], list[str]]) -> list[TensorTask]:
    """Every output tensor of `config`, in output order; `names(model)` lists a model's checkpoint tensors."""
    slices = config.slices or (_models_slice(config, names),)
    donor = names(config.base_model or slices[0].sources[0].model)
    outside = [n for n in donor if layer_of(n) is None]
    before = [n for n in outside if any(k in n for k in BEFORE_LAYERS)]
    tasks = [_task(config, slices[0], n, [n] * len(slices[0].sources), 0.0) for n in before]
    out_layer = 0
    for i, sl in enumerate(slices):
        first, end = sl.sources[0].layer_range or (0, 0)
        count = end - first
        by_layer = {}
        for n in names(sl.sources[0].model):
            if (lay := layer_of(n)) and first <= lay[1] < end:
                by_layer.setdefault(lay[1], []).append(lay)
        for k in range(count):
            if first + k not in by_layer:
                raise MergeConfigError(f"{config.where}: slices[{i}]: {sl.sources[0].model} has no layer {first + k}")
            t = k / (count - 1) if count > 1 else 1.0
            for prefix, _, suffix in by_layer[first + k]:
                inputs = [f"{prefix}{s.layer_range[0] + k}{suffix}" for s in sl.sources]  # type: ignore[index]
                tasks.append(_task(config, sl, f"{prefix}{out_layer}{suffix}", inputs, t))
            out_layer += 1
    tasks += [_task(config, slices[-1], n, [n] * len(slices[-1].sources), 0.0) for n in outside if n not in before]
    return tasks


def _models_slice(config: MergeConfig, names: Callable[[ModelRef], list[str]]) -> Slice:
    sources = list(config.models or ())
    if config.base_model and all(s.model != config.base_model for s in sources):
        sources.append(Source(config.base_model, None, {}))
    return Slice(tuple(Source(s.model, (0, n_layers(names(s.model))), s.parameters) for s in sources), None, {})


def _task(config: MergeConfig, sl: Slice, out: str, inputs: list[str], t: float) -> TensorTask:
    method, base_ref = config.method, sl.base_model or config.base_model
    refs = [s.model for s in sl.sources]
    base = refs.index(base_ref) if method.needs_base and base_ref in refs else None
    if method.needs_base and base is None:
        why = f"base_model {base_ref} is not one of its models" if base_ref else "there is no base_model"
        raise MergeConfigError(f"{config.where}: {method.name} needs a base model, and {why}")
    count = len(refs)
    if count < method.min_inputs or (method.max_inputs is not None and count > method.max_inputs):
        want = f"{method.min_inputs}" + ("" if method.max_inputs == method.min_inputs else " or more")
        raise MergeConfigError(f"{config.where}: {method.name} merges {want} models (the base included), got {count}")
    shared = {p.name: _resolve(p, (sl.parameters, config.parameters), out, t, config.where)
              for p in method.params if p.scope == "shared"}  # fmt: skip
    per_input = []
    for i, (src, name) in enumerate(zip(sl.sources, inputs, strict=True)):
        scopes = (src.parameters, sl.parameters, config.parameters)
        wanted = [p for p in method.params if p.scope == "input" or (p.scope == "non_base" and i != base)]
        per_input.append({p.name: _resolve(p, scopes, name, t, f"{config.where}: {src.model}") for p in wanted})
    return TensorTask(out, tuple(zip(refs, inputs, strict=True)), base, shared, tuple(per_input))


def _resolve(param: Param, scopes: Sequence[Settings], tensor: str, t: float, where: str) -> Any:
    try:
        for scope in scopes:
            if param.name in scope and (value := evaluate(scope[param.name], tensor, t, param.validate)) is not None:
                return value
        if param.default is REQUIRED:
            raise MergeConfigError(f"{where}: parameter {param.name!r} is required (no value for tensor {tensor!r})")
        return param.default
    except ValueError as e:
        if isinstance(e, MergeConfigError):
            raise
        raise MergeConfigError(f"{where}: parameter {param.name!r} for tensor {tensor!r}: {e}") from None
