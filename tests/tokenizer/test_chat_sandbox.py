"""The chat-template sandbox against attacks: escapes print nothing secret and run nothing; bombs stop in time.

Oracles: a canary environment variable whose value must never appear, a canary file that must never be created,
the markers of Python internals (class, module and function reprs, ``__builtins__``, ``os.environ``) that must never
be printed, the wall clock (a bomb ends within its limit plus a small slack) and the process's peak memory.
"""

from __future__ import annotations

import resource
import time

import jinja2
import pytest

from lmforge.tokenizer import template_sandbox
from lmforge.tokenizer.chat import ChatTemplateError, ChatTemplateSecurityError, TemplateLimits, render_chat_template

CANARY_VALUE = "lmforge-canary-5f1e9c"
FORBIDDEN = (CANARY_VALUE, "<class", "<module", "<function", "<built-in", "<bound method")
FORBIDDEN += ("__builtins__", "os.environ", "environ(")
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
RUN = "'touch ' ~ path"  # what a successful escape would execute

ESCAPES = {
    # attribute chains to globals and subclasses
    "str-subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "tuple-bases": "{{ ().__class__.__bases__[0].__subclasses__() }}",
    "str-class": "{{ ''.__class__ }}{{ ''.__class__.__base__ }}{{ range(3).__class__ }}",
    "cycler-globals": "{{ cycler.__init__.__globals__.os.environ }}",
    "cycler-system": "{{ cycler.__init__.__globals__.os.system(" + RUN + ") }}",
    "cycler-item": "{{ cycler['__init__']['__globals__'] }}",
    "cycler-instance": "{{ cycler('a').__class__ }}{{ cycler('a').next.__func__ }}",
    "joiner-globals": "{{ joiner.__init__.__globals__ }}{{ joiner().__class__.__init__.__globals__ }}",
    "lipsum-globals": "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "lipsum-item": "{{ lipsum['__globals__'] }}",
    "namespace-globals": "{{ namespace.__init__.__globals__ }}{{ namespace(a=1).__class__ }}",
    "range-globals": "{{ range.__globals__ }}{{ range.__self__ }}",
    "raise-exception-builtins": "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system("
    + RUN
    + ") }}",
    "strftime-globals": "{{ strftime_now.__globals__ }}{{ strftime_now.__code__ }}",
    "dict-call-globals": "{{ dict.__call__.__globals__ }}{{ dict.__class__ }}{{ dict.fromkeys.__func__ }}",
    "self-globals": "{{ self.__init__.__globals__ }}{{ self._TemplateReference__context }}{{ self.__dict__ }}",
    "loop-object": "{% for x in [1] %}{{ loop.__class__.__init__.__globals__ }}{{ loop._iterator }}"
    "{{ loop.cycle.__func__ }}{% endfor %}",
    "caller-object": "{% macro m() %}{{ caller.__globals__ }}{{ caller._func.__globals__ }}{% endmacro %}"
    "{% call m() %}x{% endcall %}",
    "macro-object": "{% macro m() %}{% endmacro %}{{ m._func.__globals__ }}{{ m.__class__ }}",
    "messages-mutation": "{{ messages.append(1) }}",
    "message-update": "{{ messages[0].update({'role': 'x'}) }}",
    "globals-printed": "{{ cycler }}{{ joiner }}{{ lipsum }}{{ namespace }}{{ range }}{{ dict }}{{ raise_exception }}"
    "{{ strftime_now }}{{ self }}{{ [cycler, lipsum] }}{{ ''.format }}",
    "methods-printed": "{{ ''.upper }}{{ cycler('a').next }}{{ messages.copy }}{{ joiner() }}{{ lipsum }}"
    "{% for m in messages %}{{ loop.cycle }}{% endfor %}",
    # str.format / format_map field traversal, direct and through |attr (CVE-2025-27516)
    "format-class": "{{ '{0.__class__.__mro__}'.format('') }}",
    "format-globals": "{{ '{0.__init__.__globals__}'.format(cycler) }}",
    "format-item": "{{ '{0[__globals__]}'.format(lipsum) }}",
    "format-environ": "{{ '{0.__init__.__globals__[os].environ}'.format(cycler) }}",
    "format-nested": "{{ '{0:{1.__class__}}'.format(1, '') }}{{ '{0.a.__class__}'.format(namespace(a=1)) }}",
    "format-map": "{{ '{x.__class__}'.format_map({'x': ''}) }}",
    "format-repr": "{{ '{0!r} {0!s}'.format(cycler) }}{{ '{}'.format(''.format) }}",
    "attr-format": "{{ (''|attr('format'))('{0.__init__.__globals__[os].environ}', cycler) }}",
    "attr-format-map": "{{ ('{0.__class__}'|attr('format_map'))({'0': ''}) }}",
    "attr-class": "{{ ''|attr('__class__') }}{{ (cycler|attr('__init__'))|attr('__globals__') }}",
    "attr-printed": "{{ ''|attr('format') }}{{ ''|attr('format_map') }}",
    # %-formatting and |format
    "percent-objects": "{{ '%s %s %s' % (cycler, range, namespace) }}{{ '%r' % raise_exception }}",
    "percent-mapping": "{{ '%(a)s' % {'a': lipsum} }}{{ '%s' % ''.__class__ }}",
    "format-filter": "{{ '%s'|format(cycler) }}{{ '%r'|format(dict) }}{{ '%(a)r'|format(a=strftime_now) }}",
    # no loader: include, import, extends, from
    "include": "{% include 'x' %}",
    "import": "{% import 'os' as os %}{{ os.environ }}",
    "extends": "{% extends 'base' %}",
    "from-import": "{% from 'os' import environ %}{{ environ }}",
    # namespace tricks
    "namespace-dunder-kwarg": "{% set ns = namespace(__class__=1) %}{{ ns }}",
    "namespace-set-dict": "{% set ns = namespace() %}{% set ns.__dict__ = {} %}",
    "namespace-set-private": "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "namespace-attrs": "{{ namespace(a=1)._Namespace__attrs }}{{ namespace(a=cycler).a.__init__ }}",
    "namespace-dict-arg": "{% set ns = namespace({'__class__': 1}) %}",
    "dict-tricks": "{{ dict.fromkeys(['a'], cycler) }}{{ dict(__class__=1) }}{{ dict(a=1).__class__ }}",
    # tojson on objects, strftime_now with crafted formats
    "tojson-object": "{{ cycler|tojson }}",
    "tojson-nested-object": "{{ {'a': lipsum}|tojson }}",
    "strftime-formats": "{{ strftime_now('%Y %c %%s %Q %') }}",
    "strftime-object": "{{ strftime_now(cycler) }}",
    "error-message-object": "{{ raise_exception(cycler) }}",
    "error-message-globals": "{{ raise_exception(cycler.__init__.__globals__) }}",
}


@pytest.fixture
def canary(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_CANARY", CANARY_VALUE)
    return tmp_path / "escaped"


@pytest.mark.parametrize("template", list(ESCAPES.values()), ids=list(ESCAPES))
def test_escape_attempt_is_harmless(template, canary):
    """Renders harmless text or raises ChatTemplateError; nothing secret in the text or the message; no file."""
    try:
        out = render_chat_template(MESSAGES, template, path=str(canary))
    except ChatTemplateError as e:
        out = str(e)
        assert "\n" not in out and out.startswith("chat template: ")
    assert not [marker for marker in FORBIDDEN if marker in out], out
    assert not canary.exists()


@pytest.mark.parametrize(
    "template",
    [ESCAPES[k] for k in ("messages-mutation", "namespace-set-dict", "namespace-dunder-kwarg", "cycler-system")],
)
def test_unsafe_operations_raise_security_errors(template, canary):
    with pytest.raises(ChatTemplateSecurityError) as info:
        render_chat_template(MESSAGES, template, path=str(canary))
    assert isinstance(info.value, jinja2.exceptions.SecurityError)


def test_format_through_attr_is_sandboxed():
    """CVE-2025-27516: the format method reached through |attr is the sandboxed one (it still formats)."""
    assert render_chat_template([], "{{ ('{}-{x}'|attr('format'))(1, x=2) }}") == "1-2"
    assert render_chat_template([], "{{ '{0.a}'.format(namespace(a=3)) }}|{{ '%05.1f' % 2.25 }}") == "3|002.2"


SLACK_S = 1.5  # what a bomb may run past its render_seconds


def bomb_limits(limit: str, overrides: dict) -> TemplateLimits:
    """A 1 s deadline for the bombs that only time stops; the others get 10 s, so that a slow or loaded machine still
    reaches the size limit they test before the clock (a CI run once took 1 s for 100,000 list items)."""
    return TemplateLimits(**{"render_seconds": 1.0 if limit == "render_seconds" else 10.0, **overrides})


BOMBS = {
    # (template, the limit named in the error, limits)
    "repeat": ("{{ 'a' * 10**9 }}", "output_chars", {}),
    "repeat-twice": ("{{ 'a' * 100000 * 100000 }}", "output_chars", {}),
    "list-repeat": ("{{ [1] * 10**9 }}", "sequence_items", {}),
    "center-filter": ("{{ 'a'|center(10**9) }}", "output_chars", {}),
    "center-method": ("{{ 'a'.center(10**9) }}{{ 'a'.ljust(10**9) }}", "output_chars", {}),
    "zfill": ("{{ '1'.zfill(10**9) }}", "output_chars", {}),
    "indent": ("{{ 'a\nb'|indent(10**9) }}", "output_chars", {}),
    "indent-string": ("{{ ('\n' * 1000)|indent('x' * 1000000, blank=true) }}", "output_chars", {}),
    "format-width": ("{{ '{:>999999999}'.format('a') }}", "output_chars", {}),
    "format-nested-width": ("{{ '{0:>{1}}'.format('a', 10**9) }}", "output_chars", {}),
    "format-precision": ("{{ '{:.999999999f}'.format(1.5) }}", "output_chars", {}),
    "format-repeat-field": ("{% set s = 'x' * 10**7 %}{{ ('{0}' * 10)|attr('format')(s) }}", "output_chars", {}),
    "percent-width": ("{{ '%999999999d' % 1 }}", "output_chars", {}),
    "percent-star": ("{{ '%*d' % (999999999, 1) }}", "output_chars", {}),
    "format-filter-width": ("{{ '%999999999s'|format(1) }}", "output_chars", {}),
    "replace-filter": ("{{ ('a' * 1000)|replace('', 'x' * 1000000) }}", "output_chars", {}),
    "replace-method": ("{{ ('a' * 1000).replace('a', 'x' * 1000000) }}", "output_chars", {}),
    "join-filter": ("{{ ('x' * 1000000)|join('y' * 100) }}", "output_chars", {}),
    "join-method": ("{{ ('y' * 100).join('x' * 1000000) }}", "output_chars", {}),
    "expandtabs": ("{{ ('\t' * 1000000).expandtabs(1000) }}", "output_chars", {}),
    "translate": ("{{ ('a' * 100000).translate({97: 'b' * 100000}) }}", "output_chars", {}),
    "to-bytes": ("{{ (1).to_bytes(10**9, 'big') }}", "output_chars", {}),
    "tojson-indent": ("{{ messages|tojson(indent=10**9) }}", "output_chars", {}),
    "lipsum": ("{{ lipsum(10**6) }}", "output_chars", {}),
    "strftime": ("{{ strftime_now('%c' * 10**7) }}", "output_chars", {}),
    "doubling": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                 "output_chars", {}),
    "doubling-plus": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}", "output_chars", {}),
    "printed-loop": ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output_chars", {}),
    "printed-into-macro": ("{% macro m() %}{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endmacro %}"
                           "{% set s = m() %}", "output_chars", {}),
    "printed-literal-in-set": ("{% set s %}{% for i in range(100000) %}" + "y" * 1000 + "{% endfor %}{% endset %}",
                               "output_chars", {}),
    "batch": ("{{ [1]|batch(10**9, 0)|list }}", "sequence_items", {}),
    "slice": ("{{ [1]|slice(10**9)|list }}", "sequence_items", {}),
    "sum-lists": ("{{ ([[1] * 1000] * 100000)|sum(start=[]) }}", "sequence_items", {}),
    "list-of-generator": ("{{ ('x' * 2000000)|batch(1)|list }}", "sequence_items", {"sequence_items": 100_000}),
    "power": ("{{ 10 ** 1000000 }}", "integer_bits", {}),
    "squaring": ("{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
                 "integer_bits", {}),
    "nested-loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "loop_iterations", {"loop_iterations": 200_000}),
    "nested-loops-time": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                          "render_seconds", {}),
    "exponential-macro": ("{% macro m(n) %}{% if n %}{{ m(n-1) }}{{ m(n-1) }}{% endif %}{% endmacro %}{{ m(60) }}",
                          "render_seconds", {}),
    "exponential-recursive-loop": ("{% for x in range(40) recursive %}{% if x %}{{ loop(range(x)) }}{% endif %}"
                                   "{% endfor %}", "render_seconds", {}),
    "template-size": ("{{ 'x' }}" * 200, "template_chars", {"template_chars": 1000}),
    "recursive-macro": ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "recursed", {}),
    "recursive-loop": ("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}", "recursed", {}),
    "deep-expression": ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "", {}),
    "range": ("{{ range(10**9)|list }}", "MAX_RANGE", {}),
}


@pytest.mark.parametrize(("template", "limit", "overrides"), list(BOMBS.values()), ids=list(BOMBS))
def test_bomb_stops_with_a_clear_error_in_time(template, limit, overrides):
    bounds = bomb_limits(limit, overrides)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(ChatTemplateError) as info:
        render_chat_template(MESSAGES, template, limits=bounds)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert limit in message and "\n" not in message and message.startswith("chat template: ")
    if limit != "recursed" and limit in {f for f in TemplateLimits.__dataclass_fields__}:
        assert f"limits=TemplateLimits({limit}=...)" in message  # says how to raise it
    assert elapsed < bounds.render_seconds + SLACK_S
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_kib) / 1024
    assert grown_mib < 1500, f"peak memory grew by {grown_mib:.0f} MiB"


def test_limits_can_be_raised_per_call_and_by_default(monkeypatch):
    """The same template passes under larger limits: per call, and through the module default."""
    template = "{{ 'ab' * 600 }}{% for i in range(300) %}.{% endfor %}"
    small = TemplateLimits(output_chars=1000)
    with pytest.raises(ChatTemplateError, match=r"output_chars=1000"):
        render_chat_template([], template, limits=small)
    assert render_chat_template([], template) == "ab" * 600 + "." * 300
    monkeypatch.setattr(template_sandbox, "DEFAULT_LIMITS", TemplateLimits(loop_iterations=100))
    with pytest.raises(ChatTemplateError, match=r"loop_iterations=100;"):
        render_chat_template([], template)
    assert render_chat_template([], template, limits=TemplateLimits(loop_iterations=300)).endswith("." * 300)


@pytest.mark.parametrize(
    "kwargs", [{"output_chars": 0}, {"render_seconds": float("nan")}, {"loop_iterations": 1.5}, {"integer_bits": True}]
)
def test_limits_are_validated(kwargs):
    with pytest.raises(ChatTemplateError, match=f"TemplateLimits.{next(iter(kwargs))}"):
        TemplateLimits(**kwargs)


def test_counting_does_not_change_rendering():
    """Loops (with loop.last / loop.length look-ahead, else branches, unpacking, filters) render as plain Jinja2."""
    template = (
        "{% for k, v in pairs %}{{ loop.index }}/{{ loop.length }}{{ k }}={{ v }}{% if not loop.last %},{% endif %}"
        "{% endfor %}|{% for x in [] %}x{% else %}empty{% endfor %}|{% for x in items if x > 1 %}{{ x }}{% endfor %}"
        "|{{ items|map('string')|join('-') }}|{{ ('a' ~ 'b')|center(6) }}|{{ '%-3s|' % 'x' }}{{ 2 ** 10 }}"
    )
    variables = {"pairs": [("a", 1), ("b", 2)], "items": [1, 2, 3]}
    expected = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(template).render(**variables)
    assert render_chat_template([], template, **variables) == expected == "1/2a=1,2/2b=2|empty|23|1-2-3|  ab  |x  |1024"
