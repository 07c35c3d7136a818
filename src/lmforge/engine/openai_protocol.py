"""The OpenAI HTTP API as lmforge serves it: request models, their sampling parameters, and the JSON bodies sent back.

Requests (the fields of the OpenAI reference, plus vLLM's sampling extensions `top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `stop_token_ids`) are pydantic models in strict mode, so a string where a
number belongs, or `true` where an integer belongs, is a 400, not a silent conversion; an integral number written
as a float (`1.0`) is an integer, as JSON Schema (and so the published OpenAPI schema) counts it. Unknown fields
are ignored (clients send `user` and the like), except the few whose meaning lmforge would silently drop
(`UNSUPPORTED`), which are refused. Ranges are checked by the engine's `SamplingParams` (one rule per field, named
in the error).

Beam search (vLLM's extension): `use_beam_search: true` answers with the `n` best hypotheses of a beam search of
width `n` (`engine.async_beam_search`), best first, with `length_penalty` and `early_stopping` (transformers'
meanings), `max_tokens`, `ignore_eos`, `stop_token_ids` and `temperature` (beams ranked by the log-probabilities of
logits / T; 1, the default, and 0 rank by the model's own); seed does not matter; a field the search would
silently drop (top_p, top_k, min_p, the penalties, stop strings, logprobs, best_of > n) is refused with a 400
naming it (`beam_search_params`).

Responses are plain dicts in the shape the `openai` client parses:

    chat.completion        {id, object, created, model, choices: [{index, message, logprobs, finish_reason}], usage}
    chat.completion.chunk  {..., choices: [{index, delta: {role?, content}, logprobs, finish_reason}], usage?}
    text_completion        {..., choices: [{index, text, logprobs, finish_reason}], usage}

A streamed answer is a series of chunks, each carrying what is new since the last one (the engine's outputs are
cumulative: `Delta` keeps what was sent). Logprobs: the engine gives, per generated token, a dict token id ->
logprob holding the sampled token and the top `k`; chat reports them as `{token, logprob, bytes, top_logprobs}`
entries, completions as the legacy `{tokens, token_logprobs, top_logprobs, text_offset}` columns. JSON has no
infinity, so a logprob below `LOGPROB_FLOOR` (-inf: an id the sampler masked) is sent as the floor, as vLLM does.
"""

from __future__ import annotations

import itertools
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from lmforge.engine.beam_search import BeamSearchParams
from lmforge.engine.params import MAX_LOGPROBS

LOGPROB_FLOOR = -9999.0  # what a logprob of -inf (or NaN) is sent as: JSON cannot spell either
UNSUPPORTED = ("echo", "suffix", "logit_bias", "tools", "functions", "tool_choice", "response_format")
MAX_LENGTH_PENALTY = 10.0  # |length_penalty| above it would overflow the score's L ** length_penalty, for no use


def _integral(value: Any) -> Any:
    """An integral float (`2.0`) as the int it equals; anything else as it came (strict mode then judges it)."""
    return int(value) if type(value) is float and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]  # a JSON integer: 2 or 2.0, not true, "2" or 2.5


def _early_stopping(value: Any) -> Any:
    """true, false or "never" as they came; anything else one error naming the field (not one per union member)."""
    if value is True or value is False or value == "never":
        return value
    raise ValueError('must be true, false or "never"')


EarlyStopping = Annotated[bool | Literal["never"], BeforeValidator(_early_stopping)]


class OpenAIError(Exception):
    """A request the API refuses: `status` with the OpenAI error body {message, type, param, code}."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    """The fields chat and completions share: the model, sampling, stopping, streaming."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: Int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Int = 0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: Int = 1
    seed: Int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in UNSUPPORTED:
                if data.get(name) not in (None, False, "", [], {}):
                    raise OpenAIError(f"{name} is not supported by this server", param=name, code="unsupported")
        return data

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def engine_logprobs(self) -> int | None:
        """The engine's `logprobs`: None (off), else how many top tokens per position (0: the sampled one only)."""
        raise NotImplementedError

    def sampling_kwargs(self, max_tokens: int) -> dict[str, Any]:
        """The engine's `SamplingParams` keyword arguments for this request."""
        logprobs = self.engine_logprobs()
        return {
            "max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty, "repetition_penalty": self.repetition_penalty, "n": self.n,
            "seed": self.seed, "stop": [] if self.stop is None else self.stop,
            "stop_token_ids": self.stop_token_ids or [], "ignore_eos": self.ignore_eos, "logprobs": logprobs,
        }  # fmt: skip

    def beam_search_params(self, max_tokens: int) -> BeamSearchParams:
        """The beam search `use_beam_search` asks for: `n` beams, every one returned; a field that does not combine
        with it is a 400 naming it (see the module docstring). The fields both share are checked first, by the
        engine's `SamplingParams` (`sampling_kwargs`)."""
        conflict = next((name for name, used in self._beam_conflicts().items() if used), None)
        if conflict is not None:
            raise OpenAIError(f"{conflict} cannot be combined with use_beam_search", conflict, code="unsupported")
        if not (math.isfinite(self.length_penalty) and abs(self.length_penalty) <= MAX_LENGTH_PENALTY):
            raise OpenAIError(f"length_penalty={self.length_penalty}: must be in [-{MAX_LENGTH_PENALTY}, "
                              f"{MAX_LENGTH_PENALTY}]", "length_penalty")  # fmt: skip
        return BeamSearchParams(self.n, max_tokens, ignore_eos=self.ignore_eos, temperature=self.temperature,
                                length_penalty=self.length_penalty, early_stopping=self.early_stopping,
                                stop_token_ids=self.stop_token_ids or [])  # fmt: skip

    def _beam_conflicts(self) -> dict[str, bool]:
        """Per field that beam search would drop, whether this request sets it (to other than its default)."""
        dropped = ("top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")
        fields = type(self).model_fields
        return {name: getattr(self, name) != fields[name].default for name in dropped} | {"stop": bool(self.stop)}


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict[str, str]:
        """The message as a chat template reads it: {role, content} with the text parts joined."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        return {"role": self.role, "content": content}


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Int | None = None  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: Int | None = None

    def engine_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise OpenAIError(f"top_logprobs={self.top_logprobs}: must be in [0, {MAX_LOGPROBS}]", "top_logprobs")
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def _beam_conflicts(self) -> dict[str, bool]:
        return super()._beam_conflicts() | {"logprobs": self.logprobs, "top_logprobs": self.top_logprobs is not None}


Prompt = str | list[int]


class CompletionRequest(_Request):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    logprobs: Int | None = None
    best_of: Int | None = None

    def prompts(self) -> list[Prompt]:
        """The prompts, each a text or a list of token ids (a list of ints is one prompt)."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        if not self.prompt:
            raise OpenAIError("prompt must not be empty", "prompt")
        return list(self.prompt)

    def engine_logprobs(self) -> int | None:
        """The engine's `logprobs` (its range is checked by the engine's SamplingParams, under the same name)."""
        return self.logprobs

    def sampling_kwargs(self, max_tokens: int) -> dict[str, Any]:
        return super().sampling_kwargs(max_tokens) | {"best_of": self.best_of}

    def _beam_conflicts(self) -> dict[str, bool]:
        return super()._beam_conflicts() | {"logprobs": self.logprobs is not None,
                                            "best_of": self.best_of is not None and self.best_of > self.n}  # fmt: skip


# -- responses -------------------------------------------------------------------------------------------------


class _Reply(BaseModel):
    """A response body as the OpenAPI schema documents it (the routes build plain dicts of this shape)."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Reply):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Reply):
    """Every 4xx and 5xx: {"error": {message, type, param, code}}."""

    error: ErrorDetail


class Usage(_Reply):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Reply):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Reply):
    content: list[TokenLogprob]


class CompletionLogprobs(_Reply):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(_Reply):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Reply):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatDelta(_Reply):
    role: Literal["assistant"] = "assistant"  # in the first chunk of each choice only
    content: str


class ChatChunkChoice(_Reply):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class CompletionChoice(_Reply):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str


class CompletionChunkChoice(CompletionChoice):
    finish_reason: str | None


class _Envelope(_Reply):
    id: str
    created: int
    model: str


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(_Envelope):
    """One SSE event of a streamed chat answer; with stream_options.include_usage, `usage` is null in each chunk
    and set in a last chunk with no choices."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Completion(_Envelope):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Envelope):
    """One SSE event of a streamed completion (`usage` as in ChatCompletionChunk)."""

    object: Literal["text_completion"]
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ModelCard(_Reply):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    parent: str | None = None  # a LoRA adapter's base model (None: a base model)


class ModelList(_Reply):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Reply):
    status: Literal["ok"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def envelope(id: str, object: str, model: str, choices: list[dict], usage: dict | None = None) -> dict[str, Any]:
    body = {"id": id, "object": object, "created": int(time.time()), "model": model, "choices": choices}
    return body | ({"usage": usage} if usage is not None else {})


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def _token_text(tokenizer: Any, id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_to_bytes(id)
    return raw.decode("utf-8", "replace"), list(raw)


def _json_logprob(logprob: float) -> float:
    """`logprob` as JSON can carry it: -inf and NaN become `LOGPROB_FLOOR`."""
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    ranked = sorted(entry.items(), key=lambda item: -_json_logprob(item[1]))[:k]
    return [(id, _json_logprob(lp)) for id, lp in ranked]


def _chat_entry(tokenizer: Any, id: int, logprob: float) -> dict:
    text, raw = _token_text(tokenizer, id)
    return {"token": text, "logprob": _json_logprob(logprob), "bytes": raw}


def chat_logprobs(tokenizer: Any, ids: Sequence[int], entries: Sequence[dict[int, float]], k: int) -> dict:
    """OpenAI chat `logprobs`: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    content = []
    for id, entry in zip(ids, entries, strict=True):
        top = [_chat_entry(tokenizer, t, lp) for t, lp in _top(entry, k)]
        content.append(_chat_entry(tokenizer, id, entry[id]) | {"top_logprobs": top})
    return {"content": content}


def completion_logprobs(
    tokenizer: Any, ids: Sequence[int], entries: Sequence[dict[int, float]], k: int, offset: int
) -> dict:
    """Legacy completions `logprobs` columns; `offset` is the text length before these tokens (text_offset)."""
    tokens = [_token_text(tokenizer, id)[0] for id in ids]
    starts = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset))[: len(tokens)]
    return {
        "tokens": tokens,
        "token_logprobs": [_json_logprob(entry[id]) for id, entry in zip(ids, entries, strict=True)],
        "top_logprobs": [{_token_text(tokenizer, t)[0]: lp for t, lp in _top(entry, k)} for entry in entries],
        "text_offset": starts,
    }


def usage_of(outputs: Any) -> dict:
    """The usage of final RequestOutputs: their prompts' tokens and every sample's generated tokens."""
    outputs = list(outputs)
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    return usage(prompt, sum(len(c.token_ids) for o in outputs for c in o.outputs))


class ChatFormat:
    """chat.completion bodies and chunks."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, tokenizer: Any, model: str, logprobs: int | None) -> None:
        self.tokenizer, self.model, self.logprobs = tokenizer, model, logprobs

    def _logprobs(self, output: Any, tokens: slice) -> dict | None:
        if self.logprobs is None or output.logprobs is None:
            return None
        return chat_logprobs(self.tokenizer, output.token_ids[tokens], output.logprobs[tokens], self.logprobs)

    def choice(self, index: int, output: Any) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": output.text},
                "logprobs": self._logprobs(output, slice(None)), "finish_reason": output.finish_reason}  # fmt: skip

    def chunk_choice(self, index: int, output: Any, text: str, tokens: slice, first: bool) -> dict:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": index, "delta": delta, "logprobs": self._logprobs(output, tokens),
                "finish_reason": output.finish_reason}  # fmt: skip


class CompletionFormat(ChatFormat):
    """text_completion bodies and chunks."""

    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl"

    def _logprobs(self, output: Any, tokens: slice, offset: int = 0) -> dict | None:
        if self.logprobs is None or output.logprobs is None:
            return None
        ids, entries = output.token_ids[tokens], output.logprobs[tokens]
        return completion_logprobs(self.tokenizer, ids, entries, self.logprobs, offset)

    def choice(self, index: int, output: Any) -> dict:
        return {"index": index, "text": output.text, "logprobs": self._logprobs(output, slice(None)),
                "finish_reason": output.finish_reason}  # fmt: skip

    def chunk_choice(self, index: int, output: Any, text: str, tokens: slice, first: bool) -> dict:
        offset = len(output.text) - len(text)
        return {"index": index, "text": text, "logprobs": self._logprobs(output, tokens, offset),
                "finish_reason": output.finish_reason}  # fmt: skip


@dataclass
class Delta:
    """What of one cumulative output has been sent: the text length and the token count."""

    chars: int = 0
    tokens: int = 0
    finished: bool = False

    def advance(self, text: str, token_ids: Sequence[int], finish_reason: str | None) -> tuple[str, slice] | None:
        """The new text and the slice of new tokens since the last call (None when nothing new and not finished)."""
        if self.finished:
            return None
        new_text, new_tokens = text[self.chars :], slice(self.tokens, len(token_ids))
        self.chars, self.tokens, self.finished = len(text), len(token_ids), finish_reason is not None
        if not new_text and new_tokens.start == new_tokens.stop and not self.finished:
            return None
        return new_text, new_tokens
