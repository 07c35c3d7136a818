"""The mergekit YAML schema (what `mergekit-yaml` reads), read into frozen dataclasses.

    merge_method: ties                       # a name in `merge.methods.METHODS`
    base_model: path/to/base                 # a local model directory; "DIR+ADAPTER_DIR" adds a PEFT LoRA to it
    models:                                  # or `slices:` (below); exactly one of the two
      - model: path/to/finetuned
        parameters: {weight: 0.5, density: 0.5}
    parameters:                              # method-wide; per-model values take precedence
      t:                                     # a setting: a scalar, a gradient list, or filtered settings
        - filter: self_attn                  #   (the first whose filter is a substring of the tensor name)
          value: [0, 0.5, 1]                 #   a gradient: interpolated over the layers (t = layer / (L - 1))
        - value: 0.5
    dtype: float32                           # inputs are cast to it before merging
    out_dtype: bfloat16                      # the output tensors' dtype (default: dtype)
    slices:                                  # instead of models: output layers from layer ranges
      - sources:
          - {model: A, layer_range: [0, 16]}
          - {model: B, layer_range: [0, 16]}
        parameters: {...}                    # between per-model and method-wide in precedence

A gradient [v_0 .. v_{m-1}] at position t in [0, 1] is v_i (1 - f) + v_{i+1} f with i + f = t (m - 1); lists of
booleans or strings pick v_floor(t (m - 1)). Tensors outside the layers (embeddings, final norm, head) have t = 0.
`tokenizer_source` / `tokenizer` (vocabulary surgery), `chat_template` and `modules` are refused: lmforge copies
the base model's tokenizer and requires every model to share it. Unknown keys and parameters are refused too
(mergekit ignores a misspelt parameter; lmforge names it). Model paths are local directories (no hub downloads).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.merge.methods import MergeConfigError, Method, get_method

Settings = Mapping[str, Any]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype"}
_REFUSED = {
    "tokenizer_source": "lmforge copies the base model's tokenizer and requires all models to share it",
    "tokenizer": "lmforge copies the base model's tokenizer and requires all models to share it",
    "chat_template": "the base model's chat template is copied with its tokenizer",
    "modules": "write `models:` or `slices:`",
}


@dataclass(frozen=True)
class ModelRef:
    """A local model directory, optionally with a PEFT LoRA adapter merged into it ("DIR+ADAPTER")."""

    path: Path
    lora: Path | None = None

    def __str__(self) -> str:
        return f"{self.path}+{self.lora}" if self.lora else str(self.path)


@dataclass(frozen=True)
class Source:
    model: ModelRef
    layer_range: tuple[int, int] | None
    parameters: Settings


@dataclass(frozen=True)
class Slice:
    sources: tuple[Source, ...]
    base_model: ModelRef | None
    parameters: Settings


@dataclass(frozen=True)
class MergeConfig:
    method: Method
    base_model: ModelRef | None
    models: tuple[Source, ...] | None
    slices: tuple[Slice, ...] | None
    parameters: Settings
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    where: str  # the file (or "config") that errors name

    def referenced(self) -> list[ModelRef]:
        """Every model the config names, each once, in order of appearance (the base first)."""
        refs = [self.base_model] if self.base_model else []
        for s in self.models or [src for sl in self.slices or () for src in sl.sources]:
            refs.append(s.model)
        for sl in self.slices or ():
            refs += [sl.base_model] if sl.base_model else []
        return list(dict.fromkeys(refs))


def read_config(path: str | Path) -> MergeConfig:
    """Parse the mergekit YAML file at `path`."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MergeConfigError(f"{path}: not valid YAML ({e})") from None
    return parse_config(data, str(path))


def parse_config(data: Any, where: str = "config") -> MergeConfig:
    """A MergeConfig from the YAML's value (a dict); errors name `where` and the key."""
    if not isinstance(data, dict):
        raise MergeConfigError(f"{where}: expected a mapping of merge_method, models, ..., got {data!r:.80}")
    for key in data:
        if key in _REFUSED:
            raise MergeConfigError(f"{where}: {key}: not supported by lmforge merge ({_REFUSED[key]})")
        if key not in _KEYS:
            raise MergeConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(_KEYS))})")
    if "merge_method" not in data:
        raise MergeConfigError(f"{where}: merge_method is missing")
    method = get_method(data["merge_method"], where)
    known = {p.name for p in method.params}
    params = _settings(data.get("parameters"), known, f"{where}: parameters", method.name)
    if ("models" in data) == ("slices" in data):
        raise MergeConfigError(f"{where}: give exactly one of models: and slices:")
    models = slices = None
    if "models" in data:
        models = tuple(_source(s, f"{where}: models[{i}]", known, method.name, False)
                       for i, s in enumerate(_list(data["models"], f"{where}: models")))  # fmt: skip
    else:
        slices = tuple(_slice(s, f"{where}: slices[{i}]", known, method.name)
                       for i, s in enumerate(_list(data["slices"], f"{where}: slices")))  # fmt: skip
    base = _model_ref(data["base_model"], f"{where}: base_model") if data.get("base_model") is not None else None
    dtype, out_dtype = (_dtype(data.get(k), f"{where}: {k}") for k in ("dtype", "out_dtype"))
    return MergeConfig(method, base, models, slices, params, dtype, out_dtype, where)


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise MergeConfigError(f"{where}: expected a non-empty list, got {value!r:.80}")
    return value


def _model_ref(value: Any, where: str) -> ModelRef:
    if not isinstance(value, str) or not value or value.count("+") > 1:
        raise MergeConfigError(f"{where}: expected a model directory (or DIR+LORA_DIR), got {value!r:.80}")
    model, _, lora = value.partition("+")
    return ModelRef(Path(model), Path(lora) if lora else None)


def _dtype(value: Any, where: str) -> torch.dtype | None:
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in DTYPES:
        raise MergeConfigError(f"{where}: unknown dtype {value!r} (known: {', '.join(DTYPES)})")
    return DTYPES[name]


def _source(value: Any, where: str, known: set[str], method: str, sliced: bool) -> Source:
    if not isinstance(value, dict) or "model" not in value:
        raise MergeConfigError(f"{where}: expected a mapping with model:, got {value!r:.80}")
    allowed = {"model", "parameters", *(("layer_range",) if sliced else ())}
    if extra := set(value) - allowed:
        raise MergeConfigError(f"{where}: unknown key {sorted(extra)[0]!r} (known: {', '.join(sorted(allowed))})")
    layer_range = None
    if sliced:
        r = value.get("layer_range")
        ok = isinstance(r, list) and len(r) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in r)
        if not ok or not 0 <= r[0] < r[1]:
            raise MergeConfigError(f"{where}: layer_range: expected [first, end) with 0 <= first < end, got {r!r}")
        layer_range = (r[0], r[1])
    params = _settings(value.get("parameters"), known, f"{where}: parameters", method)
    return Source(_model_ref(value["model"], f"{where}: model"), layer_range, params)


def _slice(value: Any, where: str, known: set[str], method: str) -> Slice:
    if not isinstance(value, dict) or "sources" not in value:
        raise MergeConfigError(f"{where}: expected a mapping with sources:, got {value!r:.80}")
    if extra := set(value) - {"sources", "base_model", "parameters"}:
        raise MergeConfigError(f"{where}: unknown key {sorted(extra)[0]!r} (known: base_model, parameters, sources)")
    sources = tuple(_source(s, f"{where}: sources[{i}]", known, method, True)
                    for i, s in enumerate(_list(value["sources"], f"{where}: sources")))  # fmt: skip
    if len({s.layer_range[1] - s.layer_range[0] for s in sources if s.layer_range}) != 1:
        raise MergeConfigError(f"{where}: every source of a slice needs the same number of layers, got "
                               f"{[list(s.layer_range or ()) for s in sources]}")  # fmt: skip
    base = _model_ref(value["base_model"], f"{where}: base_model") if value.get("base_model") is not None else None
    return Slice(sources, base, _settings(value.get("parameters"), known, f"{where}: parameters", method))


def _settings(value: Any, known: set[str], where: str, method: str) -> Settings:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MergeConfigError(f"{where}: expected a mapping of parameter names to settings, got {value!r:.80}")
    for name, setting in value.items():
        if name not in known:
            raise MergeConfigError(f"{where}: {name!r} is not a parameter of {method} "
                                   f"(it takes {', '.join(sorted(known)) or 'none'})")  # fmt: skip
        _check_setting(setting, f"{where}: {name}")
    return dict(value)


def _is_scalar(v: Any) -> bool:
    return isinstance(v, bool | int | float | str)


def _check_setting(setting: Any, where: str, conditional: bool = True) -> None:
    """A scalar, a list of scalars (a gradient), or (at the top) {filter, value} mappings, alone or in a list."""
    if _is_scalar(setting) or (isinstance(setting, list) and all(_is_scalar(v) for v in setting)):
        return
    conds = [setting] if isinstance(setting, dict) else setting
    if conditional and isinstance(conds, list) and all(isinstance(c, dict) for c in conds):
        for c in conds:
            if "value" not in c or set(c) - {"filter", "value"} or not isinstance(c.get("filter", ""), str | None):
                raise MergeConfigError(f"{where}: a filtered setting is {{filter: TEXT, value: ...}}, got {c!r:.80}")
            _check_setting(c["value"], where, conditional=False)
        return
    raise MergeConfigError(f"{where}: expected a number, a list of numbers, or filter/value entries, "
                           f"got {setting!r:.80}")  # fmt: skip


def evaluate(setting: Any, tensor: str, t: float, validate: Callable[[Any], Any]) -> Any:
    """The value `setting` gives tensor `tensor` at layer position `t` (None when no filter matches)."""
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting):
        return validate(setting)
    if not setting:
        return None
    if all(_is_scalar(v) for v in setting):
        values = [validate(v) for v in setting]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return validate((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor and f in tensor):
            return evaluate(cond["value"], tensor, t, validate)
    return None
