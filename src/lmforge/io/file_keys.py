"""The boundary between a user's model file and `ModelConfig`: typed reads of the file's own keys, `ConfigError`s
translated back into those keys, and the structure checks the HF and GGUF loaders share (counts in the metadata
against the tensors the file actually holds, before anything is built).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lmforge.configfile import ConfigError, is_finite, is_int
from lmforge.utils.errors import LmforgeError

_REQUIRED = object()
_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}


def _show(value: Any) -> str:
    kind = _KINDS.get(type(value), type(value).__name__)
    return f"{value!r:.60} ({kind})"


class KeyReader:
    """Typed reads of one file's keys: a config.json object (or a section of it), GGUF metadata.

    This is the boundary between a user's file and `ModelConfig`: each getter checks one key's type
    (JSON and GGUF values can be strings, lists or null where a number belongs; bools are not
    integers) and raises `error` naming the file and the key as the file spells it. A null value
    counts as absent, as transformers treats it; a required key that is absent is an error.
    """

    def __init__(self, values: Any, where: str, error: type[LmforgeError], label: str = "") -> None:
        if not isinstance(values, dict):
            what = label.rstrip(".") or "the file"
            raise error(f"{where}: {what} must be a JSON object, got {_show(values)}")
        self.values, self.where, self.error, self.label = values, where, error, label

    def fail(self, key: str, expected: str, value: Any) -> LmforgeError:
        return self.error(f"{self.where}: {self.label}{key} must be {expected}, got {_show(value)}")

    def present(self, key: str) -> bool:
        return self.values.get(key) is not None

    def _checked(self, key: str, default: Any, ok: Callable[[Any], bool], expected: str) -> Any:
        """The value of `key` when `ok(value)`; `default` when absent or null (an error if required)."""
        value = self.values.get(key)
        if value is None:
            if default is _REQUIRED:
                raise self.error(f"{self.where}: missing key {self.label}{key}")
            return default
        if not ok(value):
            raise self.fail(key, expected, value)
        return value

    def size(self, key: str, default: Any = _REQUIRED) -> Any:
        """A positive integer (a count or dimension)."""
        return self._checked(key, default, lambda v: is_int(v) and v > 0, "a positive integer")

    def count(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._checked(key, default, lambda v: is_int(v) and v >= 0, "a non-negative integer")

    def number(self, key: str, default: Any = _REQUIRED, positive: bool = False) -> Any:
        """A finite real number (an integer is accepted, returned as a float), > 0 when `positive`."""
        def ok(v: Any) -> bool:
            return is_finite(v) and (v > 0 or not positive)

        v = self._checked(key, default, ok, "a finite number" + (" > 0" if positive else ""))
        return v if v is default else float(v)

    def flag(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._checked(key, default, lambda v: isinstance(v, bool), "true or false")

    def text(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._checked(key, default, lambda v: isinstance(v, str), "a string")

    def counts(self, key: str) -> tuple[int, ...]:
        """A list of non-negative integers (absent: empty)."""
        ok = lambda v: isinstance(v, list) and all(is_int(i) and i >= 0 for i in v)
        return tuple(self._checked(key, (), ok, "a list of non-negative integers"))

    def texts(self, key: str) -> list[str] | None:
        ok = lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v)
        return self._checked(key, None, ok, "a list of strings")

    def section(self, key: str) -> KeyReader:
        """A nested object (absent or null: an empty one)."""
        v = self.values.get(key)
        return KeyReader({} if v is None else v, self.where, self.error, f"{self.label}{key}.")


@contextmanager
def speaking_file(where: str, keys: dict[str, str], error: type[LmforgeError]) -> Iterator[None]:
    """Re-raise a `ConfigError` about a ModelConfig field as `error` naming the file and its own keys.

    `keys` maps ModelConfig field names (as ConfigError spells them: ``n_layers``, ``moe.top_k``) to the
    file's keys (``num_hidden_layers``, ``num_experts_per_tok``). Errors already naming the file pass."""
    try:
        yield
    except ConfigError as e:
        if str(e).startswith(f"{where}:"):
            raise
        names = "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))
        text = re.sub(rf"(?<![\w.])(?:{names})(?![\w])", lambda m: keys[m.group(0)], str(e))
        raise error(f"{where}: {text.removeprefix('invalid ')}") from None


def spans(indices: set[int]) -> str:
    """Sorted integers as ranges: {0, 1, 2, 5} -> '0..2, 5' (at most 6 ranges shown)."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(f"{a}..{b}" if b > a else str(a) for a, b in runs[:6])
    return (text + ", ...") if len(runs) > 6 else text or "none"


def check_layer_count(
    n: int, found: set[int], key: str, where: str, what: str, error: type[LmforgeError], extra_ok: bool = False
) -> None:
    """`n` layers declared by `key` must be exactly the layer indices the file's tensors use (`found`)
    (`extra_ok`: indices >= n may follow, as DeepSeek-V3's multi-token-prediction layers do)."""
    have = sum(i < n for i in found)
    if have != n or (not extra_ok and any(i >= n for i in found)):
        raise error(f"{where}: {key}={n}, but the tensors hold layers {spans(found)} ({what})")


def expect_shape(
    shapes: dict[str, tuple[int, ...]], name: str, shape: tuple[int, ...], why: str, where: str,
    error: type[LmforgeError],
) -> None:
    """Tensor `name`, when present, must have `shape`, which the keys in `why` (``vocab_size=96 x ...``) imply."""
    if name in shapes and tuple(shapes[name]) != shape:
        raise error(f"{where}: tensor {name!r} has shape {tuple(shapes[name])}; {why} needs {shape}")
