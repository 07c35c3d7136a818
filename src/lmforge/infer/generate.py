"""Generation with a contiguous KV cache, streaming text as it is decided: one prompt (`generate`) or several
with per-row parameters (`generate_batch`), both through the one decode loop of `infer.decode`.

    prefill:  one forward over the prompt fills the cache and gives the logits of token 1
    decode:   token t -> forward of that one token (reading the cache) -> logits of token t + 1

Each step the logits go through `sampling.process_rows` (penalties, temperature, top-k/p, min-p; per row, equal
to `sampling.process_logits` of that row alone) and `sampling.sample_rows` (argmax, or a draw with the row's own
seeded generator, equal to `sampling.next_token`). `generate` yields one `GenerationEvent` per token with the
text that token completed, so a caller can print as it goes. Text is held back in two places:

* the `IncrementalDecoder` keeps the bytes of an unfinished UTF-8 character until the next token ends it;
* the `StopStringBuffer` keeps the longest tail of the text that is a prefix of a stop string, so a stop
  string spread over several tokens is cut out before any of it is shown.

Generation ends at the first of: a stop token (the tokenizer's eos and eot tokens, unless `ignore_eos`, and
`params.stop_token_ids`; never shown as text), a stop string (the text ends just before it), `max_tokens`,
or the model's `max_seq_len` (`max_tokens` is cut to the room the prompt leaves in the context; the last event
then says "length"). Ids past the tokenizer's vocabulary (a model whose embedding is padded to a round
size) are never sampled. The last event carries `finish_reason` ("stop" or "length") and timings:
prefill tokens/s (prompt tokens over the time to the first token) and decode tokens/s (the other tokens
over the time after it; the caller's time between events is not counted).

The prompt is checked before the first step, with a `GenerationInputError` naming `prompt` (the CLI: `--prompt`):
token ids given as a list must be integers (not bools or floats), and every id, given or produced by the
tokenizer, must lie in the model's vocabulary (0 <= id < vocab_size); the error names the id and its position.
An empty prompt is refused, except that text which encodes to nothing still starts from the bos token when the
tokenizer adds one (`add_bos_token`): the prompt is then [bos]. A prompt that fills the context (max_seq_len tokens
or more, leaving no room for one new token) is refused rather than cut. Logits that are NaN or inf (a model whose
weights or activations overflow) stop generation with a `NonFiniteLogitsError` instead of a torch error.

With `compile=True` the forward passes go through `static_decode.StaticDecoder` instead (a preallocated
cache and one `torch.compile`d graph per decode step, as gpt-fast does): the same tokens, faster once
compiled; the first call per model and cache size pays the compilation.

`generate_batch` left-pads the prompts to one length and prefills them with an attention mask (as a padded batch
runs through `Transformer.hidden_states`); each row then stops on its own rules, and a finished row stops producing
events. Row i's tokens and text are those of `generate` for prompt i alone (the padded forward equals the
unpadded one up to float rounding, so only an exact near-tie could tell them apart).
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Iterator, Sequence

import torch

from lmforge.infer import static_decode
from lmforge.infer.decode import (
    DecodeBatch,
    Forward,
    GenerationEvent,
    GenerationStats,
    NonFiniteLogitsError,
    SequenceState,
    StopStringBuffer,
    decode,
    seeded_generator,
)
from lmforge.infer.kv_cache import KVCache
from lmforge.infer.sampling import GenerationInputError, SamplingParams
from lmforge.tokenizer.base import BaseTokenizer, IncrementalDecoder

__all__ = [
    "GenerationEvent",
    "GenerationStats",
    "NonFiniteLogitsError",
    "StopStringBuffer",
    "check_prompt",
    "encode_prompt",
    "eos_token_id",
    "generate",
    "generate_batch",
    "generate_text",
]


def eos_token_id(tokenizer: BaseTokenizer, attr: str = "eos_token") -> int | None:
    """The id of the tokenizer's eos token (`eos_token_id`, else `eos_token` looked up), or None;
    `attr="eot_token"` looks up the end-of-turn token the same way."""
    if (found := getattr(tokenizer, f"{attr}_id", None)) is not None:
        return found
    if (eos := getattr(tokenizer, attr, None)) is None:
        return None
    found = tokenizer.token_to_id(eos)
    return found if found is not None else tokenizer.token_to_id(eos.encode("utf-8"))


def encode_prompt(tokenizer: BaseTokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of `prompt`: ids pass through (checked to be integers); text is encoded with special tokens
    recognised (as a rendered chat template needs), after the bos token when the tokenizer says `add_bos_token`."""
    if not isinstance(prompt, str):
        return prompt_ids(prompt)
    ids = tokenizer.encode(prompt, allowed_special="all")
    bos = getattr(tokenizer, "bos_token", None)
    if getattr(tokenizer, "add_bos_token", False) and bos is not None:
        bos_id = tokenizer.token_to_id(bos)
        if bos_id is not None and ids[:1] != [bos_id]:
            ids.insert(0, bos_id)
    return ids


def prompt_ids(prompt: object) -> list[int]:
    """A prompt given as token ids, as a list of ints: any sequence of integers (ints, numpy or 0-d torch integers),
    not bools or floats, which `int()` would silently turn into ids."""
    if isinstance(prompt, bytes | bytearray) or not hasattr(prompt, "__iter__"):
        raise GenerationInputError("prompt", f"expected text or a sequence of token ids, got {type(prompt).__name__}")
    return [_token_id(item, position) for position, item in enumerate(prompt)]


def _token_id(item: object, position: int) -> int:
    if not isinstance(item, bool):
        with contextlib.suppress(TypeError):
            return operator.index(item)
    raise GenerationInputError("prompt", f"item {position} is {item!r}: token ids are integers")


def check_prompt(ids: list[int], vocab_size: int, max_seq_len: int, from_text: bool) -> None:
    """Refuse a prompt that is empty, leaves no room in the context, or holds an id outside the vocabulary."""
    if not ids:
        why = " (the text encodes to no tokens, and the tokenizer adds no bos token)" if from_text else ""
        raise GenerationInputError("prompt", f"is empty: give at least one token{why}")
    if len(ids) >= max_seq_len:
        raise GenerationInputError(
            "prompt", f"has {len(ids)} tokens; the model's context (max_seq_len) holds {max_seq_len}, "
            "and at least one must be left for the reply"
        )  # fmt: skip
    bad = next(((pos, i) for pos, i in enumerate(ids) if not 0 <= i < vocab_size), None)
    if bad is not None:
        source = "the tokenizer gave " if from_text else ""
        raise GenerationInputError(
            "prompt", f"{source}token id {bad[1]} at position {bad[0]}, outside the model's vocabulary "
            f"(0 <= id < vocab_size {vocab_size})"
        )  # fmt: skip


@torch.inference_mode()  # per call, not around the loop: a suspended generator must not leak the mode
def last_logits(model, ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) fp32 logits of the last position of `ids` (B, T); the head runs on that position only. The one
    place the decode loop calls the model (a left-padded prefill passes its `attention_mask`)."""
    if attention_mask is None:
        h = model.hidden_states(ids, cache=cache)
    else:
        h = model.hidden_states(ids, cache=cache, attention_mask=attention_mask)
    return model.logits(h[:, -1]).float()


def generate(
    model,
    tokenizer: BaseTokenizer,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    *,
    compile: bool = False,
    **overrides,
) -> Iterator[GenerationEvent]:
    """Stream the continuation of `prompt` (text or token ids), one event per generated token.

    `overrides` replace fields of `params` (e.g. `generate(model, tok, "Hi", max_tokens=8, temperature=0)`).
    `compile` decodes with a static cache and `torch.compile` (models `static_decode` cannot run fall
    back to the plain path). A bad prompt raises here, before the first step.
    """
    params = dataclasses.replace(params or SamplingParams(), **overrides)
    ids = encode_prompt(tokenizer, prompt)
    check_prompt(ids, model.config.vocab_size, model.config.max_seq_len, from_text=isinstance(prompt, str))
    device = next(model.parameters()).device
    row = sequence_state(model, tokenizer, ids, params, 0, device)
    forward, compiles = _forward_fn(model, len(ids) + row.budget, compile)
    batch = DecodeBatch([row], tokenizer.vocab_size)
    events = decode(forward, batch, torch.tensor([ids], device=device), compiles=compiles)
    return (event for _, event in events)  # errors raised above


def generate_batch(
    model,
    tokenizer: BaseTokenizer,
    prompts: Sequence[str | Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    **overrides,
) -> Iterator[tuple[int, GenerationEvent]]:
    """Decode several prompts in one batch, each with its own parameters (one `SamplingParams` for all, or one
    per prompt; `overrides` replace fields of each); yield (the prompt's index, event) as tokens come, each step's
    events in prompt order. Prompt i's events are those of `generate(model, tokenizer, prompts[i], params[i])`
    (the same tokens and text, a seeded row the same draws); the timings are the batch's. The prompts are
    left-padded to one length and run with an attention mask through one contiguous `KVCache`. Bad prompts raise
    here, naming `prompts[i]`.
    """
    if isinstance(prompts, str) or not prompts:
        raise GenerationInputError("prompts", "expected a non-empty list of prompts (text or token ids)")
    each = params if isinstance(params, list | tuple) else [params] * len(prompts)
    if len(each) != len(prompts):
        raise GenerationInputError("params", f"has {len(each)} SamplingParams for {len(prompts)} prompts")
    each = [dataclasses.replace(p or SamplingParams(), **overrides) for p in each]
    ids = [_checked_prompt(model, tokenizer, prompt, f"prompts[{i}]") for i, prompt in enumerate(prompts)]
    device = next(model.parameters()).device
    rows = [sequence_state(model, tokenizer, r, p, i, device) for i, (r, p) in enumerate(zip(ids, each, strict=True))]
    padded, mask = left_pad(ids, device)
    cache = KVCache(padded.shape[1] + max(row.budget for row in rows))
    forward = lambda step_ids, step_mask, _first: last_logits(model, step_ids, cache, step_mask)
    return decode(forward, DecodeBatch(rows, tokenizer.vocab_size), padded, mask)


def left_pad(ids: Sequence[list[int]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) the rows of `ids` padded on the left with id 0 to the longest, and the (B, T) attention mask (1 on
    real tokens), None when no row is padded."""
    width = max(len(row) for row in ids)
    padded = torch.tensor([[0] * (width - len(row)) + row for row in ids], device=device)
    if all(len(row) == width for row in ids):
        return padded, None
    lengths = torch.tensor([len(row) for row in ids], device=device)
    return padded, (torch.arange(width, device=device) >= width - lengths[:, None]).long()


def _checked_prompt(model, tokenizer: BaseTokenizer, prompt: str | Sequence[int], name: str) -> list[int]:
    """`prompt`'s ids, checked as `generate` checks them, an error naming `name` (its place in the batch)."""
    try:
        ids = encode_prompt(tokenizer, prompt)
        check_prompt(ids, model.config.vocab_size, model.config.max_seq_len, from_text=isinstance(prompt, str))
    except GenerationInputError as error:
        raise GenerationInputError(name, error.rule) from None
    return ids


def sequence_state(model, tokenizer: BaseTokenizer, ids: list[int], params: SamplingParams, slot: int,
                   device: torch.device) -> SequenceState:  # fmt: skip
    """The decode state of one prompt: its budget (max_tokens cut to the room left in the context) and its stop
    tokens (eos and eot unless `ignore_eos`, and `params.stop_token_ids`)."""
    budget = min(params.max_tokens, model.config.max_seq_len - len(ids))
    stop_ids = stop_token_ids(tokenizer, params.stop_token_ids, params.ignore_eos)
    generator = seeded_generator(params.seed, device)
    return SequenceState(slot, ids, params, budget, frozenset(stop_ids), IncrementalDecoder(tokenizer), generator)


def stop_token_ids(tokenizer: BaseTokenizer, extra: Sequence[int], ignore_eos: bool) -> set[int]:
    """The tokens that end a sequence: `extra`, and the tokenizer's eos and eot unless `ignore_eos`."""
    ids = set(extra)
    if not ignore_eos:
        ids |= {i for attr in ("eos_token", "eot_token") if (i := eos_token_id(tokenizer, attr)) is not None}
    return ids


def _forward_fn(model, n_tokens: int, compile: bool) -> tuple[Forward, bool]:
    """(forward, compiles) for one sequence (no mask): forward(new_ids (1, T), None, first) -> (1, V) fp32 logits
    of the last of `new_ids`, with a fresh cache when `first`: the plain `KVCache` path, or a (compiled)
    `StaticDecoder`; `compiles` when its first decode step will compile the graph."""
    if compile and static_decode.supports(model):
        decoder = static_decode.decoder_for(model, n_tokens, compile=True)
        return (lambda ids, _, first: decoder.prefill(ids) if first else decoder.step(ids)), not decoder.warm
    cache = KVCache(n_tokens)
    return (lambda ids, _, first: last_logits(model, ids, cache)), False


def generate_text(
    model, tokenizer: BaseTokenizer, prompt: str | Sequence[int], params: SamplingParams | None = None, **overrides
) -> str:
    """The whole continuation of `prompt` as one string (see `generate`)."""
    return "".join(event.text for event in generate(model, tokenizer, prompt, params, **overrides))
