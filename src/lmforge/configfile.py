"""Config files: TOML <-> nested dicts <-> frozen dataclasses, dotted overrides, and the checks every config uses.

Any frozen dataclass whose fields are `int`, `float`, `str`, `bool`, `Any`, tuples of those, `X | None` or another
such dataclass is a config file schema (see `lmforge.train.config` for one: each section a TOML table):

    read_toml(path)                  the file as nested dicts; `ConfigError` naming the file (and the line)
    apply_override(d, "a.b=3e-4")    set a dotted key in those dicts; the value is a TOML literal or a bare string
    build(cls, d, "section")         a `cls` instance, each value converted to its field's type, or `ConfigError`
    to_dict(config) / dumps(...)     every field back as plain values / as TOML text that `build` reads back equal

TOML has no null: the string "none" (`NONE`) sets a field that allows None to None. Integers are accepted for
floats, and integral floats (`1e4`) for integers. A field whose dataclass metadata is `HIDDEN` is not part of the
file. Errors name the key as the file spells it (`optim.lr`, `model.moe.top_k`): an unknown key with the closest
valid name, a value of the wrong type with the expected type and the value.

The checks (`check`, `check_integer`, `check_positive`, `check_finite`, `check_choice`) are the ones every config
dataclass runs in `__post_init__`: integers are below 2**63 (int64, as torch and every file format store them) and
never bool; floats are finite (TOML's `nan` and `inf` are valid literals, but can only give NaN losses or logits).
Each raises `ConfigError("invalid name=value: what is allowed")`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lmforge.utils.errors import LmforgeError

INT64_LIMIT = 2**63  # every integer field is below it
NONE = "none"  # how a TOML file or an override spells None
HIDDEN = {"configfile": "hidden"}  # `field(metadata=HIDDEN)`: a field that is not part of the file


class ConfigError(LmforgeError):
    """A configuration value is invalid; the message names the field."""


# ---------------------------------------------------------------------------------------------------------------
# checks


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise `ConfigError` naming `name`, its `value` and what is `allowed`, unless `ok`."""
    if not ok:
        raise ConfigError(f"invalid {name}={value!r}: {allowed}")


def is_int(value: Any) -> bool:
    """An int that is not a bool (True is an int to Python, never a count to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A real number (int or float, not bool) that is neither NaN nor infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_integer(name: str, value: Any, low: int = 0) -> None:
    """`value` is an integer in [`low`, 2**63)."""
    check(is_int(value) and low <= value < INT64_LIMIT, name, value, f"must be an integer >= {low} (< 2**63)")


def check_positive(name: str, value: Any) -> None:
    """`value` is an integer in [1, 2**63) (a size or a count that must not be 0)."""
    check(is_int(value) and 0 < value < INT64_LIMIT, name, value, "must be a positive integer (< 2**63)")


def check_finite(name: str, value: Any, above: float | None = None, at_least: float | None = None,
                 optional: bool = False) -> None:  # fmt: skip
    """`value` is a finite number (or None when `optional`), and > `above` / >= `at_least` when given."""
    if value is None and optional:
        return
    ok = is_finite(value) and (above is None or value > above) and (at_least is None or value >= at_least)
    bound = f" > {above}" if above is not None else f" >= {at_least}" if at_least is not None else ""
    check(ok, name, value, ("must be None or a finite number" if optional else "must be a finite number") + bound)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """`value` is one of `choices` (a tuple, or the keys of a registry dict)."""
    choices = tuple(choices)
    check(value in choices, name, value, f"must be one of {', '.join(choices)}")


def unknown(kind: str, name: str, valid: Iterable[str]) -> ConfigError:
    """The error for an unknown `kind` (field, section, preset) `name`, with the closest valid name as a hint
    (or the valid names, when none is close)."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], valid, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(valid)}"
    return ConfigError(f"unknown {kind} {name!r} ({hint})")


def qualify(error: ConfigError, section: str) -> ConfigError:
    """`error` with its field name prefixed by `section.` (for messages of the form "invalid name=..."), so a
    dataclass that names its fields relative to itself (`n_kv_heads`) is reported as the file's key."""
    msg = str(error)
    if msg.startswith("invalid "):
        return ConfigError(f"invalid {section}.{msg.removeprefix('invalid ')}")
    return ConfigError(f"{section}: {msg}")


# ---------------------------------------------------------------------------------------------------------------
# dicts -> dataclasses, with type checks


def file_fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """name -> (field, resolved type) of the fields of dataclass `cls` that a file sets (the `HIDDEN` ones not)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("configfile") != "hidden"}


def _is_union(tp: Any) -> bool:
    return isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union


def _type_name(tp: Any) -> str:
    """How an error message names type `tp` ("int or none", "a list of 2 (float, float)", "a table")."""
    if _is_union(tp):
        return " or ".join(NONE if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return getattr(tp, "__name__", str(tp))


def _mistyped(name: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")


def convert(name: str, value: Any, tp: Any, base: Any = None) -> Any:
    """`value` (from TOML) as type `tp`, or `ConfigError` naming `name`; `base` is merged under a table."""
    if tp is Any:
        return value
    if _is_union(tp):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if value == NONE or value is None:
            return None
        if len(arms) == 1:
            try:
                return convert(name, value, arms[0], base)
            except ConfigError as e:
                if not str(e).startswith(f"{name}: expected"):
                    raise
        raise _mistyped(name, tp, value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        variadic = len(args) == 2 and args[1] is Ellipsis
        if not (isinstance(value, list | tuple) and (variadic or len(value) == len(args))):
            raise _mistyped(name, tp, value)
        item_types = [args[0]] * len(value) if variadic else args
        return tuple(convert(f"{name}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, item_types, strict=True)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _mistyped(name, tp, value)
        return build(tp, value, name, base)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise _mistyped(name, tp, value)


def build(cls: type, data: dict[str, Any], path: str, base: Any = None) -> Any:
    """An instance of dataclass `cls` from `data` (the table at key `path`), over the field values of `base` (an
    instance or None). Unknown keys, values of the wrong type and missing required fields raise `ConfigError`
    naming `path.key`; so does `cls`'s own validation, its field names put under `path`'s first part when the
    message does not name that part already (`invalid n_kv_heads=...` from [model] -> `invalid model.n_kv_heads`)."""
    fields = file_fields(cls)
    for key in data:
        if key not in fields:
            raise unknown("field", f"{path}.{key}", fields)
    values = {name: getattr(base, name) for name in fields} if base is not None else {}
    for key, value in data.items():
        values[key] = convert(f"{path}.{key}", value, fields[key][1], values.get(key))
    for name, (f, tp) in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}.{name}: required (a value of {_type_name(tp)})")
    try:
        return cls(**values)
    except ConfigError as e:
        root = path.split(".", 1)[0]
        if str(e).startswith((f"invalid {root}.", f"{root}.", f"{root}:")):
            raise
        raise qualify(e, root) from None


# ---------------------------------------------------------------------------------------------------------------
# dataclasses -> dicts -> TOML


def to_dict(value: Any) -> Any:
    """Every file field of dataclass `value` (nested ones included) as dicts of plain values (tuples as lists,
    None kept)."""
    if dataclasses.is_dataclass(value):
        return {name: to_dict(getattr(value, name)) for name in file_fields(type(value))}
    if isinstance(value, tuple | list):
        return [to_dict(v) for v in value]
    return value


def _toml_value(value: Any) -> str:
    if value is None:
        return json.dumps(NONE)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # Python's int and float reprs (1e-08, inf, nan) are TOML literals
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")  # a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as a TOML value")


def _toml_body(lines: list[str], path: str, table: dict[str, Any]) -> None:
    """The keys of `table` (at dotted `path`, "" for the top), then each nested table under its own header."""
    lines.extend(f"{key} = {_toml_value(v)}" for key, v in table.items() if not isinstance(v, dict))
    for key, v in table.items():
        if isinstance(v, dict):
            sub = f"{path}.{key}" if path else key
            lines.extend(["", f"[{sub}]"])
            _toml_body(lines, sub, v)


def dumps(config: Any, title: str) -> str:
    """Dataclass `config` as TOML text, every field written (None as "none"), under a `# title` comment line."""
    lines = [f"# {title}"]
    _toml_body(lines, "", to_dict(config))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# files and overrides


def parse_value(text: str) -> Any:
    """An override's value: a TOML literal (`3e-4`, `true`, `[0.9, 0.95]`, `"x"`) when it is one, else the text."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["v"] if parsed.keys() == {"v"} else text


def apply_override(d: dict[str, Any], override: str, example: str,
                   owners: Callable[[str], list[str]] = lambda key: []) -> None:  # fmt: skip
    """Set `section.field[.subfield]=value` in the nested dict `d` (in place). A malformed override raises
    `ConfigError` quoting it with `example` (e.g. "optim.lr=3e-4") and, for a bare key, the dotted keys
    `owners(key)` suggests (the sections that have a field of that name)."""
    key, eq, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not eq or len(parts) < 2 or not all(parts):
        suggestions = owners(key) if "." not in key else []
        hint = f"; did you mean {' or '.join(suggestions)}?" if suggestions else ""
        raise ConfigError(f"bad override {override!r}: expected section.field=value (e.g. {example}){hint}")
    table = d
    for part in parts[:-1]:
        if not isinstance(table.get(part), dict):
            table[part] = {}
        table = table[part]
    table[parts[-1]] = parse_value(text.strip())


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file at `path` as a dict; `ConfigError` naming the file (and the line, for a syntax error)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None  # tomllib's message ends "(at line L, column C)"
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
