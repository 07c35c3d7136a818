"""Chat templates against transformers' `apply_chat_template`: rendering, token ids, assistant masks, the sandbox.

The oracle is `transformers.PreTrainedTokenizerFast` wrapping the same `tokenizers` vocabulary that lmforge loads,
given the same template and messages.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import jinja2
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.tokenizer.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ChatEncoding,
    ChatTemplateError,
    TemplateLimits,
    apply_chat_template,
    assistant_char_spans,
    render_chat_template,
)
from lmforge.tokenizer.formats import load_tokenizer, save_tokenizer

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<s>",
    "</s>",
]

# Meta-Llama-3-8B-Instruct's template, verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# The same, with {% generation %} around what the assistant writes.
LLAMA3_GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# SmolLM2-Instruct's template, verbatim (ChatML with a default system prompt).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral-style: system message folded into the first user turn, roles checked with raise_exception; written over
# several lines to exercise trim_blocks / lstrip_blocks and whitespace control.
MISTRAL_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""
# Tools, tojson (with characters Jinja's own filter would HTML-escape), namespace, loop controls, dict().
TOOLS_TEMPLATE = """\
{% set ns = namespace(turns=0) %}
{% if tools %}
<|im_start|>system
Tools: {{ tools | tojson }}
Options: {{ dict(a=1, b='<&>') | tojson(indent=2, sort_keys=True) }}<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message.role == 'tool' %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
<|im_start|>{{ message.role }}
{% if message.tool_calls is defined %}{{ message.tool_calls | tojson }}{% endif %}{{ message.content }}<|im_end|>
{% endfor %}
turns={{ ns.turns }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CONVERSATION = [
    {"role": "system", "content": "You are terse & <precise>."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "  And in French? 🇫🇷 «quatre»\n"},
    {"role": "assistant", "content": " Quatre — c'est tout.\n"},
]
NO_SYSTEM = CONVERSATION[1:]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "Paris"}}]},
    {"role": "tool", "content": "18C"},
    {"role": "assistant", "content": "It's 18°C.", "reasoning": None},
]
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather <now> & 'later'"}}]


@pytest.fixture(scope="module")
def hf_tokenizer():
    text = (DATA / "hamlet_gut.txt").read_text(encoding="utf-8")[:100_000] if DATA.is_dir() else "hello world " * 100
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator([text], trainer)
    return hf


@pytest.fixture(scope="module")
def pair(hf_tokenizer, tmp_path_factory):
    """(lmforge tokenizer, transformers tokenizer) over the same vocabulary."""
    path = tmp_path_factory.mktemp("chat") / "tokenizer.json"
    hf_tokenizer.save(str(path))
    ours = load_tokenizer(path)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer)
    return ours, theirs


def configure(pair, template: str, bos: str | None = None, eos: str | None = None):
    ours, theirs = pair
    ours.chat_template, ours.bos_token, ours.eos_token = template, bos, eos
    theirs.chat_template = template
    theirs.bos_token, theirs.eos_token = bos, eos
    return ours, theirs


CASES = [
    ("default", DEFAULT_CHAT_TEMPLATE, None, None, CONVERSATION),
    ("llama3", LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", CONVERSATION),
    ("smollm2", SMOLLM2_TEMPLATE, None, "<|im_end|>", NO_SYSTEM),
    ("smollm2-system", SMOLLM2_TEMPLATE, None, "<|im_end|>", CONVERSATION),
    ("mistral", MISTRAL_TEMPLATE, "<s>", "</s>", CONVERSATION),
    ("mistral-no-system", MISTRAL_TEMPLATE, "<s>", "</s>", NO_SYSTEM),
    ("tools", TOOLS_TEMPLATE, None, None, TOOL_CONVERSATION),
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize(("name", "template", "bos", "eos", "messages"), CASES, ids=[c[0] for c in CASES])
def test_rendering_and_ids_match_transformers(pair, name, template, bos, eos, messages, add_generation_prompt):
    ours, theirs = configure(pair, template, bos, eos)
    kwargs = {"tools": TOOLS} if name == "tools" else {}
    text = apply_chat_template(ours, messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)
    expected = theirs.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
    )
    assert text == expected
    ids = apply_chat_template(ours, messages, add_generation_prompt=add_generation_prompt, **kwargs)
    expected_ids = theirs.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True, **kwargs
    )["input_ids"]
    assert ids == expected_ids
    if name == "tools":
        assert "\"Weather <now> & 'later'\"" in text  # not HTML-escaped, as transformers' tojson


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize(
    ("template", "bos", "messages"),
    [
        (DEFAULT_CHAT_TEMPLATE, None, CONVERSATION),
        (LLAMA3_GENERATION_TEMPLATE, "<|begin_of_text|>", CONVERSATION),
        (SMOLLM2_GENERATION_TEMPLATE, None, NO_SYSTEM),
    ],
    ids=["default", "llama3", "smollm2"],
)
def test_generation_mask_matches_transformers(pair, template, bos, messages, add_generation_prompt):
    ours, theirs = configure(pair, template, bos)
    enc = apply_chat_template(ours, messages, add_generation_prompt=add_generation_prompt, return_assistant_mask=True)
    ref = theirs.apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert isinstance(enc, ChatEncoding)
    assert enc.input_ids == ref["input_ids"]
    assert enc.assistant_mask == ref["assistant_masks"]
    assert 0 < sum(enc.assistant_mask) < len(enc.assistant_mask)
    masked = ours.decode([i for i, m in zip(enc.input_ids, enc.assistant_mask, strict=True) if m])
    assert masked == "".join(m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant") or (
        masked == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    )


@pytest.mark.parametrize(
    ("plain", "marked", "bos", "messages"),
    [
        (LLAMA3_TEMPLATE, LLAMA3_GENERATION_TEMPLATE, "<|begin_of_text|>", CONVERSATION),
        (SMOLLM2_TEMPLATE, SMOLLM2_GENERATION_TEMPLATE, None, NO_SYSTEM),
    ],
    ids=["llama3", "smollm2"],
)
def test_prefix_mask_equals_generation_markers(pair, plain, marked, bos, messages):
    """Templates without {% generation %}: the prefix-rendering mask equals transformers' mask for the same
    template with the markers written in by hand around each reply and its end-of-turn token."""
    ours, theirs = configure(pair, plain, bos)
    enc = apply_chat_template(ours, messages, return_assistant_mask=True)
    theirs.chat_template = marked
    ref = theirs.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert enc.input_ids == ref["input_ids"]
    assert enc.assistant_mask == ref["assistant_masks"]


def test_prefix_mask_refuses_templates_that_rewrite_history(pair):
    # Renders only the last assistant reply in full: a conversation's rendering does not extend its prefixes'.
    template = (
        "{% for m in messages %}{{ m['role'] }}: {% if loop.last or m['role'] != 'assistant' %}{{ m['content'] }}"
        "{% else %}...{% endif %}\n{% endfor %}"
    )
    ours, _ = configure(pair, template)
    with pytest.raises(ChatTemplateError, match="generation"):
        apply_chat_template(ours, NO_SYSTEM, return_assistant_mask=True)


def test_raise_exception_is_a_clear_error(pair):
    ours, theirs = configure(pair, MISTRAL_TEMPLATE, "<s>", "</s>")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate") as info:
        apply_chat_template(ours, bad)
    assert isinstance(info.value, ValueError)
    with pytest.raises(jinja2.TemplateError, match="Conversation roles must alternate"):
        theirs.apply_chat_template(bad, tokenize=False)


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages.append({'role': 'x'}) }}",  # lists passed in are immutable
        "{% set d = messages[0] %}{{ d.update({'role': 'x'}) }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ raise_exception.__globals__['__builtins__'] }}",
        "{% set ns = namespace(_private=1) %}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    ],
)
def test_sandbox_blocks_unsafe_access(template):
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template([{"role": "user", "content": "hi"}], template)


@pytest.mark.parametrize("attr", ["__globals__", "__code__", "__class__", "func_globals", "gi_frame"])
def test_sandbox_hides_unsafe_attributes(attr):
    """Reading an unsafe attribute gives an undefined value that prints as nothing (jinja2's sandbox rule)."""
    template = f"[{{{{ raise_exception.{attr} }}}}][{{{{ strftime_now.{attr} }}}}]"
    assert render_chat_template([], template) == "[][]"


def test_template_helpers():
    year = str(datetime.datetime.now().year)
    assert render_chat_template([], "{{ strftime_now('%Y') }}") in (year, str(int(year) + 1))
    assert render_chat_template([], "{{ bos_token }}|{{ x }}", bos_token="<s>", x=3) == "<s>|3"
    assert render_chat_template([{"role": "u", "content": "<a&b>"}], "{{ messages | tojson }}") == json.dumps(
        [{"role": "u", "content": "<a&b>"}], ensure_ascii=False
    )
    text, spans = render_chat_template(
        [{"role": "assistant", "content": "yes"}], DEFAULT_CHAT_TEMPLATE, return_generation_spans=True
    )
    assert [text[s:e] for s, e in spans] == ["yes<|im_end|>"]
    assert assistant_char_spans([{"role": "assistant", "content": "yes"}], DEFAULT_CHAT_TEMPLATE) == spans


def test_default_template_and_errors(pair):
    ours, _ = pair
    ours.chat_template = None
    assert apply_chat_template(ours, NO_SYSTEM[:1], add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="empty conversation"):
        apply_chat_template(ours, [])
    alias = apply_chat_template(ours, NO_SYSTEM, return_assistant_tokens_mask=True)  # transformers' name
    assert alias == apply_chat_template(ours, NO_SYSTEM, return_assistant_mask=True)
    assert isinstance(alias, ChatEncoding)
    with pytest.raises(ValueError, match="tokenize=True"):
        apply_chat_template(ours, NO_SYSTEM, tokenize=False, return_assistant_mask=True)


def test_saved_tokenizer_loads_in_transformers(pair, tmp_path):
    """save_tokenizer's tokenizer_config.json gives AutoTokenizer the same template and special tokens."""
    ours, _ = configure(pair, LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>")
    ours.pad_token, ours.model_max_length = "<|endoftext|>", 4096
    save_tokenizer(ours, tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == ("<|begin_of_text|>", "<|eot_id|>", "<|endoftext|>")
    assert auto.model_max_length == 4096
    ref = auto.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert apply_chat_template(load_tokenizer(tmp_path), CONVERSATION, add_generation_prompt=True) == ref["input_ids"]


# ----------------------------------------------------------------------------------------------------------------
# Prefix-rendering masks in linear time, against the prefix-rendering rule computed by definition
# ----------------------------------------------------------------------------------------------------------------


def prefix_rendering_oracle(messages, template, add_generation_prompt=False, **variables):
    """The rule by definition (lmforge's method before it was made linear): two renders per assistant reply."""
    text = render_chat_template(messages, template, add_generation_prompt=add_generation_prompt, **variables)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat_template(messages[:i], template, add_generation_prompt=True, **variables)
        through = render_chat_template(messages[: i + 1], template, **variables)
        if not through.startswith(before) or not text.startswith(through):
            raise ChatTemplateError("not prefix-extending")
        if len(through.rstrip()) > len(before):
            spans.append((len(before), len(through.rstrip())))
    return spans


PLAIN_CHATML = DEFAULT_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# Loops that look ahead (loop.last, loop.revindex, loop.nextitem) or scan the messages before printing them.
LOOKAHEAD_TEMPLATE = (
    "{% for m in messages %}{% if loop.last %}[{{ loop.revindex }}]{% endif %}<{{ m.role }}>{{ m.content }}</s>"
    "{% if loop.nextitem is defined %}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
PRESCAN_TEMPLATE = (
    "{% set ns = namespace(users=0) %}{% for m in messages[::-1] %}{% if m.role == 'user' %}"
    "{% set ns.users = ns.users + 1 %}{% endif %}{% endfor %}{{ ns.users }} questions\n"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HISTORY_REWRITE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if loop.last or m['role'] != 'assistant' %}{{ m['content'] }}"
    "{% else %}...{% endif %}\n{% endfor %}"
)
# A system message, then 40 turns (long enough that only a sample of turns is checked by exact renders).
LONG = [CONVERSATION[0]] + [
    turn
    for k in range(40)
    for turn in ({"role": "user", "content": f" question {k} "}, {"role": "assistant", "content": f" answer {k}\n"})
]
PREFIX_TEMPLATES = {
    "llama3": (LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>"}),
    "smollm2": (SMOLLM2_TEMPLATE, {}),
    "mistral": (MISTRAL_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}),
    "tools": (TOOLS_TEMPLATE, {}),
    "chatml": (PLAIN_CHATML, {}),
    "lookahead": (LOOKAHEAD_TEMPLATE, {}),
    "prescan": (PRESCAN_TEMPLATE, {}),
    "history-rewrite": (HISTORY_REWRITE_TEMPLATE, {}),
}
CONVERSATIONS = {"short": CONVERSATION, "short-no-system": NO_SYSTEM, "long": LONG, "long-no-system": LONG[1:]}


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS.values()), ids=list(CONVERSATIONS))
@pytest.mark.parametrize(("template", "variables"), list(PREFIX_TEMPLATES.values()), ids=list(PREFIX_TEMPLATES))
def test_linear_prefix_spans_equal_the_prefix_rendering_rule(template, variables, conversation, add_generation_prompt):
    """Same spans as rendering every prefix, or the same ChatTemplateError when the rule does not apply."""
    try:
        expected = prefix_rendering_oracle(conversation, template, add_generation_prompt, **variables)
    except ChatTemplateError:
        with pytest.raises(ChatTemplateError, match="generation"):
            assistant_char_spans(conversation, template, add_generation_prompt=add_generation_prompt, **variables)
        return
    spans = assistant_char_spans(conversation, template, add_generation_prompt=add_generation_prompt, **variables)
    assert spans == expected
    assert len(spans) == sum(m["role"] == "assistant" and bool(m["content"].strip()) for m in conversation)


def turns(n: int) -> list[dict]:
    return [
        turn
        for k in range(n)
        for turn in ({"role": "user", "content": f"Question {k}?"}, {"role": "assistant", "content": f"Answer {k}."})
    ]


def test_3000_turn_prefix_mask_renders_in_seconds(pair):
    """Linear: a 3000-turn conversation's mask by prefix rendering (the definition would take ~18000 renders)."""
    ours, _ = configure(pair, SMOLLM2_TEMPLATE)
    conversation = turns(3000)
    start = time.perf_counter()
    enc = apply_chat_template(ours, conversation, return_assistant_mask=True)
    elapsed = time.perf_counter() - start
    masked = ours.decode([i for i, m in zip(enc.input_ids, enc.assistant_mask, strict=True) if m])
    assert masked == "".join(m["content"] + "<|im_end|>" for m in conversation if m["role"] == "assistant")
    assert elapsed < 10, f"{elapsed:.1f} s"


def test_100k_generation_blocks_render_in_seconds():
    """Linear: each {% generation %} span starts at a running output length, not at a re-summed one."""
    conversation = [{"role": "assistant", "content": f"a{k}"} for k in range(100_000)]
    start = time.perf_counter()
    text, spans = render_chat_template(conversation, return_generation_spans=True)
    elapsed = time.perf_counter() - start
    assert [text[s:e] for s, e in spans] == [f"a{k}<|im_end|>" for k in range(100_000)]
    assert elapsed < 10, f"{elapsed:.1f} s"


# ----------------------------------------------------------------------------------------------------------------
# Errors: one ChatTemplateError line naming the template's source
# ----------------------------------------------------------------------------------------------------------------

SOURCE = "tokenizer_config.json: chat_template"


@pytest.mark.parametrize(
    ("template", "messages", "expected"),
    [
        ("{% for m in messages %}\n{{ m.content }\n{% endfor %}", NO_SYSTEM, "syntax error on line 2"),
        ("{% if %}", NO_SYSTEM, "syntax error on line 1"),
        ("{{ messages[0].nope.deeper }}", NO_SYSTEM, "UndefinedError"),
        ("{{ 1 / 0 }}", NO_SYSTEM, "ZeroDivisionError"),
        ("{{ messages[0].content + 1 }}", NO_SYSTEM, "TypeError"),
        ("{{ raise_exception('no\nsystem') }}", NO_SYSTEM, "refused the conversation: no system"),
        (["not", "a", "string"], NO_SYSTEM, "must be a string, got list"),
        ("{{ messages }}", [{"role": "user", "content": "a"}, ["user", "b"]], r"messages\[1\] must be a dict"),
    ],
)
def test_template_failures_are_one_line_chat_template_errors(template, messages, expected):
    with pytest.raises(ChatTemplateError, match=expected) as info:
        render_chat_template(messages, template, source=SOURCE)
    assert str(info.value).startswith(SOURCE + ": ") and "\n" not in str(info.value)
    assert isinstance(info.value, (jinja2.TemplateError, ValueError))


def test_apply_chat_template_passes_limits_and_source(pair):
    ours, _ = configure(pair, "{% for m in messages %}{{ m.content * 100 }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match=r"^model.gguf: tokenizer.chat_template: .*output_chars=50;"):
        apply_chat_template(
            ours, NO_SYSTEM, limits=TemplateLimits(output_chars=50), source="model.gguf: tokenizer.chat_template"
        )
    assert apply_chat_template(ours, NO_SYSTEM[:1], tokenize=False) == "What is 2+2?" * 100
