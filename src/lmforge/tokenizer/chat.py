"""Chat templates: a conversation -> one string -> token ids, plus the mask of the tokens the assistant wrote.

A chat template is a Jinja2 program stored in ``tokenizer_config.json`` (key ``chat_template``). It receives
``messages`` (a list of ``{"role": ..., "content": ...}`` dicts), ``add_generation_prompt`` (append the header that
opens an assistant turn), ``tools``, ``documents``, the special tokens (``bos_token``, ``eos_token``, ...) and any
extra keyword arguments, and prints the prompt. For example the ChatML template used by lmforge models
(`DEFAULT_CHAT_TEMPLATE`) turns ``[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]``
into::

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n

Templates from the Hub are untrusted code, so they run as transformers runs them: in Jinja2's
`ImmutableSandboxedEnvironment` (no access to dunder attributes or internals, no mutation of lists and dicts passed
in), with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, and these globals: `raise_exception`
(aborts with `ChatTemplateError`), `strftime_now`, a `tojson` filter that does not HTML-escape, and restricted
``dict`` and ``namespace``. The inputs are copied into plain JSON values first.

**Assistant mask** (for SFT: the loss is taken on the tokens the model should learn to write). Two methods:

1. *Generation markers*: when the template wraps assistant text in ``{% generation %}...{% endgeneration %}``, the
   character span of each block's output is recorded during rendering (exactly transformers'
   ``return_assistant_tokens_mask``). A token is masked 1 when its bytes overlap a span.
2. *Prefix rendering* (templates without markers): for each assistant message i, render ``messages[:i]`` with
   ``add_generation_prompt=True`` (the text up to where the reply starts) and ``messages[:i+1]`` without it (the
   text through the reply's end-of-turn). The assistant span is the difference: the reply's content and its
   end-of-turn tokens, minus trailing whitespace. This needs a template whose rendering of a conversation starts
   with its rendering of every shorter conversation (true of ChatML, Llama-3, Mistral-style templates); when it
   does not, a `ChatTemplateError` asks for generation markers instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.utils.errors import LmforgeError

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ChatEncoding",
    "ChatTemplateError",
    "apply_chat_template",
    "assistant_char_spans",
    "compile_chat_template",
    "default_chat_template_for",
    "render_chat_template",
    "spans_to_token_mask",
]

# ChatML, as used by SmolLM2 / Qwen, with generation markers around what the assistant writes: its content and the
# <|im_end|> that ends its turn (the newline after <|im_end|> is template framing, not learned).
# Needs the special tokens <|im_start|> and <|im_end|>.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(jinja2.exceptions.TemplateError, LmforgeError):
    """A chat template refused the conversation (its `raise_exception`), or the assistant mask cannot be found."""


class ChatEncoding(NamedTuple):
    """Token ids of a rendered conversation and a 0/1 mask, same length, marking the assistant's tokens."""

    input_ids: list[int]
    assistant_mask: list[int]


# ----------------------------------------------------------------------------------------------------------------
# The sandboxed Jinja2 environment (mirrors transformers.utils.chat_template_utils)
# ----------------------------------------------------------------------------------------------------------------


class _Tracker:
    """Output rendered so far and the generation spans found, for one render call."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.spans: list[tuple[int, int]] = []

    def length(self) -> int:
        return sum(map(len, self.chunks))


_TRACKER: ContextVar[_Tracker | None] = ContextVar("lmforge_chat_tracker", default=None)


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
        tracker = _TRACKER.get()
        if tracker is not None:
            start = tracker.length()
            tracker.spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template error: {message}")


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja2's own tojson HTML-escapes '<', '>', '&' and "'"; chat templates want plain JSON (transformers' filter).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` for templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

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


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationExtension, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=64)
def compile_chat_template(chat_template: str) -> jinja2.Template:
    """Compile (and cache) a template in the sandboxed environment."""
    return _environment().from_string(chat_template)


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


def _normalize(messages: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Plain dicts; keys whose value is None dropped (OpenAI-style content=None), as transformers does."""
    out = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise TypeError(f"chat messages must be dicts, got {m!r}")
        out.append(_plain({k: v for k, v in m.items() if v is not None}))
    return out


def render_chat_template(
    messages: Iterable[Mapping[str, Any]],
    chat_template: str = DEFAULT_CHAT_TEMPLATE,
    *,
    add_generation_prompt: bool = False,
    tools: list | None = None,
    documents: list | None = None,
    return_generation_spans: bool = False,
    **variables: Any,
) -> str | tuple[str, list[tuple[int, int]]]:
    """Render `messages` with the template. With `return_generation_spans`, also return the character spans
    ``(start, end)`` of the ``{% generation %}`` blocks' output."""
    template = compile_chat_template(chat_template)
    context = dict(
        messages=_normalize(messages),
        tools=_plain(tools),
        documents=_plain(documents),
        add_generation_prompt=add_generation_prompt,
        **_plain(variables),
    )
    if not return_generation_spans:
        return template.render(**context)
    tracker = _Tracker()
    token = _TRACKER.set(tracker)
    try:
        for chunk in template.generate(**context):
            tracker.chunks.append(chunk)
    finally:
        _TRACKER.reset(token)
    return "".join(tracker.chunks), tracker.spans


def assistant_char_spans(
    messages: list[Mapping[str, Any]],
    chat_template: str,
    *,
    add_generation_prompt: bool = False,
    text: str | None = None,
    **variables: Any,
) -> list[tuple[int, int]]:
    """Character spans of the assistant's text in the rendering of `messages` (see the module docstring):
    generation markers if the template has them, else prefix rendering. `text` is that rendering, if known."""
    if _GENERATION_TAG.search(chat_template):
        return render_chat_template(
            messages,
            chat_template,
            add_generation_prompt=add_generation_prompt,
            return_generation_spans=True,
            **variables,
        )[1]
    messages = list(messages)
    if text is None:
        text = render_chat_template(messages, chat_template, add_generation_prompt=add_generation_prompt, **variables)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render_chat_template(messages[:i], chat_template, add_generation_prompt=True, **variables)
        through = render_chat_template(messages[: i + 1], chat_template, **variables)
        if not through.startswith(before) or not text.startswith(through):
            raise ChatTemplateError(
                f"cannot locate assistant message {i} by prefix rendering: this template renders a conversation "
                "differently from its prefixes; mark assistant text with {% generation %}...{% endgeneration %}"
            )
        start, end = len(before), len(through.rstrip())
        if end > start:
            spans.append((start, end))
    return spans


def _token_lengths(tokenizer: Any, ids: list[int]) -> list[int]:
    return [len(tokenizer.decode_bytes([i])) for i in ids]


def spans_to_token_mask(tokenizer: Any, text: str, ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose bytes overlap a character span of `text`, else 0 (transformers' char_to_token rule)."""
    char_bytes = [0]
    for ch in text:
        char_bytes.append(char_bytes[-1] + len(ch.encode("utf-8", "surrogatepass")))
    byte_spans = sorted((char_bytes[s], char_bytes[e]) for s, e in spans if e > s)
    mask, pos, k = [], 0, 0
    if getattr(tokenizer, "add_space_prefix", False) and ids and not text.startswith(" "):
        pos = -int(tokenizer.token_to_bytes(ids[0])[:1] == b" ")  # a SentencePiece "▁" the text does not have
    for n in _token_lengths(tokenizer, ids):
        start, end = pos, pos + n
        while k < len(byte_spans) and byte_spans[k][1] <= start:
            k += 1
        mask.append(int(k < len(byte_spans) and byte_spans[k][0] < end and n > 0))
        pos = end
    if pos != char_bytes[-1]:
        raise ValueError(f"token bytes ({pos}) do not add up to the text's {char_bytes[-1]} UTF-8 bytes")
    return mask


def default_chat_template_for(tokenizer: Any) -> str | None:
    """`DEFAULT_CHAT_TEMPLATE` when the tokenizer has the ChatML special tokens, else None."""
    specials = getattr(tokenizer, "special_tokens", None) or {}
    return DEFAULT_CHAT_TEMPLATE if all(s in specials for s in CHATML_SPECIAL_TOKENS) else None


def apply_chat_template(
    tokenizer: Any,
    messages: Iterable[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    tokenize: bool = True,
    return_assistant_mask: bool = False,
    chat_template: str | None = None,
    **kwargs: Any,
) -> str | list[int] | ChatEncoding:
    """Render a conversation with the tokenizer's chat template (as transformers' ``apply_chat_template``).

    Returns the text (``tokenize=False``), the token ids, or with ``return_assistant_mask=True`` (transformers'
    name ``return_assistant_tokens_mask`` is accepted too) a `ChatEncoding` ``(input_ids, assistant_mask)``.
    The template is `chat_template`, else ``tokenizer.chat_template``, else `DEFAULT_CHAT_TEMPLATE` for a
    tokenizer with <|im_start|> / <|im_end|>. The special tokens ``bos_token``,
    ``eos_token``, ``pad_token``, ``unk_token`` of the tokenizer are template variables; `kwargs` add more (or
    override them). The text is encoded with all special tokens allowed, as transformers does.
    """
    return_assistant_mask = return_assistant_mask or kwargs.pop("return_assistant_tokens_mask", False)
    template = chat_template or getattr(tokenizer, "chat_template", None) or default_chat_template_for(tokenizer)
    if template is None:
        raise ValueError(
            "this tokenizer has no chat template: pass chat_template=..., set tokenizer.chat_template, or add the "
            "special tokens <|im_start|> and <|im_end|> to use lmforge's DEFAULT_CHAT_TEMPLATE"
        )
    if return_assistant_mask and not tokenize:
        raise ValueError("return_assistant_mask=True needs tokenize=True")
    messages = list(messages)
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    variables = {
        name: value
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if (value := getattr(tokenizer, name, None)) is not None
    }
    variables.update(kwargs)
    text = render_chat_template(messages, template, add_generation_prompt=add_generation_prompt, **variables)
    if not tokenize:
        return text
    ids = tokenizer.encode(text, allowed_special="all")
    if not return_assistant_mask:
        return ids
    spans = assistant_char_spans(
        messages, template, text=text, add_generation_prompt=add_generation_prompt, **variables
    )
    return ChatEncoding(ids, spans_to_token_mask(tokenizer, text, ids, spans))
