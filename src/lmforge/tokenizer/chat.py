"""Chat templates: a conversation -> one string -> token ids, plus the mask of the tokens the assistant wrote.

A chat template is a Jinja2 program stored in ``tokenizer_config.json`` (key ``chat_template``). It receives
``messages`` (a list of ``{"role": ..., "content": ...}`` dicts), ``add_generation_prompt`` (append the header that
opens an assistant turn), ``tools``, ``documents``, the special tokens (``bos_token``, ``eos_token``, ...) and any
extra keyword arguments, and prints the prompt. For example the ChatML template used by lmforge models
(`DEFAULT_CHAT_TEMPLATE`) turns ``[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]``
into::

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n

Templates from the Hub are untrusted code: they run in the sandbox of `lmforge.tokenizer.template_sandbox`
(what a template may touch, and the `TemplateLimits` on what it may cost; change the defaults there).

**Assistant mask** (for SFT: the loss is taken on the tokens the model should learn to write). Two methods:

1. *Generation markers*: when the template wraps assistant text in ``{% generation %}...{% endgeneration %}``, the
   character span of each block's output is recorded during rendering (exactly transformers'
   ``return_assistant_tokens_mask``). A token is masked 1 when its bytes overlap a span.
2. *Prefix rendering* (templates without markers): for each assistant message i, the text up to where its reply
   starts is ``render(messages[:i], add_generation_prompt=True)`` and the text through the reply's end-of-turn is
   ``render(messages[:i+1])``; the assistant span is the difference: the reply's content and its end-of-turn
   tokens, minus trailing whitespace. This needs a template whose rendering of a conversation starts with its
   rendering of every shorter conversation (true of ChatML, Llama-3, Mistral-style templates); when it does not,
   a `ChatTemplateError` asks for generation markers instead.

   Rendering every prefix is quadratic in the conversation, so the spans are found in one pass: the render
   records the output length at the start of every loop iteration over a message (the last loop over it wins),
   which is ``len(render(messages[:k]))`` for a template that prints its messages in order; the generation prompt
   ``G`` is learnt from one prefix. Then ``start_i = B_i + len(G)`` and ``end_i`` is ``B_{i+1}`` minus trailing
   whitespace. The rule that checks it: every assistant turn must be preceded by exactly ``G`` in the text, and
   the exact prefix renders are compared with those positions for up to 10 assistant turns (all of them in a
   conversation with at most 10; else the first 3, the last 3 and 4 evenly spaced). When a check fails, a
   conversation of at most 32 messages falls back to rendering every prefix (the exact method, same result or
   same error as before); a longer one raises the `ChatTemplateError`. The cost is at most 22 renders.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from lmforge.tokenizer.template_sandbox import (
    DEFAULT_SOURCE,
    ChatTemplateError,
    ChatTemplateSecurityError,
    TemplateLimits,
    TemplateRenderer,
    compile_chat_template,
    plain_messages,
)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ChatEncoding",
    "ChatTemplateError",
    "ChatTemplateSecurityError",
    "TemplateLimits",
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


class ChatEncoding(NamedTuple):
    """Token ids of a rendered conversation and a 0/1 mask, same length, marking the assistant's tokens."""

    input_ids: list[int]
    assistant_mask: list[int]


def render_chat_template(
    messages: Iterable[Mapping[str, Any]],
    chat_template: str = DEFAULT_CHAT_TEMPLATE,
    *,
    add_generation_prompt: bool = False,
    tools: list | None = None,
    documents: list | None = None,
    return_generation_spans: bool = False,
    limits: TemplateLimits | None = None,
    source: str = DEFAULT_SOURCE,
    **variables: Any,
) -> str | tuple[str, list[tuple[int, int]]]:
    """Render `messages` with the template. With `return_generation_spans`, also return the character spans
    ``(start, end)`` of the ``{% generation %}`` blocks' output. `limits` (default `DEFAULT_LIMITS`) bound the
    render; `source` names the template in error messages (e.g. ``"tokenizer_config.json: chat_template"``)."""
    render = TemplateRenderer(chat_template, limits, source, dict(tools=tools, documents=documents, **variables))
    text, state = render(plain_messages(messages, source), add_generation_prompt)
    return (text, state.spans) if return_generation_spans else text


# ----------------------------------------------------------------------------------------------------------------
# Assistant spans by prefix rendering
# ----------------------------------------------------------------------------------------------------------------

_EXACT_PREFIX_MESSAGES = 32  # a conversation this short falls back to rendering every prefix when a check fails
_ALL_CHECKED_TURNS = 10  # this many assistant turns or fewer: all are checked against their exact prefixes


def _prefix_error(source: str, i: int | str) -> ChatTemplateError:
    return ChatTemplateError(
        f"{source}: cannot locate assistant message {i} by prefix rendering: this template renders a conversation "
        "differently from its prefixes; mark assistant text with {% generation %}...{% endgeneration %}"
    )


def _prefixes(render: TemplateRenderer, messages: list[dict], i: int) -> tuple[str, str]:
    """The rendering up to where assistant message i starts, and the rendering through its end of turn."""
    return render(messages[:i], True)[0], render(messages[: i + 1], False)[0]


def _exact_prefix_spans(render: TemplateRenderer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Every assistant message's span from its two prefix renders (quadratic in the conversation)."""
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before, through = _prefixes(render, messages, i)
        if not through.startswith(before) or not text.startswith(through):
            raise _prefix_error(render.source, i)
        start, end = len(before), len(through.rstrip())
        if end > start:
            spans.append((start, end))
    return spans


def _checked_turns(assistants: list[int]) -> list[int]:
    """The assistant turns compared with their exact prefixes: all of few, else the first 3, last 3, 4 between."""
    if len(assistants) <= _ALL_CHECKED_TURNS:
        return assistants
    middle = assistants[3:-3]
    return [*assistants[:3], *(middle[j * len(middle) // 5] for j in range(1, 5)), *assistants[-3:]]


def _rstrip_end(text: str, end: int) -> int:
    """``len(text[:end].rstrip())`` without copying the prefix."""
    while end > 0 and text[end - 1].isspace():
        end -= 1
    return end


def _tracked_prefix_spans(
    render: TemplateRenderer, messages: list[dict], add_generation_prompt: bool, text: str
) -> list[tuple[int, int]] | None:
    """The prefix-rendering spans from one marked render (see the module docstring), None when a check fails."""
    tracked, state = render(messages, add_generation_prompt, mark=True)
    assistants = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if tracked != text or not assistants:
        return None if tracked != text else []
    full = render(messages, False)[0] if add_generation_prompt else text
    bounds = {**state.marks, len(messages): len(full)}  # message k -> len(render(messages[:k])), as assumed
    needed = sorted({k for i in assistants for k in (i, i + 1)})
    if not text.startswith(full) or any(k not in bounds for k in needed):
        return None
    if any(bounds[a] > bounds[b] for a, b in itertools.pairwise(needed)):
        return None
    prompt = None  # the generation prompt: what render(messages[:i], add_generation_prompt=True) adds
    for i in _checked_turns(assistants):
        before, through = _prefixes(render, messages, i)
        if not (through.startswith(before) and text.startswith(through)):
            return None
        if len(through) != bounds[i + 1] or len(before) < bounds[i]:
            return None
        if prompt is not None and before[bounds[i] :] != prompt:
            return None
        prompt = before[bounds[i] :]
    spans = []
    for i in assistants:
        if not text.startswith(prompt, bounds[i]):
            return None
        start, end = bounds[i] + len(prompt), _rstrip_end(text, bounds[i + 1])
        if end > start:
            spans.append((start, end))
    return spans


def assistant_char_spans(
    messages: list[Mapping[str, Any]],
    chat_template: str,
    *,
    add_generation_prompt: bool = False,
    text: str | None = None,
    limits: TemplateLimits | None = None,
    source: str = DEFAULT_SOURCE,
    **variables: Any,
) -> list[tuple[int, int]]:
    """Character spans of the assistant's text in the rendering of `messages` (see the module docstring):
    generation markers if the template has them, else prefix rendering. `text` is that rendering, if known.
    `limits` bound the time of all renders together."""
    render = TemplateRenderer(chat_template, limits, source, variables)
    messages = plain_messages(messages, source)
    if _GENERATION_TAG.search(chat_template):
        return render(messages, add_generation_prompt)[1].spans
    if text is None:
        text = render(messages, add_generation_prompt)[0]
    spans = _tracked_prefix_spans(render, messages, add_generation_prompt, text)
    if spans is not None:
        return spans
    if len(messages) <= _EXACT_PREFIX_MESSAGES:
        return _exact_prefix_spans(render, messages, text)
    raise _prefix_error(source, "positions (checked on a sample of turns)")


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
        raise ChatTemplateError(
            f"cannot map the assistant mask to tokens: the token bytes ({pos}) do not add up to the rendered "
            f"text's {char_bytes[-1]} UTF-8 bytes (the tokenizer does not decode its own encoding back)"
        )
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
    *,
    limits: TemplateLimits | None = None,
    source: str = DEFAULT_SOURCE,
    **kwargs: Any,
) -> str | list[int] | ChatEncoding:
    """Render a conversation with the tokenizer's chat template (as transformers' ``apply_chat_template``).

    Returns the text (``tokenize=False``), the token ids, or with ``return_assistant_mask=True`` (transformers'
    name ``return_assistant_tokens_mask`` is accepted too) a `ChatEncoding` ``(input_ids, assistant_mask)``.
    The template is `chat_template`, else ``tokenizer.chat_template``, else `DEFAULT_CHAT_TEMPLATE` for a
    tokenizer with <|im_start|> / <|im_end|>. The special tokens ``bos_token``,
    ``eos_token``, ``pad_token``, ``unk_token`` of the tokenizer are template variables; `kwargs` add more (or
    override them). The text is encoded with all special tokens allowed, as transformers does. `limits` and
    `source` are those of `render_chat_template`.
    """
    return_assistant_mask = return_assistant_mask or kwargs.pop("return_assistant_tokens_mask", False)
    template = chat_template or getattr(tokenizer, "chat_template", None) or default_chat_template_for(tokenizer)
    if template is None:
        raise ChatTemplateError(
            "this tokenizer has no chat template: pass chat_template=..., set tokenizer.chat_template, or add the "
            "special tokens <|im_start|> and <|im_end|> to use lmforge's DEFAULT_CHAT_TEMPLATE"
        )
    if return_assistant_mask and not tokenize:
        raise ChatTemplateError("return_assistant_mask=True needs tokenize=True")
    messages = list(messages)
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    variables = {
        name: value
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if (value := getattr(tokenizer, name, None)) is not None
    }
    variables.update(kwargs, limits=limits, source=source)
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
