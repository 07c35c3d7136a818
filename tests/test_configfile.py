"""configfile.py on a schema that has nothing to do with training: conversion, hidden fields, errors, round trips."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field

import pytest

from lmforge.configfile import (
    HIDDEN,
    ConfigError,
    apply_override,
    build,
    check_finite,
    check_integer,
    dumps,
    parse_value,
    to_dict,
)


@dataclass(frozen=True)
class Inner:
    size: int = 4
    ratio: float | None = None


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    sizes: tuple[int, ...] = (1, 2)
    notes: dict = field(default_factory=dict, metadata=HIDDEN)

    def __post_init__(self) -> None:
        check_integer("inner.size", self.inner.size, 1)


def test_values_are_converted_to_their_field_types():
    cfg = build(Outer, {"name": "y", "inner": {"size": 1e2, "ratio": 3}, "sizes": [5]}, "outer")
    assert cfg == Outer("y", Inner(100, 3.0), (5,))
    assert isinstance(cfg.inner.size, int) and isinstance(cfg.inner.ratio, float)
    assert build(Outer, {"inner": {"ratio": "none"}}, "outer").inner.ratio is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nmae": "y"}, r"outer\.nmae.*name"),  # the closest valid name
        ({"inner": {"size": "big"}}, r"outer\.inner\.size"),
        ({"inner": {"size": 2.5}}, r"outer\.inner\.size"),
        ({"inner": {"size": True}}, r"outer\.inner\.size"),
        ({"notes": {}}, r"outer\.notes"),  # a hidden field is not part of the file
        ({"inner": {"size": 0}}, r"invalid outer\.inner\.size=0"),  # the dataclass's own check, put under outer.
    ],
)
def test_errors_name_the_key_as_the_file_spells_it(data, message):
    with pytest.raises(ConfigError, match=message):
        build(Outer, data, "outer")


def test_dumps_reads_back_equal_and_leaves_hidden_fields_out():
    cfg = Outer("z", Inner(7, None), (3, 4), notes={"a": 1})
    text = dumps(cfg, "an example")
    assert text.startswith("# an example\n") and "notes" not in text
    assert "notes" not in to_dict(cfg)
    again = build(Outer, tomllib.loads(text), "outer")
    assert again == Outer("z", Inner(7, None), (3, 4))


def test_overrides_and_literals():
    d: dict = {}
    apply_override(d, "inner.size=8", "inner.size=8")
    apply_override(d, "inner.ratio=1e-3", "inner.size=8")
    assert d == {"inner": {"size": 8, "ratio": 1e-3}}
    assert parse_value("[1, 2]") == [1, 2] and parse_value('"q"') == "q" and parse_value("plain text") == "plain text"
    for bad in ("size", "name=x"):  # a dotted section.field is required
        with pytest.raises(ConfigError, match=rf"bad override '{bad}': expected section\.field=value"):
            apply_override(d, bad, "inner.size=8")


def test_checks_refuse_what_can_only_overflow_or_be_nan():
    check_finite("a", 1.0, above=0)
    for bad in (math.nan, math.inf, 0.0, True):
        with pytest.raises(ConfigError, match=r"invalid a="):
            check_finite("a", bad, above=0)
    with pytest.raises(ConfigError, match=r"< 2\*\*63"):
        check_integer("n", 2**63)
