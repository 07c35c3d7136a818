"""The sandbox chat templates run in: what a template may touch, and what it may cost.

Templates from the Hub are untrusted code, so they run as transformers runs them: in Jinja2's
`ImmutableSandboxedEnvironment` (no access to dunder attributes or internals, no mutation of lists and dicts passed
in), with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, and these globals: `raise_exception`
(aborts with `ChatTemplateError`), `strftime_now`, a `tojson` filter that does not HTML-escape, and restricted
``dict`` and ``namespace``. The inputs are copied into plain JSON values first. The globals print as
``<chat template global NAME>`` and other functions or methods as ``<chat template callable NAME>``, rather than
as Python reprs naming classes, modules and addresses.

**Limits.** A template is also bounded in what it may cost (`TemplateLimits`, defaults in brackets):

- ``template_chars`` [1,000,000]: the template's source size (real Hub templates are under 20,000 characters);
- ``output_chars`` [64 Mi = 67,108,864]: the characters the template prints, counted at every ``{{ }}`` and text
  block, including text printed into macros, ``{% set %}`` blocks and ``{% call %}`` bodies (a macro's text that
  its caller prints again counts twice). It also bounds any single string the template builds (``'x' * n``, ``~``,
  ``+``, ``%`` and ``format`` widths, ``center``/``ljust``/``zfill``/``replace``/``join``, the ``center``,
  ``indent``, ``replace``, ``format``, ``join``, ``tojson`` filters), each refused *before* it is built. A
  conversation of 100,000 turns renders to a few MB, so 64 Mi characters (64-256 MB of memory) leaves a wide margin;
- ``loop_iterations`` [10,000,000]: ``{% for %}`` iterations over the whole render (nested loops multiply);
- ``render_seconds`` [10]: wall-clock time of one call (for an assistant mask: all its renders together); a
  3000-turn conversation's mask takes well under a second;
- ``sequence_items`` [1,000,000]: the length of a list the template builds (``[x] * n``, ``+``, ``batch``,
  ``slice``, ``list`` of a generator; ``range()`` keeps Jinja's own cap of 100,000);
- ``integer_bits`` [65,536]: the size of an integer ``*``, ``+`` or ``**`` computes.

A template over a limit stops with a `ChatTemplateError` naming the limit and how to raise it. Time is checked at
every loop iteration, call, attribute or item access and print, and every single operation is size-bounded, so a
bomb stops within about ``render_seconds`` (plus well under a second) with memory bounded by a small multiple of
``output_chars``. To change the limits, pass ``limits=TemplateLimits(output_chars=..., ...)`` to
`render_chat_template`, `assistant_char_spans` or `apply_chat_template`, or replace the module default for every
call that passes none: ``lmforge.tokenizer.template_sandbox.DEFAULT_LIMITS = TemplateLimits(render_seconds=120)``.

Every failure of a template (a syntax error, an undefined value, an unsafe attribute, an include/import/extends,
which have no loader here, a Python error inside the template, a recursion without end, a limit) is raised as a
`ChatTemplateError` (a ``jinja2.TemplateError`` and an `LmforgeError`) whose one-line message starts with the
template's source (``source=``, e.g. ``tokenizer_config.json: chat_template``; default ``chat template``). Unsafe
operations raise `ChatTemplateSecurityError`, which is also a ``jinja2.exceptions.SecurityError``.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter, safe_range
from markupsafe import Markup

from lmforge.utils.errors import LmforgeError

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_SOURCE",
    "ChatTemplateError",
    "ChatTemplateSecurityError",
    "TemplateLimits",
    "compile_chat_template",
]

DEFAULT_SOURCE = "chat template"


class ChatTemplateError(jinja2.exceptions.TemplateError, LmforgeError):
    """A chat template failed or refused the conversation, went over a `TemplateLimits` limit, or the assistant
    mask cannot be found. The message names the template's source."""


class ChatTemplateSecurityError(ChatTemplateError, jinja2.exceptions.SecurityError):
    """A chat template tried an operation the sandbox forbids (an unsafe attribute, mutating its inputs)."""


# ----------------------------------------------------------------------------------------------------------------
# Limits and the state of one render
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateLimits:
    """What one chat-template call may cost; see the module docstring for each field and why its default."""

    template_chars: int = 1_000_000
    output_chars: int = 64 * 2**20
    loop_iterations: int = 10_000_000
    render_seconds: float = 10.0
    sequence_items: int = 1_000_000
    integer_bits: int = 65_536

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = (int, float) if f.name == "render_seconds" else int
            if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value < math.inf:
                raise ChatTemplateError(f"TemplateLimits.{f.name} must be a positive finite number, got {value!r}")


DEFAULT_LIMITS = TemplateLimits()


def _one_line(text: Any, limit: int = 300) -> str:
    """`text` as a single line of at most `limit` characters (template messages may hold newlines or be huge)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class _RenderState:
    """Counters of one call against its limits, the output length yielded so far (the generation spans start
    there), the spans found, and for prefix masks the output length at each message's loop iteration."""

    def __init__(self, limits: TemplateLimits, source: str, deadline: float) -> None:
        self.limits, self.source, self.deadline = limits, source, deadline
        self.iterations = self.printed = self.output = 0
        self.spans: list[tuple[int, int]] = []
        self.message_index: dict[int, int] | None = None  # id(message dict) -> its index, when marks are wanted
        self.marks: dict[int, int] = {}

    def refuse(self, what: str, field: str) -> ChatTemplateError:
        limit = getattr(self.limits, field)
        return ChatTemplateError(
            f"{self.source}: {what} exceeds TemplateLimits.{field}={limit}; raise it with "
            f"limits=TemplateLimits({field}=...) or lmforge.tokenizer.template_sandbox.DEFAULT_LIMITS"
        )

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise self.refuse("rendering time", "render_seconds")

    def tick(self, n: int = 1) -> None:
        """Count `n` loop iterations (and check the deadline)."""
        self.iterations += n
        if self.iterations > self.limits.loop_iterations:
            raise self.refuse("the number of loop iterations", "loop_iterations")
        self.check_time()

    def count_printed(self, text: str) -> str:
        self.printed += len(text)
        if self.printed > self.limits.output_chars:
            raise self.refuse("the text printed", "output_chars")
        self.check_time()
        return text

    def check_text_size(self, n: int, what: str) -> None:
        if n > self.limits.output_chars:
            raise self.refuse(f"{what} ({n} characters)", "output_chars")

    def check_items(self, n: int, what: str) -> None:
        if n > self.limits.sequence_items:
            raise self.refuse(f"{what} ({n} items)", "sequence_items")

    def check_bits(self, n: int, what: str) -> None:
        if n > self.limits.integer_bits:
            raise self.refuse(f"{what} (about {n} bits)", "integer_bits")

    def checked(self, value: Any) -> Any:
        """`value` unchanged after checking the size of a string, bytes, list, tuple or int the template made."""
        if isinstance(value, (str, bytes)):
            self.check_text_size(len(value), "a string")
        elif isinstance(value, (list, tuple)):
            self.check_items(len(value), "a list")
        elif isinstance(value, int) and not isinstance(value, bool):
            self.check_bits(value.bit_length(), "an integer")
        return value

    def bounded_list(self, items: Iterable[Any]) -> list[Any]:
        """A list of `items` (a generator), refused once longer than ``sequence_items``."""
        out = []
        for item in items:
            out.append(item)
            if len(out) % 4096 == 0:
                self.check_items(len(out), "a list made from a generator")
                self.check_time()
        self.check_items(len(out), "a list made from a generator")
        return out


_STATE: ContextVar[_RenderState | None] = ContextVar("lmforge_chat_render", default=None)


def _state() -> _RenderState:
    """The current render's state; outside a render (Jinja folding constants at compile time) the default limits."""
    state = _STATE.get()
    return state if state is not None else _RenderState(DEFAULT_LIMITS, DEFAULT_SOURCE, math.inf)


# ----------------------------------------------------------------------------------------------------------------
# Size estimates: how large a string operation's result can be, computed before it runs
# ----------------------------------------------------------------------------------------------------------------

_HUGE = 2**63  # stands for a number too long to convert (int() refuses > 4300 digits)


def _as_int(value: Any) -> int:
    """`value` if it is an int, else 0 (the operation itself then raises its own error for a wrong type)."""
    return value if isinstance(value, int) else 0


def _digits(text: str | None) -> int:
    return 0 if not text else int(text) if len(text) < 19 else _HUGE


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(s, (str, bytes)) and type(old) is type(new) and isinstance(old, type(s))):
        return 0
    n = len(s) + 1 if not old else s.count(old)
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(0, len(new) - len(old))


def _join_size(sep: Any, items: Any) -> int:
    if isinstance(items, (str, bytes)):
        return len(items) * (1 + len(sep))
    if not isinstance(items, (list, tuple)):
        return 0
    return len(str(sep)) * len(items) + sum(len(x) for x in items if isinstance(x, (str, bytes)))


def _translate_size(s: Any, table: Any) -> int:
    if not isinstance(table, Mapping):
        return len(s)
    return len(s) * max([1] + [len(v) for v in table.values() if isinstance(v, (str, bytes))])


_PERCENT_FIELD = re.compile(r"%(\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.DOTALL)


def _percent_size(fmt: Any, args: Any) -> int:
    """An upper bound of the padding in ``fmt % args``: its length plus every field's width and precision (a
    ``*`` takes its value from the arguments, in order)."""
    if not isinstance(fmt, (str, bytes)):
        return 0
    if isinstance(fmt, bytes):
        fmt = fmt.decode("latin-1")
    positional = iter(args if isinstance(args, tuple) else (args,))
    total = len(fmt)
    for m in _PERCENT_FIELD.finditer(fmt):
        if m.group(4) == "%":
            continue
        for part in (m.group(2), m.group(3)):
            total += _as_int(next(positional, 0)) if part == "*" else _digits(part)
        if m.group(1) is None:
            next(positional, None)
    return total


_SPEC_NUMBER = re.compile(r"\d+")


def _format_spec_size(spec: str) -> int:
    """An upper bound of the padding a ``str.format`` spec adds: the sum of the numbers in it (width, precision)."""
    return sum(_digits(n) for n in _SPEC_NUMBER.findall(spec))


def _json_depth(value: Any) -> int:
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return depth


def _tojson_size(value: Any, ensure_ascii: bool = False, indent: Any = None, *args: Any, **kwargs: Any) -> int:
    """With `indent`, each of the at most ``len(compact)`` line breaks adds ``indent * depth`` characters."""
    width = len(indent) if isinstance(indent, str) else _as_int(indent)
    if width <= 0:
        return 0
    try:
        compact = len(json.dumps(value))
    except (TypeError, ValueError):
        return 0
    return compact * (2 + width * _json_depth(value))


# Method name -> size of the result of calling it on a str or bytes `s` (same arguments as the method).
_STRING_METHOD_SIZES: dict[str, Callable[..., int]] = {
    "center": lambda s, width=0, *a: max(len(s), _as_int(width)),
    "ljust": lambda s, width=0, *a: max(len(s), _as_int(width)),
    "rjust": lambda s, width=0, *a: max(len(s), _as_int(width)),
    "zfill": lambda s, width=0: max(len(s), _as_int(width)),
    "expandtabs": lambda s, tabsize=8: len(s) + s.count("\t" if isinstance(s, str) else b"\t") * _as_int(tabsize),
    "replace": _replace_size,
    "join": lambda s, items=(): _join_size(s, items),
    "translate": _translate_size,
}

def _indent_size(s: Any, width: Any = 4, *args: Any, **kwargs: Any) -> int:
    text = str(s)
    return len(text) + (text.count("\n") + 1) * (len(width) if isinstance(width, str) else _as_int(width))


def _wordwrap_size(s: Any, width: Any = 79, long: Any = True, wrapstring: Any = None, *args: Any, **kw: Any) -> int:
    return len(str(s)) * (1 + len(wrapstring if isinstance(wrapstring, str) else "\n"))


def _sum_work(iterable: Any, attribute: Any = None, start: Any = 0) -> int:
    """Items copied by ``|sum`` over sequences (each ``+`` copies the running total): numbers cost nothing."""
    if isinstance(start, (int, float)):
        return 0
    total = len(start) + sum(len(x) for x in iterable if isinstance(x, (list, tuple, str)))
    return len(iterable) * total


# Filter name -> size of its result in characters (same arguments as the filter, without Jinja's context).
_FILTER_TEXT_SIZES: dict[str, Callable[..., int]] = {
    "center": lambda value, width=80: max(len(str(value)), _as_int(width)),
    "indent": _indent_size,
    "replace": lambda s, old, new, count=None: _replace_size(str(s), str(old), str(new), _as_int(count) or -1),
    "format": lambda value, *args, **kwargs: _percent_size(str(value), kwargs or args),
    "join": lambda value, d="", attribute=None: _join_size(d, value),
    "wordwrap": _wordwrap_size,
    "tojson": _tojson_size,
}

# Filter name -> number of items in its result (for |sum: the items its additions copy).
_FILTER_ITEM_SIZES: dict[str, Callable[..., int]] = {
    "batch": lambda value, linecount, fill_with=None: _as_int(linecount),
    "slice": lambda value, slices, fill_with=None: _as_int(slices),
    "list": lambda value: len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0,
    "sum": _sum_work,
}


def _estimate(size: Callable[..., int], args: tuple, kwargs: dict) -> int:
    """`size(*args, **kwargs)`, or 0 when the arguments do not fit (the operation then raises its own error)."""
    try:
        return size(*args, **kwargs)
    except (TypeError, ValueError, AttributeError):
        return 0


# ----------------------------------------------------------------------------------------------------------------
# The sandboxed Jinja2 environment (transformers.utils.chat_template_utils' environment, plus the limits)
# ----------------------------------------------------------------------------------------------------------------

_LOOP_FILTER = "lmforge:loop"  # not a Jinja identifier: templates cannot name these two filters
_MARK_FILTER = "lmforge:mark"


class _CountedIterable:
    """What a ``{% for %}`` loop iterates: the original iterable, each iteration counted against the limits."""

    __slots__ = ("_items", "_state")

    def __init__(self, items: Any) -> None:
        self._items, self._state = items, _state()

    def __iter__(self) -> Iterator[Any]:
        for item in self._items:
            self._state.tick()
            yield item

    def __len__(self) -> int:
        return len(self._items)  # a TypeError for generators, which Jinja's loop object expects


def _mark_message(item: Any) -> None:
    """At the start of a loop iteration: if `item` is a conversation message, note the output length so far."""
    state = _STATE.get()
    if state is not None and state.message_index is not None:
        index = state.message_index.get(id(item))
        if index is not None:
            state.marks[index] = state.output


def _filter_call(name: str, arg: jinja2.nodes.Expr, lineno: int) -> jinja2.nodes.Filter:
    return jinja2.nodes.Filter(arg, name, [], [], None, None, lineno=lineno)


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator with the hooks the limits need: every ``{% for %}`` iterates a `_CountedIterable`
    and marks its item, every printed string goes through ``environment.count_printed`` and every ``~`` result
    through ``environment.checked``."""

    def visit_Template(self, node: jinja2.nodes.Template, frame: Any = None) -> None:
        for loop in list(node.find_all(jinja2.nodes.For)):
            loop.iter = _filter_call(_LOOP_FILTER, loop.iter, loop.lineno)
            if isinstance(loop.target, jinja2.nodes.Name):
                target = jinja2.nodes.Name(loop.target.name, "load", lineno=loop.lineno)
                loop.body.insert(0, jinja2.nodes.ExprStmt(_filter_call(_MARK_FILTER, target, loop.lineno)))
        super().visit_Template(node, frame)

    def _output_const_repr(self, group: Iterable[Any]) -> str:
        return f"environment.count_printed({super()._output_const_repr(group)})"

    def _output_child_pre(self, node: jinja2.nodes.Expr, frame: Any, finalize: Any) -> None:
        self.write("environment.count_printed(")
        super()._output_child_pre(node, frame, finalize)

    def _output_child_post(self, node: jinja2.nodes.Expr, frame: Any, finalize: Any) -> None:
        super()._output_child_post(node, frame, finalize)
        self.write(")")

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(")")


class _BoundedFormatter(SandboxedFormatter):
    """``str.format`` in the sandbox, refusing a field whose width or precision would exceed ``output_chars``
    and a result that grows beyond it (``'{0}{0}{0}'.format(big)``)."""

    def __init__(self, env: Any, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self._state, self._produced = _state(), 0

    def format_field(self, value: Any, format_spec: str) -> Any:
        self._state.check_text_size(_format_spec_size(format_spec), f"the str.format field width {format_spec!r}")
        text = super().format_field(value, format_spec)
        self._produced += len(text)
        self._state.check_text_size(self._produced, "a str.format result")
        return text


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    """The same for ``Markup.format`` (a string marked ``|safe``)."""


class _BoundedStrFormat:
    """A string's ``format`` or ``format_map`` method as the template sees it (it prints as
    ``<chat template str.format>``, not as a Python function)."""

    __slots__ = ("_env", "_is_format_map", "_text")

    def __init__(self, env: Any, text: str, is_format_map: bool) -> None:
        self._env, self._text, self._is_format_map = env, text, is_format_map

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        if self._is_format_map:
            if kwargs or len(args) != 1:
                raise TypeError("format_map() takes exactly one positional argument")
            args, kwargs = (), args[0]
        if isinstance(self._text, Markup):
            formatter: _BoundedFormatter = _BoundedEscapeFormatter(self._env, escape=self._text.escape)
        else:
            formatter = _BoundedFormatter(self._env)
        return type(self._text)(formatter.vformat(self._text, args, kwargs))

    def __repr__(self) -> str:
        return f"<chat template str.{'format_map' if self._is_format_map else 'format'}>"


def _power_bits(base: Any, exponent: Any) -> int:
    """A lower bound of the bits of ``base ** exponent`` for ints, computed without computing the power."""
    if type(base) is not int or type(exponent) is not int or exponent <= 0 or abs(base) <= 1:
        return 0
    return (abs(base).bit_length() - 1) * exponent


def _repeat_size(left: Any, right: Any) -> tuple[int, bool]:
    """(length of ``left * right``, whether it is text) for a sequence repeated by an int, in either order."""
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
            return len(seq) * max(n, 0), isinstance(seq, (str, bytes))
    return 0, False


class _ChatEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with `TemplateLimits` enforced on operators, calls, string formatting, loops and output."""

    intercepted_binops = frozenset({"*", "+", "%", "**"})
    code_generator_class = _BoundedCodeGenerator

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """``left <operator> right``, its size checked before it is computed and after."""
        state = _state()
        if operator == "+" and type(left) is str and type(right) is str:  # the common case, kept fast
            state.check_text_size(len(left) + len(right), "a concatenation")
            return left + right
        if operator == "*":
            size, text = _repeat_size(left, right)
            (state.check_text_size if text else state.check_items)(size, "a repeated sequence")
        elif operator == "+" and isinstance(left, (str, bytes, list, tuple)) and type(left) is type(right):
            check = state.check_text_size if isinstance(left, (str, bytes)) else state.check_items
            check(len(left) + len(right), "a concatenation")
        elif operator == "%":
            state.check_text_size(_percent_size(left, right), "a %-format width")
        elif operator == "**":
            state.check_bits(_power_bits(left, right), "a power")
        return state.checked(super().call_binop(context, operator, left, right))

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        state = _state()
        state.check_time()
        owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
        if isinstance(owner, (str, bytes)) and name in _STRING_METHOD_SIZES:
            if name == "join" and args and isinstance(args[0], Iterator):
                args = (state.bounded_list(args[0]), *args[1:])
            size = _estimate(_STRING_METHOD_SIZES[name], (owner, *args), kwargs)
            state.check_text_size(size, f"the result of str.{name}")
        elif type(owner) is int and name == "to_bytes":
            state.check_text_size(_as_int(args[0] if args else kwargs.get("length", 1)), "int.to_bytes")
        return state.checked(super().call(context, obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _state().check_time()
        return self._private_undefined(obj, attribute, super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        _state().check_time()
        return self._private_undefined(obj, argument, super().getitem(obj, argument))

    def _private_undefined(self, obj: Any, name: Any, value: Any) -> Any:
        """A missing underscore name is unsafe too (as on a Python function, whose ``__globals__`` the sandbox
        hides), so using it raises a SecurityError, not an UndefinedError."""
        if isinstance(value, jinja2.Undefined) and isinstance(name, str) and name.startswith("_"):
            return self.unsafe_undefined(obj, name)
        return value

    def wrap_str_format(self, value: Any) -> _BoundedStrFormat | None:
        """Jinja's sandboxed ``str.format`` / ``format_map`` (same rules, CVE-2025-27516's fix included), through
        `_BoundedFormatter`."""
        if super().wrap_str_format(value) is None:
            return None
        return _BoundedStrFormat(self, value.__self__, value.__name__ == "format_map")

    def count_printed(self, text: str) -> str:
        """Called by the compiled template on every string it prints (see `_BoundedCodeGenerator`)."""
        return _state().count_printed(text)

    def checked(self, value: Any) -> Any:
        return _state().checked(value)


def _guarded_filter(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    """`original` (a Jinja filter) with the deadline checked, a generator argument made a bounded list, its result
    size estimated first where it can be large, and its result checked."""
    lead = 1 if hasattr(original, "jinja_pass_arg") else 0  # context / environment / eval context comes first
    text_size, item_size = _FILTER_TEXT_SIZES.get(name), _FILTER_ITEM_SIZES.get(name)

    @functools.wraps(original)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        state = _state()
        state.check_time()
        if len(args) > lead and isinstance(args[lead], Iterator):
            args = (*args[:lead], state.bounded_list(args[lead]), *args[lead + 1 :])
        if text_size is not None:
            state.check_text_size(_estimate(text_size, args[lead:], kwargs), f"the result of |{name}")
        if item_size is not None:
            state.check_items(_estimate(item_size, args[lead:], kwargs), f"the result of |{name}")
        return state.checked(original(*args, **kwargs))

    return guarded


class _GenerationExtension(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body unchanged and records its character span.

    The span starts at the length of the output yielded so far, as transformers computes it; this is exact for
    blocks at the template's top level or inside loops and conditionals (not inside macros or ``{% set %}``).
    """

    tags = {"generation"}  # noqa: RUF012 (jinja2's API)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation", []), [], [], body).set_lineno(lineno)

    def _generation(self, caller: Any) -> str:
        text = caller()
        state = _STATE.get()
        if state is not None:
            state.spans.append((state.output, state.output + len(text)))
        return text


class _TemplateGlobal:
    """A function or class the template may call, printing as ``<chat template global NAME>`` (not as a Python
    object whose repr names modules and classes)."""

    __slots__ = ("_function", "_name")

    def __init__(self, name: str, function: Callable[..., Any]) -> None:
        self._name, self._function = name, function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<chat template global {self._name}>"


class _TemplateDict(_TemplateGlobal):
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without exposing the dict type itself."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__("dict", dict)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` refusing underscore-prefixed names (a way towards CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the namespace attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"{_state().source}: the template refused the conversation: {_one_line(message)}")


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja2's own tojson HTML-escapes '<', '>', '&' and "'"; chat templates want plain JSON (transformers' filter).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    if isinstance(fmt, str):  # a directive expands to at most a few dozen characters (%c: 24)
        _state().check_text_size(len(fmt) + 64 * fmt.count("%"), "the result of strftime_now")
    return datetime.now().strftime(fmt)


_LIPSUM_SIGNATURE = inspect.signature(jinja2.utils.generate_lorem_ipsum)


def _lipsum(*args: Any, **kwargs: Any) -> str:
    """Jinja's ``lipsum(n=5, html=True, min=20, max=100)``, its size (``n`` paragraphs of at most ``max(min, max)``
    words of at most 15 characters) checked first and its words counted as loop iterations."""
    bound = _LIPSUM_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    words = _as_int(bound.arguments["n"]) * max(_as_int(bound.arguments["min"]), _as_int(bound.arguments["max"]), 0)
    state = _state()
    state.check_text_size(16 * words, "the result of lipsum")
    state.tick(words)
    return jinja2.utils.generate_lorem_ipsum(*args, **kwargs)


def _finalize(value: Any) -> Any:
    """What ``{{ value }}`` prints: a function or method prints as ``<chat template callable NAME>``, not as
    Python's repr (which names its type, its module and a memory address)."""
    if callable(value) and not isinstance(value, (str, jinja2.Undefined, _TemplateGlobal, _BoundedStrFormat)):
        return f"<chat template callable {getattr(value, '__name__', type(value).__name__)}>"
    return value


@functools.lru_cache(maxsize=1)
def _environment() -> _ChatEnvironment:
    env = _ChatEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationExtension, jinja2.ext.loopcontrols],
        finalize=_finalize,
    )
    env.filters["tojson"] = _tojson
    env.filters.update({name: _guarded_filter(name, f) for name, f in env.filters.items()})
    env.filters[_LOOP_FILTER] = _CountedIterable
    env.filters[_MARK_FILTER] = _mark_message
    env.globals.update(
        range=_TemplateGlobal("range", safe_range),
        lipsum=_TemplateGlobal("lipsum", _lipsum),
        cycler=_TemplateGlobal("cycler", jinja2.utils.Cycler),
        joiner=_TemplateGlobal("joiner", jinja2.utils.Joiner),
        namespace=_TemplateGlobal("namespace", _TemplateNamespace),
        dict=_TemplateDict(),
        raise_exception=_TemplateGlobal("raise_exception", _raise_exception),
        strftime_now=_TemplateGlobal("strftime_now", _strftime_now),
    )
    return env


# ----------------------------------------------------------------------------------------------------------------
# Compiling and rendering
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def _template_errors(source: str) -> Iterator[None]:
    """Re-raise whatever a template's compilation or rendering raises as a one-line `ChatTemplateError`."""
    try:
        yield
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateSecurityError(f"{source}: the sandbox refused an unsafe operation: {_one_line(e)}") from e
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{source}: template syntax error on line {e.lineno}: {_one_line(e.message)}") from e
    except RecursionError as e:
        raise ChatTemplateError(f"{source}: the template recursed too deeply (a macro or loop calling itself)") from e
    except Exception as e:  # a template is a program: any error inside it is the template's
        raise ChatTemplateError(f"{source}: the template failed: {type(e).__name__}: {_one_line(e)}") from e


@functools.lru_cache(maxsize=64)
def _compile(chat_template: str) -> jinja2.Template:
    return _environment().from_string(chat_template)


def compile_chat_template(
    chat_template: str, *, limits: TemplateLimits | None = None, source: str = DEFAULT_SOURCE
) -> jinja2.Template:
    """Compile (and cache) a template in the sandboxed environment. A template that is not a string, is longer
    than ``limits.template_chars`` or does not parse raises `ChatTemplateError` naming `source`."""
    limits = limits or DEFAULT_LIMITS
    if not isinstance(chat_template, str):
        raise ChatTemplateError(f"{source}: a chat template must be a string, got {type(chat_template).__name__}")
    if len(chat_template) > limits.template_chars:
        state = _RenderState(limits, source, math.inf)
        raise state.refuse(f"the template's size ({len(chat_template)} characters)", "template_chars")
    with _template_errors(source):
        return _compile(chat_template)


def _plain(value: Any) -> Any:
    """A copy made of JSON types only (what the template may see); other objects become "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if callable(getattr(value, "item", None)) and getattr(value, "shape", None) == ():  # numpy / torch scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def plain_messages(messages: Iterable[Mapping[str, Any]], source: str) -> list[dict]:
    """Plain dicts; keys whose value is None dropped (OpenAI-style content=None), as transformers does."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"{source}: messages[{i}] must be a dict with 'role' and 'content', got {m!r:.80}")
        out.append(_plain({k: v for k, v in m.items() if v is not None}))
    return out


class TemplateRenderer:
    """One compiled template with its variables, limits, source and deadline, rendering any list of messages."""

    def __init__(self, chat_template: str, limits: TemplateLimits | None, source: str, variables: dict) -> None:
        self.limits = limits or DEFAULT_LIMITS
        self.source = source
        self.template = compile_chat_template(chat_template, limits=self.limits, source=source)
        self.variables = _plain(variables)
        self.deadline = time.monotonic() + self.limits.render_seconds

    def __call__(self, messages: list[dict], add_generation_prompt: bool, mark: bool = False) -> tuple[str, Any]:
        """(the text, the render's state); with `mark`, the state records each message's output position."""
        state = _RenderState(self.limits, self.source, self.deadline)
        if mark:
            state.message_index = {id(m): i for i, m in enumerate(messages)}
        context = {**self.variables, "messages": messages, "add_generation_prompt": add_generation_prompt}
        chunks = []
        token = _STATE.set(state)
        try:
            with _template_errors(self.source):
                for chunk in self.template.generate(**context):
                    chunks.append(chunk)
                    state.output += len(chunk)
        finally:
            _STATE.reset(token)
        return "".join(chunks), state
