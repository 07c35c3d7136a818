"""SFT data: JSONL records and their errors, (ids, loss mask) examples, shifted targets, packed and padded batches.

Oracles: hand-computed ids and masks on a byte-level tokenizer (id = byte value, specials above 255), hand-built
packed rows, invariants (each row once per epoch, ranks concatenated = one process), and the Transformer: a
packed batch under the document mask has the loss of its examples run alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.sft import (
    SFTDataError,
    SFTExample,
    SFTLoader,
    SFTRecord,
    encode_example,
    encode_examples,
    end_token_id,
    load_sft,
    pack_best_fit,
    pad_token_id,
    read_sft_jsonl,
    shifted_targets,
)
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.pretokenize import GPT2_PATTERN
from lmforge.train.objective import LanguageModelObjective

IM_START, IM_END, EOT = 256, 257, 256
NL = 10


def byte_tokenizer(specials: dict[str, int] | None = None) -> Tokenizer:
    """Byte-level BPE without merges: ids 0-255 are the bytes, then the given special tokens."""
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], GPT2_PATTERN, specials or {})


def chatml_tokenizer() -> Tokenizer:
    return byte_tokenizer({"<|im_start|>": IM_START, "<|im_end|>": IM_END})  # lmforge's ChatML template applies


def b(text: str) -> list[int]:
    return list(text.encode())


def write_jsonl(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def test_reads_both_kinds_with_their_lines_and_ignores_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [
        json.dumps(chat(("system", "be brief"), ("user", "hi"), ("assistant", "yo")) | {"id": 7}),
        "",
        "   ",
        json.dumps({"prompt": "2+2=", "completion": "4"}),
    ])  # fmt: skip
    records = read_sft_jsonl(path)
    assert len(records) == 2 and records.skipped == 0 and records.reasons == {}
    first, second = records
    assert (first.kind, first.line, first.source) == ("chat", 1, str(path))
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant"]
    assert (second.kind, second.line, second.prompt, second.completion) == ("pair", 4, "2+2=", "4")


GOOD = json.dumps(chat(("user", "hi"), ("assistant", "yo")))
ASSISTANT = {"role": "assistant", "content": "ok"}
BAD_LINES = [  # (line 3 of the file, reason it is counted under, words the message must hold)
    ("{not json", "invalid_json", "invalid JSON"),
    (b'{"prompt": "\xff", "completion": "x"}', "invalid_json", "UTF-8"),
    ("[1, 2]", "not_object", "expected a JSON object, got a array"),
    ('"text"', "not_object", "got a string"),
    (json.dumps({"text": "x"}), "format", "'messages'"),
    (json.dumps({"prompt": "a"}), "format", "no 'completion'"),
    (json.dumps({"completion": "a"}), "format", "no 'prompt'"),
    (json.dumps({"prompt": 1, "completion": "b"}), "format", "'prompt' is a number"),
    (json.dumps({**chat(("user", "a"), ("assistant", "b")), "prompt": "a", "completion": "b"}), "format", "both"),
    (json.dumps({"messages": "hi"}), "message", "non-empty array"),
    (json.dumps({"messages": []}), "message", "non-empty array"),
    (json.dumps({"messages": ["hi", ASSISTANT]}), "message", "messages[0] is a string"),
    (json.dumps({"messages": [{"role": "user"}, ASSISTANT]}), "message", "messages[0] has no 'content'"),
    (json.dumps({"messages": [ASSISTANT, {"content": "x"}]}), "message", "messages[1] has no 'role'"),
    (json.dumps({"messages": [{"role": "user", "content": None}, ASSISTANT]}), "message", "'content' is a null"),
    (json.dumps({"messages": [{"role": "user", "content": ["x"]}, ASSISTANT]}), "message", "is a array"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}, ASSISTANT]}), "role", "unknown role 'bot'"),
    (json.dumps(chat(("system", "s"), ("user", "x"))), "no_assistant", "no assistant message"),
]


@pytest.mark.parametrize(("line", "reason", "words"), BAD_LINES)
def test_a_bad_line_names_file_and_line_or_is_skipped_and_counted(tmp_path, line, reason, words):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(SFTDataError) as raised:
        read_sft_jsonl(path)
    message = str(raised.value)
    assert message.startswith(f"{path}:3: ") and words in message, message
    records = read_sft_jsonl(path, skip_invalid=True)
    assert [r.line for r in records] == [1, 4]
    assert records.skipped == 1 and records.reasons == {reason: 1}
    assert records.errors == [message]


def test_empty_files_and_files_with_nothing_valid(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    for skip in (False, True):
        with pytest.raises(SFTDataError, match=r"empty\.jsonl: no examples \(the file is empty\)"):
            read_sft_jsonl(empty, skip_invalid=skip)
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{", "[]", json.dumps({"x": 1})])
    with pytest.raises(SFTDataError, match=r"bad\.jsonl:1: invalid JSON"):
        read_sft_jsonl(bad)
    with pytest.raises(SFTDataError, match=r"bad\.jsonl: no valid examples: all 3 lines were skipped "
                                           r"\(format: 1, invalid_json: 1, not_object: 1\)"):  # fmt: skip
        read_sft_jsonl(bad, skip_invalid=True)
    with pytest.raises(FileNotFoundError):
        read_sft_jsonl(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------------


def test_chat_with_the_chatml_default_masks_the_assistant_content_and_its_im_end():
    tok = chatml_tokenizer()
    record = SFTRecord("t.jsonl", 1, messages=tuple(chat(("user", "hi"), ("assistant", "yo"))["messages"]))
    ids, mask = encode_example(tok, record, max_len=64)
    # <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n
    prompt = [IM_START, *b("user\nhi"), IM_END, NL, IM_START, *b("assistant\n")]
    assert ids == [*prompt, *b("yo"), IM_END, NL]
    assert mask == [0] * len(prompt) + [1, 1, 1, 0]
    targets = shifted_targets(ids, mask)
    assert targets.tolist() == [-100] * (len(prompt) - 1) + [ord("y"), ord("o"), IM_END, -100, -100]


def test_multi_turn_chat_learns_every_assistant_turn():
    tok = chatml_tokenizer()
    record = SFTRecord("t.jsonl", 1, messages=tuple(chat(("user", "a"), ("assistant", "b"), ("user", "c"),
                                                         ("assistant", "d"))["messages"]))  # fmt: skip
    ids, mask = encode_example(tok, record, max_len=64)
    assert [t for t, m in zip(ids, mask, strict=True) if m] == [ord("b"), IM_END, ord("d"), IM_END]


def test_a_pair_with_a_template_is_the_user_assistant_chat():
    tok = chatml_tokenizer()
    pair = encode_example(tok, SFTRecord("t.jsonl", 1, prompt="hi", completion="yo"), max_len=64)
    as_chat = encode_example(
        tok, SFTRecord("t.jsonl", 1, messages=tuple(chat(("user", "hi"), ("assistant", "yo"))["messages"])), 64
    )
    assert pair == as_chat


def test_a_pair_without_template_masks_exactly_the_completion_and_the_end_token():
    tok = byte_tokenizer({"<|endoftext|>": EOT})
    assert end_token_id(tok) == EOT and pad_token_id(tok) == EOT
    ids, mask = encode_example(tok, SFTRecord("t.jsonl", 1, prompt="ab", completion="cd"), max_len=8)
    assert ids == [*b("abcd"), EOT] and mask == [0, 0, 1, 1, 1]
    assert shifted_targets(ids, mask).tolist() == [-100, ord("c"), ord("d"), EOT, -100]
    # the completion's text "<|endoftext|>" is ordinary text, not the special token
    ids, _ = encode_example(tok, SFTRecord("t.jsonl", 1, prompt="", completion="<|endoftext|>"), max_len=64)
    assert ids == [*b("<|endoftext|>"), EOT]
    plain = byte_tokenizer()  # no end token at all: nothing appended
    assert end_token_id(plain) is None and pad_token_id(plain) == 0
    assert encode_example(plain, SFTRecord("t.jsonl", 1, prompt="ab", completion="cd"), 8) == (
        [97, 98, 99, 100],
        [0, 0, 1, 1],
    )
    plain.eos_token, plain.pad_token = "z", "!"  # eos / pad given as ordinary tokens by their text
    assert end_token_id(plain) == ord("z") and pad_token_id(plain) == ord("!")


def test_a_chat_record_needs_a_template():
    record = SFTRecord("chats.jsonl", 5, messages=tuple(chat(("user", "a"), ("assistant", "b"))["messages"]))
    with pytest.raises(SFTDataError, match=r"chats\.jsonl:5: a chat record needs a chat template") as raised:
        encode_example(byte_tokenizer({"<|endoftext|>": EOT}), record, 64)
    assert raised.value.reason is None  # a setup error: never skipped
    with pytest.raises(SFTDataError, match="needs a chat template"):
        encode_examples(byte_tokenizer(), [record], 64, skip_invalid=True)


def test_too_long_and_targetless_examples_name_their_line_or_are_skipped(tmp_path):
    tok = byte_tokenizer({"<|endoftext|>": EOT})
    path = write_jsonl(tmp_path / "sft.jsonl", [
        json.dumps({"prompt": "ab", "completion": "cd"}),  # 5 tokens
        json.dumps({"prompt": "abcdef", "completion": "gh"}),  # 9 tokens
        "{oops",
        json.dumps({"prompt": "a", "completion": "b"}),
    ])  # fmt: skip
    with pytest.raises(SFTDataError, match=r"sft\.jsonl:2: 9 tokens, longer than max_len 8"):
        encode_examples(tok, read_sft_jsonl(path, skip_invalid=True), max_len=8)
    examples = load_sft(path, tok, max_len=8, skip_invalid=True)
    assert [(e.line, e.input_ids.tolist(), e.loss_mask.tolist()) for e in examples] == [
        (1, [*b("abcd"), EOT], [0, 0, 1, 1, 1]),
        (4, [*b("ab"), EOT], [0, 1, 1]),
    ]
    assert examples.skipped == 2 and examples.reasons == {"invalid_json": 1, "too_long": 1}
    assert examples.errors[0].startswith(f"{path}:3: invalid JSON") and examples.errors[1].startswith(f"{path}:2:")
    # a completion that leaves nothing after the shift: its only masked token is the first one
    notarget = SFTRecord("x.jsonl", 9, prompt="", completion="a")
    with pytest.raises(SFTDataError, match=r"x\.jsonl:9: no token to learn"):
        encode_example(byte_tokenizer(), notarget, 8)
    with pytest.raises(SFTDataError, match=r"x\.jsonl: no valid examples \(no_target: 1\)"):
        encode_examples(byte_tokenizer(), [notarget], 8, skip_invalid=True)


def test_a_conversation_the_template_refuses_is_counted_under_template():
    tok = chatml_tokenizer()
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                         "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip
    refused = SFTRecord("c.jsonl", 2, messages=tuple(chat(("system", "s"), ("assistant", "x"))["messages"]))
    fine = SFTRecord("c.jsonl", 3, messages=tuple(chat(("user", "u"), ("assistant", "x"))["messages"]))
    with pytest.raises(SFTDataError, match=r"c\.jsonl:2: .*no system role"):
        encode_example(tok, refused, 64)
    out = encode_examples(tok, [refused, fine], 64, skip_invalid=True)
    assert [e.line for e in out] == [3] and out.reasons == {"template": 1}
    # prefix rendering (no generation markers): the assistant's content and its <|im_end|>
    assert [t for t, m in zip(out[0].input_ids, out[0].loss_mask, strict=True) if m] == [ord("x"), IM_END]


def test_shifted_targets_on_tensors_and_arrays():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1]])
    expected = [[6, -100, 8, -100], [2, 3, 4, -100]]
    assert shifted_targets(ids, mask).tolist() == expected and shifted_targets(ids, mask).dtype == torch.int64
    assert shifted_targets(ids.numpy(), mask.numpy().astype(bool)).tolist() == expected
    with pytest.raises(ValueError, match="differ in shape"):
        shifted_targets([1, 2], [1])


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------

A = ([1, 2, 3], [0, 1, 1])
B = ([4, 5], [0, 1])
PAD = 99


def test_packing_two_examples_in_one_row():
    loader = SFTLoader([A, B], batch_size=1, seq_len=6, shuffle=False, pad_id=PAD)
    assert (loader.rows_per_epoch, loader.steps_per_epoch, len(loader)) == (1, 1, 1)
    batch = loader.batch(0)
    assert set(batch) == {"input_ids", "targets", "position_ids", "doc_ids"}
    assert all(t.dtype == torch.int64 and t.shape == (1, 6) for t in batch.values())
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, PAD]]
    # token 3 (the last of A) predicts nothing: 4 starts B and is not a target of A
    assert batch["targets"].tolist() == [[2, 3, -100, 5, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 1, 1, 2]]  # the padding is one more document
    assert loader.fill == pytest.approx(5 / 6)


def test_padding_mode_one_example_per_row():
    loader = SFTLoader([A, B], batch_size=2, seq_len=4, packing=False, shuffle=False, pad_id=PAD)
    batch = loader.batch(0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, PAD], [4, 5, PAD, PAD]]
    assert batch["targets"].tolist() == [[2, 3, -100, -100], [5, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]


def test_best_fit_decreasing_by_hand_and_its_invariants():
    # 5 opens a row (room 1), 4 a second (room 2), 3 a third (room 3); 2 takes the tightest room, 2; 1 takes 1
    assert pack_best_fit([5, 4, 3, 2, 1], 6) == [[0, 4], [1, 3], [2]]
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 33, size=300)
    rows = pack_best_fit(lengths, 32)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[row]) <= 32 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 32) * 1.1  # near the lower bound on rows


def examples(n: int, seed: int = 0) -> list[SFTExample]:
    """n examples of random lengths 2..9: ids start with 1000 + index, the rest masked."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(2, 10))
        ids = [1000 + i, *rng.integers(0, 500, size=length - 1).tolist()]
        out.append(SFTExample(ids, [0] + [1] * (length - 1), "e.jsonl", i + 1))
    return out


def first_tokens(batch: dict[str, torch.Tensor]) -> list[int]:
    """Example indices in a batch (each example's first token is 1000 + its index)."""
    ids = batch["input_ids"][batch["position_ids"] == 0]
    return [i - 1000 for i in ids.tolist() if i >= 1000]


@pytest.mark.parametrize("packing", [True, False])
def test_every_epoch_visits_every_example_once_in_its_own_order(packing):
    data = examples(23)
    loader = SFTLoader(data, batch_size=4, seq_len=16, packing=packing, seed=3, pad_id=0)
    rows = loader.rows_per_epoch
    assert rows == 23 if not packing else rows < 23
    assert loader.steps_per_epoch == len(loader) == -(-rows // 4)
    orders = []
    for epoch in range(3):
        seen = [i for batch in loader.epoch_batches(epoch) for i in first_tokens(batch)]
        assert sorted(seen) == list(range(23))
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2]
    last = loader.batch(loader.steps_per_epoch - 1)  # rows past R in the epoch's last step are empty
    empty = loader.steps_per_epoch * 4 - rows
    if empty:
        assert (last["targets"][-empty:] == -100).all() and (last["input_ids"][-empty:] == 0).all()
    assert loader.epoch_of(2 * loader.steps_per_epoch + 1) == (2, 1)
    in_order = SFTLoader(data, batch_size=4, seq_len=16, packing=packing, shuffle=False)
    assert [i for bt in in_order.epoch_batches(0) for i in first_tokens(bt)] == [
        i for bt in in_order.epoch_batches(5) for i in first_tokens(bt)
    ]
    if not packing:
        assert [i for bt in in_order.epoch_batches() for i in first_tokens(bt)] == list(range(23))


def test_targets_match_each_examples_shifted_targets_inside_rows():
    data = examples(30, seed=1)
    loader = SFTLoader(data, batch_size=2, seq_len=20, seed=0)
    for batch in loader.epoch_batches(0):
        for row in range(2):
            doc, pos = batch["doc_ids"][row], batch["position_ids"][row]
            for start in torch.nonzero(pos == 0).flatten().tolist():
                ids = batch["input_ids"][row, start:]
                if ids[0] < 1000:
                    continue  # padding
                ex = data[int(ids[0]) - 1000]
                n = len(ex)
                assert ids[:n].tolist() == ex.input_ids.tolist()
                assert (
                    batch["targets"][row, start : start + n].tolist()
                    == shifted_targets(ex.input_ids, ex.loss_mask).tolist()
                )
                assert (doc[start : start + n] == doc[start]).all() and pos[start : start + n].tolist() == list(
                    range(n)
                )


@pytest.mark.parametrize("packing", [True, False])
def test_batches_are_a_function_of_seed_and_step_and_ranks_concatenate(packing):
    data = examples(40)
    one = SFTLoader(data, batch_size=4, seq_len=16, packing=packing, seed=7)
    again = SFTLoader(data, batch_size=4, seq_len=16, packing=packing, seed=7)
    other = SFTLoader(data, batch_size=4, seq_len=16, packing=packing, seed=8)
    ranks = [SFTLoader(data, batch_size=4, seq_len=16, packing=packing, seed=7, rank=r, world_size=2)
             for r in range(2)]  # fmt: skip
    steps = [0, 1, one.steps_per_epoch, 3 * one.steps_per_epoch + 2, 2]  # out of order: random access
    differs = False
    for step in steps:
        batch = one.batch(step)
        assert all(torch.equal(batch[k], again.batch(step)[k]) for k in batch)
        halves = [r.batch(step) for r in ranks]
        assert all(h[k].shape == (2, 16) for h in halves for k in h)
        assert all(torch.equal(torch.cat([h[k] for h in halves]), batch[k]) for k in batch)
        differs |= not torch.equal(other.batch(step)["input_ids"], batch["input_ids"])
    assert differs


def test_loader_arguments_are_checked():
    with pytest.raises(SFTDataError, match=r"e\.jsonl:1: 6 tokens do not fit seq_len 5"):
        SFTLoader([SFTExample([1] * 6, [1] * 6, "e.jsonl", 1)], batch_size=1, seq_len=5)
    with pytest.raises(SFTDataError, match="no SFT examples"):
        SFTLoader([], batch_size=1, seq_len=5)
    with pytest.raises(ValueError, match="split evenly"):
        SFTLoader([A], batch_size=3, seq_len=5, world_size=2)
    with pytest.raises(ValueError, match="step must be >= 0"):
        SFTLoader([A], batch_size=1, seq_len=5).batch(-1)


def test_a_packed_batch_under_the_document_mask_has_the_loss_of_its_examples_alone():
    """The batch is what LanguageModelObjective(document_mask=True) consumes: the packed loss (and its count) is the
    sum over the examples of each one's loss in a row of its own, unpadded."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=1100, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=32))
    data = examples(6, seed=2)
    loader = SFTLoader(data, batch_size=2, seq_len=24, shuffle=False, pad_id=0)
    assert loader.rows_per_epoch == 2  # packing put several examples in a row
    alone = LanguageModelObjective(model)
    with torch.no_grad():
        packed = LanguageModelObjective(model, document_mask=True)(loader.batch(0))
        separate = [alone({"input_ids": torch.as_tensor(e.input_ids)[None],
                           "targets": torch.as_tensor(shifted_targets(e.input_ids, e.loss_mask))[None]})
                    for e in data]  # fmt: skip
    assert packed.tokens.item() == sum(int(o.tokens) for o in separate) == sum(int(e.loss_mask[1:].sum()) for e in data)
    torch.testing.assert_close(packed.loss, sum(o.loss for o in separate), rtol=1e-5, atol=1e-4)
