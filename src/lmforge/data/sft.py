"""Supervised fine-tuning data: JSONL records -> (ids, loss mask) examples -> packed or padded batches.

Records. `read_sft_jsonl(path)` reads one JSON object per line (blank lines are ignored), of one of two kinds:

    chat   {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str, ...}, ...]}
    pair   {"prompt": str, "completion": str}

Other keys of the object (an "id", metadata) and of a message (a "name") are kept and otherwise ignored; an
object with both kinds' keys is an error. A conversation needs at least one assistant message (it is what the
model learns). Each bad line raises `SFTDataError` named ``file:line: what is wrong`` (1-based line): invalid
JSON or UTF-8, not an object, neither kind, a message that is not an object or lacks a string role or a string
content, an unknown role, no assistant message. An empty file is an error. With ``skip_invalid=True`` bad lines
are skipped and counted by reason (`SFTRecords.reasons`) instead; only a file left with nothing raises.

Examples. `encode_example(tokenizer, record, max_len)` gives (ids, loss_mask), two lists of equal length n:

  * chat: ``apply_chat_template(tokenizer, messages, return_assistant_mask=True)`` with the tokenizer's template,
    or lmforge's ChatML `DEFAULT_CHAT_TEMPLATE` for a tokenizer with <|im_start|> / <|im_end|>; the mask is the
    template's assistant mask (every assistant turn: its content and end-of-turn tokens). A tokenizer with no
    template at all is an error for chat records: there is no plain-text fallback, since a model fine-tuned on
    a format no template describes cannot be prompted the same way by the engine or the server;
  * pair, tokenizer with a template: the chat [user: prompt, assistant: completion];
  * pair, no template: ``[bos if add_bos_token] + encode_ordinary(prompt) + encode_ordinary(completion)
    + [end]``, the mask 1 on the completion's tokens and on end, the end-of-text id (eos_token, else eot_token,
    else a special token of `lmforge.data.shards.EOT_NAMES`) when the tokenizer has one. The texts are
    encoded as ordinary text (a "<|im_end|>" inside a completion is not the special token).

An example longer than max_len tokens, or one that leaves no target (the shift below drops a mask bit at
position 0), raises with the record's file and line, or is skipped and counted by `encode_examples` with
``skip_invalid=True`` (reasons "too_long", "no_target"; "template" for a conversation the template refuses).

Targets. An example of n tokens fills n positions of a row (the alignment of loader.py, whose targets are the
window shifted by one):

    input_ids[t] = ids[t],   targets[t] = ids[t+1] if loss_mask[t+1] else -100,   targets[n-1] = -100

(`shifted_targets`): position t is trained to predict token t+1 when the assistant wrote it. The last position
predicts nothing, so an example's first token is never the target of anything before it.

Batches (`SFTLoader`). Rows of seq_len T tokens, each a dict entry of (B/W, T) int64 tensors input_ids, targets,
position_ids, doc_ids, exactly what ``LanguageModelObjective(document_mask=True)`` consumes:

  * packing=True: the examples are packed once into R rows by best-fit decreasing (longest first, each into the
    row with the least room that fits it, else a new row; TRL's default "bfd" strategy): deterministic, and
    independent of the seed. Within a row, example k (k = 0, 1, ...) has doc_ids k and position_ids 0 .. n_k-1;
    the padding after the last example is one more document (doc_ids = the row's example count, positions
    from 0) with input pad_id and targets -100, as loader.py pads. Examples never see each other under the
    document mask, and targets never cross examples (last paragraph);
  * packing=False: one example per row (R = N examples), right-padded the same way.

Epochs. Epoch e visits the R rows once in the order ``numpy.random.default_rng([seed, e]).permutation(R)``
(no global RNG; ``shuffle=False``: in order), B rows a step, so every epoch has the same

    S = ceil(R / B) steps:   step s is epoch e = s // S, and global row j = (s mod S) B + i of the batch is
    the permutation's entry j, or an empty row (all padding, no target) for j >= R (the last step of an epoch).

Packing once and shuffling rows (not re-packing a shuffled example order every epoch) keeps S fixed, so a CLI's
``--epochs E`` is ``E * len(loader)`` steps and a schedule knows its length; under the document mask which
examples share a row changes nothing but the batch they land in. A batch is a pure function of (seed, step):
resumed runs are bit-exact. Rank r of W gets rows [r B/W, (r+1) B/W) of the global batch (loader.py's rule), so
the ranks' batches concatenated equal the one-process batch. `epoch_batches(e)` yields epoch e's S batches (with
``shuffle=False``: the validation pass, in order). Tokens are held once, as flat int32 arrays.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.loader import IGNORE_INDEX
from lmforge.data.shards import eot_id
from lmforge.tokenizer.chat import (
    ChatTemplateError,
    ChatTemplateSecurityError,
    apply_chat_template,
    default_chat_template_for,
)
from lmforge.utils.errors import LmforgeError

__all__ = [
    "ROLES",
    "SFTDataError",
    "SFTExample",
    "SFTExamples",
    "SFTLoader",
    "SFTRecord",
    "SFTRecords",
    "encode_example",
    "encode_examples",
    "end_token_id",
    "load_sft",
    "pack_best_fit",
    "pad_token_id",
    "parse_record",
    "read_sft_jsonl",
    "shifted_targets",
]

ROLES = ("system", "user", "assistant", "tool")
_KEPT_ERRORS = 10  # messages of skipped lines kept in SFTRecords.errors
_MASK64 = (1 << 64) - 1


class SFTDataError(LmforgeError):
    """A fine-tuning data file (or one of its lines) is wrong; the message names ``file:line``. `reason` is the
    key it is counted under when skipped (see `SFTRecords.reasons`), None for errors that cannot be skipped."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTRecord:
    """One line of a JSONL file: a conversation (`messages`) or a (`prompt`, `completion`) pair."""

    source: str  # the file
    line: int  # 1-based line in it
    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    completion: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def kind(self) -> str:
        return "chat" if self.messages is not None else "pair"


@dataclass
class _Skips:
    """Skipped lines: how many, how many for each reason, and the first few messages."""

    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, error: SFTDataError) -> None:
        self.skipped += 1
        key = error.reason or "other"
        self.reasons[key] = self.reasons.get(key, 0) + 1
        if len(self.errors) < _KEPT_ERRORS:
            self.errors.append(str(error))

    def merge(self, other: _Skips) -> None:
        self.skipped += other.skipped
        self.reasons = dict(Counter(self.reasons) + Counter(other.reasons))
        self.errors = (self.errors + other.errors)[:_KEPT_ERRORS]


@dataclass
class SFTRecords(_Skips):
    """The records of a file, and the lines skipped (``skip_invalid=True``) by reason."""

    records: list[SFTRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[SFTRecord]:
        return iter(self.records)

    def __getitem__(self, i: int) -> SFTRecord:
        return self.records[i]


def _kind_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _parse_messages(messages: Any, where: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(f"{where}: 'messages' must be a non-empty array of messages", "message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise SFTDataError(f"{where}: messages[{i}] is a {_kind_name(message)}, expected an object", "message")
        for key in ("role", "content"):
            if key not in message:
                raise SFTDataError(f"{where}: messages[{i}] has no {key!r}", "message")
            if not isinstance(message[key], str):
                got = _kind_name(message[key])
                raise SFTDataError(f"{where}: messages[{i}] {key!r} is a {got}, expected a string", "message")
        if message["role"] not in ROLES:
            raise SFTDataError(
                f"{where}: messages[{i}] has unknown role {message['role']!r} (expected one of {', '.join(ROLES)})",
                "role",
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise SFTDataError(f"{where}: the conversation has no assistant message (nothing to learn)", "no_assistant")
    return tuple(dict(m) for m in messages)


def parse_record(obj: Any, source: str, line: int) -> SFTRecord:
    """One decoded JSON line -> `SFTRecord`; `SFTDataError` naming ``source:line`` when it is neither kind."""
    where = f"{source}:{line}"
    if not isinstance(obj, dict):
        raise SFTDataError(f"{where}: expected a JSON object, got a {_kind_name(obj)}", "not_object")
    has_chat, has_pair = "messages" in obj, "prompt" in obj or "completion" in obj
    if has_chat and has_pair:
        raise SFTDataError(f"{where}: has both 'messages' and 'prompt'/'completion'; give one kind", "format")
    if has_chat:
        return SFTRecord(source, line, messages=_parse_messages(obj["messages"], where))
    if not has_pair:
        keys = ", ".join(map(repr, obj)) or "none"
        raise SFTDataError(
            f"{where}: expected 'messages' (a chat) or 'prompt' and 'completion' (a pair), found keys {keys}", "format"
        )
    for key, other in (("prompt", "completion"), ("completion", "prompt")):
        if key not in obj:
            raise SFTDataError(f"{where}: has {other!r} but no {key!r}", "format")
        if not isinstance(obj[key], str):
            raise SFTDataError(f"{where}: {key!r} is a {_kind_name(obj[key])}, expected a string", "format")
    return SFTRecord(source, line, prompt=obj["prompt"], completion=obj["completion"])


def _decode_line(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SFTDataError(f"{where}: not valid UTF-8 (byte {e.start + 1})", "invalid_json") from e
    except json.JSONDecodeError as e:
        raise SFTDataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})", "invalid_json") from e


def read_sft_jsonl(path: str | Path, *, skip_invalid: bool = False) -> SFTRecords:
    """The records of a JSONL file (module docstring); with `skip_invalid`, bad lines are counted, not raised.

    Raises `SFTDataError` for a bad line (``file:line: ...``), an empty file, or (skipping) a file with no valid
    line; `OSError` when the file cannot be read."""
    path = Path(path)
    out = SFTRecords()
    lines = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            lines += 1
            try:
                out.records.append(parse_record(_decode_line(raw, f"{path}:{number}"), str(path), number))
            except SFTDataError as e:
                if not skip_invalid:
                    raise
                out.add(e)
    if lines == 0:
        raise SFTDataError(f"{path}: no examples (the file is empty)")
    if not out.records:
        raise SFTDataError(f"{path}: no valid examples: all {lines} lines were skipped ({_reasons(out.reasons)})")
    return out


def _reasons(reasons: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))


# ----------------------------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------------------------


def _token_id(tokenizer: Any, token: str | None) -> int | None:
    """The id of a token given by its text (a special token, or an ordinary one in either spelling), or None."""
    if token is None:
        return None
    specials = getattr(tokenizer, "special_tokens", None) or {}
    if token in specials:
        return specials[token]
    found = tokenizer.token_to_id(token)
    return found if found is not None else tokenizer.token_to_id(token.encode("utf-8"))


def end_token_id(tokenizer: Any) -> int | None:
    """The id that ends a templateless pair: eos_token, else eot_token, else an EOT_NAMES special; or None."""
    for attr in ("eos_token", "eot_token"):
        if (found := _token_id(tokenizer, getattr(tokenizer, attr, None))) is not None:
            return found
    return eot_id(tokenizer)


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads rows: pad_token, else the end-of-text id (`end_token_id`), else 0."""
    for found in (_token_id(tokenizer, getattr(tokenizer, "pad_token", None)), end_token_id(tokenizer)):
        if found is not None:
            return found
    return 0


def _chat_template(tokenizer: Any) -> str | None:
    return getattr(tokenizer, "chat_template", None) or default_chat_template_for(tokenizer)


def _encode_chat(tokenizer: Any, template: str, messages: Sequence[Mapping[str, Any]], where: str) -> tuple:
    try:
        enc = apply_chat_template(tokenizer, list(messages), return_assistant_mask=True, chat_template=template)
    except ChatTemplateSecurityError:
        raise
    except ChatTemplateError as e:
        raise SFTDataError(f"{where}: {e}", "template") from e
    return list(enc.input_ids), list(enc.assistant_mask)


def encode_example(tokenizer: Any, record: SFTRecord, max_len: int) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of one record (module docstring); `SFTDataError` naming the record's ``file:line`` when
    it is longer than `max_len` tokens, leaves no target, or its template refuses it."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    template = _chat_template(tokenizer)
    if record.messages is not None:
        if template is None:
            raise SFTDataError(
                f"{record.where}: a chat record needs a chat template, and this tokenizer has none: set its "
                "chat_template, or give it the special tokens <|im_start|> and <|im_end|> (lmforge's ChatML)"
            )
        ids, mask = _encode_chat(tokenizer, template, record.messages, record.where)
    elif template is not None:
        messages = [{"role": "user", "content": record.prompt}, {"role": "assistant", "content": record.completion}]
        ids, mask = _encode_chat(tokenizer, template, messages, record.where)
    else:
        bos = _token_id(tokenizer, getattr(tokenizer, "bos_token", None))
        ids = [bos] if getattr(tokenizer, "add_bos_token", False) and bos is not None else []
        ids += tokenizer.encode_ordinary(record.prompt)
        prompt_len = len(ids)
        end = end_token_id(tokenizer)
        ids += tokenizer.encode_ordinary(record.completion) + ([] if end is None else [end])
        mask = [0] * prompt_len + [1] * (len(ids) - prompt_len)
    if len(ids) > max_len:
        raise SFTDataError(f"{record.where}: {len(ids)} tokens, longer than max_len {max_len}", "too_long")
    if not any(mask[1:]):
        raise SFTDataError(f"{record.where}: no token to learn (the loss mask is empty after the shift)", "no_target")
    return ids, mask


@dataclass(frozen=True, eq=False)
class SFTExample:
    """One encoded example: ids and loss mask (equal-length int arrays), and the line it came from."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    source: str = "<examples>"
    line: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_ids", np.asarray(self.input_ids, dtype=np.int64))
        object.__setattr__(self, "loss_mask", np.asarray(self.loss_mask, dtype=np.int64))
        if self.input_ids.ndim != 1 or self.input_ids.shape != self.loss_mask.shape:
            raise ValueError(f"{self.where}: input_ids and loss_mask must be 1-D and of one length, got "
                             f"{self.input_ids.shape} and {self.loss_mask.shape}")  # fmt: skip

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SFTExamples(_Skips):
    """Encoded examples, and the lines skipped (reading and encoding together) by reason."""

    examples: list[SFTExample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[SFTExample]:
        return iter(self.examples)

    def __getitem__(self, i: int) -> SFTExample:
        return self.examples[i]


def encode_examples(
    tokenizer: Any, records: SFTRecords | Sequence[SFTRecord], max_len: int, *, skip_invalid: bool = False
) -> SFTExamples:
    """`encode_example` over records; with `skip_invalid`, bad examples are counted (with the records' own
    skips, when `records` is an `SFTRecords`) and `SFTDataError` comes only when none is left."""
    out = SFTExamples()
    if isinstance(records, SFTRecords):
        out.merge(records)
    for record in records:
        try:
            ids, mask = encode_example(tokenizer, record, max_len)
        except SFTDataError as e:
            if not skip_invalid or e.reason is None:
                raise
            out.add(e)
            continue
        out.examples.append(SFTExample(ids, mask, record.source, record.line))
    if not out.examples:
        sources = sorted({r.source for r in records}) or ["no records"]
        raise SFTDataError(f"{', '.join(sources)}: no valid examples ({_reasons(out.reasons) or 'none given'})")
    return out


def load_sft(path: str | Path, tokenizer: Any, max_len: int, *, skip_invalid: bool = False) -> SFTExamples:
    """`read_sft_jsonl` then `encode_examples`: a file's examples, skipped lines counted together."""
    return encode_examples(tokenizer, read_sft_jsonl(path, skip_invalid=skip_invalid), max_len,
                           skip_invalid=skip_invalid)  # fmt: skip


def shifted_targets(input_ids: Any, loss_mask: Any) -> Any:
    """targets[t] = input_ids[t+1] if loss_mask[t+1] else -100, and -100 at the last position, along the last
    axis. Tensors in give an int64 tensor; anything else (lists, arrays) an int64 numpy array."""
    if isinstance(input_ids, torch.Tensor):
        ids, mask = input_ids.long(), torch.as_tensor(loss_mask, device=input_ids.device).bool()
        if ids.shape != mask.shape:
            raise ValueError(f"input_ids {tuple(ids.shape)} and loss_mask {tuple(mask.shape)} differ in shape")
        targets = torch.full_like(ids, IGNORE_INDEX)
        targets[..., :-1] = torch.where(mask[..., 1:], ids[..., 1:], IGNORE_INDEX)
        return targets
    ids, mask = np.asarray(input_ids, dtype=np.int64), np.asarray(loss_mask).astype(bool)
    if ids.shape != mask.shape:
        raise ValueError(f"input_ids {ids.shape} and loss_mask {mask.shape} differ in shape")
    targets = np.full_like(ids, IGNORE_INDEX)
    targets[..., :-1] = np.where(mask[..., 1:], ids[..., 1:], IGNORE_INDEX)
    return targets


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: example indices grouped into rows of at most `capacity` tokens. Longest first (ties by
    index), each goes into the open row with the least room that still fits it, else opens a new row."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"lengths must lie in [1, {capacity}]")
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> rows with that much room (a stack)
    rooms: list[int] = []  # the keys of by_room, sorted
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(rooms, n)
        if k == len(rooms):
            row, room = len(rows), capacity
            rows.append([])
        else:
            room = rooms[k]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room], rooms[k]
        rows[row].append(i)
        if (room := room - n) > 0:
            if room not in by_room:
                bisect.insort(rooms, room)
                by_room[room] = []
            by_room[room].append(row)
    return rows


class SFTLoader:
    """Packed (or padded) SFT batches as a pure function of (seed, step); see the module docstring."""

    def __init__(
        self,
        examples: Sequence[SFTExample | tuple[Sequence[int], Sequence[int]]],
        batch_size: int,
        seq_len: int,
        *,
        packing: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int = 0,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must split evenly over world_size {world_size} (rank {rank})")
        examples = [e if isinstance(e, SFTExample) else SFTExample(*e, line=i + 1) for i, e in enumerate(examples)]
        if not examples:
            raise SFTDataError("no SFT examples to batch")
        for e in examples:
            if not 1 <= len(e) <= seq_len:
                raise SFTDataError(f"{e.where}: {len(e)} tokens do not fit seq_len {seq_len} (encode the examples "
                                   f"with max_len <= seq_len)")  # fmt: skip
        self.batch_size, self.seq_len, self.packing, self.shuffle = batch_size, seq_len, packing, shuffle
        self.seed, self.pad_id = seed, pad_id
        per_rank = batch_size // world_size
        self.global_rows = np.arange(rank * per_rank, (rank + 1) * per_rank, dtype=np.int64)
        lengths = [len(e) for e in examples]
        self.offsets = np.cumsum([0, *lengths], dtype=np.int64)  # example i = tokens[o_i : o_{i+1}]
        self.tokens = np.concatenate([e.input_ids for e in examples]).astype(np.int32)
        self.targets = np.concatenate([shifted_targets(e.input_ids, e.loss_mask) for e in examples]).astype(np.int32)
        rows = pack_best_fit(lengths, seq_len) if packing else [[i] for i in range(len(examples))]
        self.row_offsets = np.cumsum([0, *map(len, rows)], dtype=np.int64)  # row j = row_examples[r_j : r_{j+1}]
        self.row_examples = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=len(examples))
        self.rows_per_epoch = len(rows)
        self.steps_per_epoch = -(-self.rows_per_epoch // batch_size)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its row order), the last one used

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def n_examples(self) -> int:
        return len(self.offsets) - 1

    @property
    def fill(self) -> float:
        """The fraction of an epoch's row positions that hold example tokens (1 - padding)."""
        return len(self.tokens) / (self.rows_per_epoch * self.seq_len)

    def epoch_of(self, step: int) -> tuple[int, int]:
        """(epoch, step within it) of a global step."""
        return divmod(step, self.steps_per_epoch)

    def row_order(self, epoch: int) -> np.ndarray:
        """The rows of `epoch` in the order it visits them."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed & _MASK64, epoch]).permutation(self.rows_per_epoch)
            else:
                order = np.arange(self.rows_per_epoch)
            self._order = (epoch, order)
        return self._order[1]

    def _fill_row(self, out: dict[str, np.ndarray], b: int, row: int | None) -> None:
        """Write packed row `row` (None: an empty row) into line b of the batch arrays."""
        at, k = 0, 0
        if row is not None:
            for k, i in enumerate(self.row_examples[self.row_offsets[row] : self.row_offsets[row + 1]].tolist()):
                s, e = self.offsets[i], self.offsets[i + 1]
                n = e - s
                out["input_ids"][b, at : at + n] = self.tokens[s:e]
                out["targets"][b, at : at + n] = self.targets[s:e]
                out["position_ids"][b, at : at + n] = np.arange(n)
                out["doc_ids"][b, at : at + n] = k
                at += n
            k += 1
        out["position_ids"][b, at:] = np.arange(self.seq_len - at)  # padding: one more document
        out["doc_ids"][b, at:] = k

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's slice of the global batch at `step`: (batch_size / world_size, seq_len) int64 tensors."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, k = self.epoch_of(step)
        order = self.row_order(epoch)
        shape = (len(self.global_rows), self.seq_len)
        out = {
            "input_ids": np.full(shape, self.pad_id, dtype=np.int64),
            "targets": np.full(shape, IGNORE_INDEX, dtype=np.int64),
            "position_ids": np.zeros(shape, dtype=np.int64),
            "doc_ids": np.zeros(shape, dtype=np.int64),
        }
        for b, j in enumerate((k * self.batch_size + self.global_rows).tolist()):
            self._fill_row(out, b, int(order[j]) if j < self.rows_per_epoch else None)
        return {name: torch.from_numpy(a) for name, a in out.items()}

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """batch(start), batch(start + 1), ... up to `stop` (forever when None)."""
        steps = itertools.count(start) if stop is None else range(start, stop)
        return (self.batch(s) for s in steps)

    def epoch_batches(self, epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The steps_per_epoch batches of `epoch`, once (with shuffle=False: every row in order)."""
        return self.batches(epoch * self.steps_per_epoch, (epoch + 1) * self.steps_per_epoch)
