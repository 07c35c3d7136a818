"""Hostile and careless model files: safetensors headers, shard indexes, config.json, GGUF metadata.

Each corruption must end in one lmforge error (a `LmforgeError`) that names the file and the file's own
key or tensor, fast and before anything big is built. Safetensors cases are checked against the
`safetensors` library: what it writes loads here, and what it refuses is refused here too (the one
place lmforge is stricter, duplicate tensor names, is marked).
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lmforge
from lmforge.config import ConfigError, ModelConfig, MoEConfig
from lmforge.io.gguf import GGUFError, write_gguf
from lmforge.io.gguf_model import load_gguf_model
from lmforge.io.hf import ModelFilesError, load_hf
from lmforge.io.hf_arch import config_from_hf
from lmforge.io.safetensors_mmap import SafetensorsError, SafetensorsFile
from lmforge.model.transformer import Transformer
from lmforge.utils.errors import LmforgeError

TINY = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)


# ---------------------------------------------------------------------------- safetensors headers


def blob(header: dict | list | bytes, data: bytes, pad: bool = True) -> bytes:
    """A safetensors file: 8-byte length, the header (JSON, space-padded to 8 bytes like the writers do), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


A = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
B = {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}
DATA = bytes(range(40))


def entry(**changes) -> dict:
    return {"a": {**A, **changes}, "b": B}


# (case id, file bytes, words the message must hold; the file name is always required)
CORRUPT = [
    ("shorter-than-length-field", b"\x08\0\0", ["truncated"]),
    ("header-longer-than-file", struct.pack("<Q", 1000) + b"{}", ["truncated", "header length 1000"]),
    ("header-length-absurd", struct.pack("<Q", 2**40) + b"{}" + b" " * 6, ["header length", "limit"]),
    ("header-not-json", blob(b"{not json", b""), ["not valid JSON"]),
    ("header-not-utf8", blob(b'{"\xff": 1}', b""), ["not valid JSON"]),
    ("header-a-list", blob([1, 2], b""), ["JSON object", "list"]),
    ("entry-not-object", blob({"a": [1]}, b""), ["'a'", "entry"]),
    ("entry-without-dtype", blob({"a": {"shape": [2, 3], "data_offsets": [0, 24]}, "b": B}, DATA), ["'a'", "dtype"]),
    ("unknown-dtype", blob(entry(dtype="F33"), DATA), ["'a'", "F33"]),
    ("negative-shape", blob(entry(shape=[-2, -3]), DATA), ["'a'", "shape"]),
    ("bool-shape", blob(entry(shape=[True, 6]), DATA), ["'a'", "shape"]),
    ("float-shape", blob(entry(shape=[2.0, 3]), DATA), ["'a'", "shape"]),
    ("three-offsets", blob(entry(data_offsets=[0, 24, 30]), DATA), ["'a'", "data_offsets"]),
    ("negative-offsets", blob(entry(data_offsets=[-8, 16]), DATA), ["'a'", "data_offsets"]),
    ("end-before-begin", blob(entry(shape=[0], data_offsets=[24, 0]), DATA), ["'a'", "end before"]),
    ("size-not-shape", blob(entry(shape=[2, 2]), DATA), ["'a'", "needs 16"]),
    ("overlapping", blob({"a": A, "b": {**B, "data_offsets": [16, 32]}}, DATA[:32]), ["'b'", "overlaps"]),
    ("gap", blob({"a": A, "b": {**B, "data_offsets": [32, 48]}}, DATA + bytes(8)), ["'b'", "gap"]),
    ("not-from-zero", blob({"a": {**A, "data_offsets": [8, 32]}}, DATA[:32]), ["'a'", "gap"]),
    ("data-truncated", blob({"a": A, "b": B}, DATA[:30]), ["truncated", "'b'"]),
    ("trailing-bytes", blob({"a": A, "b": B}, DATA + b"junk"), ["after the last tensor"]),
    ("metadata-not-strings", blob({"__metadata__": {"format": 1}, "a": A, "b": B}, DATA), ["__metadata__"]),
    ("metadata-a-list", blob({"__metadata__": ["pt"], "a": A, "b": B}, DATA), ["__metadata__"]),
]
# lmforge is stricter than `safetensors` here: it keeps the last of two entries with one name
STRICTER = [
    ("duplicate-name", blob(b'{"a": ' + json.dumps(A).encode() + b', "a": ' + json.dumps(A).encode() + b"}",
                            DATA[:24]), ["duplicate", "'a'"]),
]  # fmt: skip


def safetensors_refuses(path: Path) -> bool:
    try:
        with safe_open(path, "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                f.get_tensor(k)
    except Exception:  # any refusal by the reference counts
        return True
    return False


@pytest.mark.parametrize(("case", "data", "words"), CORRUPT + STRICTER, ids=[c[0] for c in CORRUPT + STRICTER])
def test_corrupt_safetensors_header_is_refused(tmp_path, case, data, words):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    with pytest.raises(SafetensorsError) as e:
        SafetensorsFile(path)
    message = str(e.value)
    assert "\n" not in message and path.name in message, message
    for word in words:
        assert word in message, message
    assert safetensors_refuses(path) == (case not in dict((c[0], 0) for c in STRICTER)), case


def test_files_written_by_safetensors_load(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2).bfloat16(),
        "i64": torch.arange(-3, 3), "u8": torch.arange(10, dtype=torch.uint8), "bool": torch.tensor([True, False]),
        "u16": torch.arange(5).to(torch.uint16), "f8": torch.randn(4).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
    }  # fmt: skip
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    ours = SafetensorsFile(tmp_path / "m.safetensors")
    theirs = load_file(tmp_path / "m.safetensors")
    assert ours.metadata == {"format": "pt"} and set(ours.keys()) == set(theirs)
    for name, t in theirs.items():
        got = ours.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape
        bits = got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
        assert torch.equal(*bits), name  # bit-exact, NaN-safe


def test_unaligned_data_is_read_like_safetensors(tmp_path):
    """Headers need no padding: a float32 tensor may start at an odd byte; both readers accept it."""
    values = np.array([1.5, -2.25], dtype="<f4").tobytes()
    header = {"u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "x": {"dtype": "F32", "shape": [2],
              "data_offsets": [1, 9]}}  # fmt: skip
    path = tmp_path / "odd.safetensors"
    path.write_bytes(blob(header, b"\x07" + values, pad=False))
    with safe_open(path, "pt") as f:
        want = f.get_tensor("x")
    assert torch.equal(SafetensorsFile(path).get("x"), want) and want.tolist() == [1.5, -2.25]


# ---------------------------------------------------------------------------- model directories


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    lmforge.save(Transformer(ModelConfig(**TINY)), path)
    return path


def copy_dir(src: Path, dst: Path, config: dict | None = None) -> Path:
    """A copy of a model directory (the weights hard-linked), with config.json keys changed by `config`."""
    dst.mkdir()
    for f in src.iterdir():
        os.link(f, dst / f.name)
    if config is not None:
        (dst / "config.json").unlink()
        cfg = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def sharded(src: Path, dst: Path) -> tuple[Path, dict]:
    """`src` rewritten as two shards plus an index; returns (directory, index)."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, dst / fname)
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst, index


def expect_error(path: Path, error: type[LmforgeError], *words: str, file: str | None = None) -> str:
    """Loading `path` raises `error`, fast, with a one-line message naming `file` (or config.json) and `words`."""
    t0 = time.perf_counter()
    with pytest.raises(error) as e:
        lmforge.load(path)
    assert time.perf_counter() - t0 < 1.0
    message = str(e.value)
    assert "\n" not in message and (file or "config.json") in message, message
    for word in words:
        assert word in message, message
    return message


def test_sharded_directory_loads_and_matches(tmp_path, model_dir):
    path, _ = sharded(model_dir, tmp_path / "s")
    model, _ = lmforge.load(path)
    want = load_file(model_dir / "model.safetensors")
    assert torch.equal(model.embed.weight, want["model.embed_tokens.weight"])


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("invalid-json", ["invalid JSON"]),
        ("weight-map-list", ["weight_map"]),
        ("weight-map-int-value", ["weight_map"]),
        ("absolute-shard", ["outside the model directory"]),
        ("dotdot-shard", ["'../", "outside the model directory"]),
        ("symlink-out", ["resolves to", "outside the model directory"]),
        ("missing-shard", ["'nowhere.safetensors'", "does not exist"]),
        ("tensor-not-in-shard", ["'model.norm.weight'", "does not hold it"]),
    ],
)
def test_bad_index_is_refused(tmp_path, model_dir, case, words):
    path, index = sharded(model_dir, tmp_path / "s")
    shards = sorted(set(index["weight_map"].values()))
    wm = index["weight_map"]
    outside = tmp_path / "outside.safetensors"
    os.link(path / shards[0], outside)  # a valid file: only where it lies is wrong
    if case == "invalid-json":
        text = "{weight_map"
    elif case == "weight-map-list":
        text = json.dumps({"weight_map": list(wm)})
    elif case == "weight-map-int-value":
        text = json.dumps({"weight_map": {**wm, "model.norm.weight": 3}})
    elif case == "absolute-shard":
        text = json.dumps({"weight_map": {k: str(outside) if v == shards[0] else v for k, v in wm.items()}})
    elif case == "dotdot-shard":
        text = json.dumps({"weight_map": {k: "../outside.safetensors" if v == shards[0] else v for k, v in wm.items()}})
    elif case == "symlink-out":
        (path / shards[0]).unlink()
        (path / shards[0]).symlink_to(outside)
        text = json.dumps(index)
    elif case == "missing-shard":
        text = json.dumps({"weight_map": {**wm, "model.norm.weight": "nowhere.safetensors"}})
    else:
        other = next(s for s in shards if s != wm["model.norm.weight"])
        text = json.dumps({"weight_map": {**wm, "model.norm.weight": other}})
    (path / "model.safetensors.index.json").write_text(text)
    expect_error(path, ModelFilesError, *words, file="model.safetensors.index.json")


def test_hub_cache_symlinks_to_blobs_load(tmp_path, model_dir):
    """A Hugging Face hub cache snapshot links its files to ../../blobs: that stays inside the repo and loads."""
    repo = tmp_path / "models--x--tiny"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in model_dir.iterdir():
        os.link(f, repo / "blobs" / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    model, _ = lmforge.load(snap)
    assert model.config.n_layers == TINY["n_layers"]


# (case, config.json changes, error type, words in the message: config.json's own keys, never ModelConfig fields)
CONFIG_CASES = [
    ("string-for-int", {"num_hidden_layers": "12"}, ConfigError,
     ["num_hidden_layers must be a positive integer", "'12'"]),
    ("bool-for-int", {"hidden_size": True}, ConfigError, ["hidden_size must be a positive integer", "boolean"]),
    ("null-required", {"num_attention_heads": None}, ConfigError, ["missing key num_attention_heads"]),
    ("zero-size", {"intermediate_size": 0}, ConfigError, ["intermediate_size must be a positive integer"]),
    ("list-for-float", {"rms_norm_eps": [1e-5]}, ConfigError, ["rms_norm_eps must be a finite number"]),
    ("nan-theta", {"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}}, ConfigError,
     ["rope_parameters.rope_theta must be a finite number"]),
    ("rope-section-list", {"rope_parameters": [1]}, ConfigError, ["rope_parameters must be a JSON object"]),
    ("kv-heads-not-dividing", {"num_key_value_heads": 3}, ConfigError,
     ["num_key_value_heads=3", "must divide num_attention_heads=4"]),
    ("string-for-bool", {"tie_word_embeddings": "yes"}, ConfigError, ["tie_word_embeddings must be true or false"]),
    ("unknown-activation", {"hidden_act": "swish2"}, LmforgeError, ["hidden_act 'swish2'"]),
    ("no-model-type", {"model_type": None}, LmforgeError, ["model_type None"]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "change", "error", "words"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_json_names_its_key(tmp_path, model_dir, case, change, error, words):
    path = copy_dir(model_dir, tmp_path / "m", change)
    message = expect_error(path, error, *words)
    internal = r"(?<![\w.])(n_layers|d_model|n_heads|n_kv_heads|d_ff|norm_eps)(?!\w)"
    assert re.search(internal, message) is None, message


def test_config_json_not_an_object(tmp_path, model_dir):
    path = copy_dir(model_dir, tmp_path / "m")
    (path / "config.json").unlink()
    (path / "config.json").write_text("[1, 2]")
    expect_error(path, ModelFilesError, "must be a JSON object", "list")


@pytest.mark.parametrize(
    ("arch", "change", "words"),
    [
        ("gemma2", {"query_pre_attn_scalar": 0}, ["query_pre_attn_scalar must be a finite number > 0"]),
        ("qwen3_moe", {"mlp_only_layers": "01"}, ["mlp_only_layers must be a list of non-negative integers"]),
        ("qwen3_moe", {"num_experts_per_tok": 9}, ["num_experts_per_tok=9", "must be <= num_experts=6"]),
        ("gpt2", {"n_head": 5}, ["n_embd=64 is not divisible by n_head=5"]),
        ("gpt2", {"activation_function": "relu6"}, ["activation_function 'relu6'"]),
        ("deepseek_v3", {"kv_lora_rank": -1}, ["kv_lora_rank must be a positive integer"]),
        ("deepseek_v3", {"n_group": 3}, ["n_group=3", "must divide n_routed_experts=8"]),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}},
         ["rope_parameters.original_max_position_embeddings=None", "required for yarn"]),
    ],
)  # fmt: skip
def test_other_families_name_their_keys(arch, change, words):
    """transformers' own config.json dicts for each family, one key broken."""
    from hf_reference import hf_config

    with pytest.raises(LmforgeError) as e:
        config_from_hf({**hf_config(arch).to_dict(), **change}, where="/models/x/config.json")
    for word in ("/models/x/config.json", *words):
        assert word in str(e.value), str(e.value)


def test_cli_and_describe_speak_config_json(tmp_path, model_dir):
    from lmforge.cli import app
    from lmforge.io.summary import describe

    path = copy_dir(model_dir, tmp_path / "m")
    cfg = json.loads((model_dir / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (path / "config.json").unlink()
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: missing key num_hidden_layers$"):
        describe(path)
    for args in (["info", str(path)], ["generate", str(path), "--prompt", "hi"], ["export", str(path), "x.gguf"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, (args, result.output)
        assert result.output.strip() == f"error: {path / 'config.json'}: missing key num_hidden_layers", args


# ---------------------------------------------------------------------------- structure before allocation


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"num_hidden_layers": 50000}, ["num_hidden_layers=50000", "layers 0..1", "model.layers.N."]),
        ({"num_hidden_layers": 1}, ["num_hidden_layers=1", "layers 0..1"]),
        ({"vocab_size": 10**15}, ["'model.embed_tokens.weight' has shape (96, 32)", f"vocab_size={10**15}"]),
        ({"hidden_size": 48, "head_dim": 8}, ["'model.embed_tokens.weight'", "hidden_size=48"]),
        ({"num_attention_heads": 8}, ["q_proj.weight' has shape (32, 32)", "num_attention_heads=8 x head_dim=8"]),
        ({"num_key_value_heads": 4}, ["k_proj.weight' has shape (16, 32)", "num_key_value_heads=4"]),
        ({"intermediate_size": 10**12}, ["up_proj.weight' has shape (48, 32)", f"intermediate_size={10**12}"]),
    ],
)
def test_hf_counts_are_checked_against_the_tensors(tmp_path, model_dir, change, words):
    path = copy_dir(model_dir, tmp_path / "m", change)
    expect_error(path, ModelFilesError, *words)


def test_a_weight_stored_as_integers_is_refused(tmp_path, model_dir):
    """A float parameter whose safetensors entry says I32 (a consistent header, so safetensors reads it)."""
    path = copy_dir(model_dir, tmp_path / "m")
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].view(torch.int32)
    (path / "model.safetensors").unlink()
    save_file(tensors, path / "model.safetensors")
    expect_error(path, ModelFilesError, "'model.norm.weight' has dtype torch.int32", "floating-point", file=str(path))


def test_huge_layer_count_is_a_four_byte_edit_refused_fast(tmp_path, model_dir):
    path = copy_dir(model_dir, tmp_path / "m")
    text = (model_dir / "config.json").read_text()
    assert '"num_hidden_layers": 2,' in text
    (path / "config.json").unlink()
    (path / "config.json").write_text(text.replace('"num_hidden_layers": 2,', '"num_hidden_layers": 99999,'))
    expect_error(path, ModelFilesError, "num_hidden_layers=99999", "layers 0..1")


def test_expert_count_is_checked_against_the_tensors(tmp_path):
    cfg = ModelConfig(arch="mixtral", **TINY, moe=MoEConfig(n_experts=4, top_k=2, d_expert=TINY["d_ff"]))
    lmforge.save(Transformer(cfg), tmp_path / "moe")
    assert load_hf(tmp_path / "moe").config.moe.n_experts == 4
    path = copy_dir(tmp_path / "moe", tmp_path / "m", {"num_local_experts": 400_000})
    expect_error(path, ModelFilesError, "num_local_experts=400000", "layer 0 holds experts 0..3")


# ---------------------------------------------------------------------------- GGUF metadata


def tiny_gguf(path: Path, **meta_changes) -> dict[str, np.ndarray]:
    """A 2-block llama GGUF (F32) written with lmforge's writer; returns its tensors."""
    rng = np.random.default_rng(0)
    d, ff, v, hd = 32, 48, 16, 8
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    for i in range(2):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
            f"blk.{i}.attn_q.weight": (4 * hd, d), f"blk.{i}.attn_k.weight": (2 * hd, d),
            f"blk.{i}.attn_v.weight": (2 * hd, d), f"blk.{i}.attn_output.weight": (d, 4 * hd),
            f"blk.{i}.ffn_gate.weight": (ff, d), f"blk.{i}.ffn_up.weight": (ff, d), f"blk.{i}.ffn_down.weight": (d, ff),
        })  # fmt: skip
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    meta = {
        "general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": d,
        "llama.feed_forward_length": ff, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.context_length": 64, "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 1e4,
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(v)],
    }  # fmt: skip
    meta = {k: val for k, val in {**meta, **meta_changes}.items() if val is not None}
    write_gguf(path, meta, {n: (t, "F32") for n, t in tensors.items()})
    return tensors


def expect_gguf_error(path: Path, *words: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(GGUFError) as e:
        load_gguf_model(path)
    assert time.perf_counter() - t0 < 1.0
    message = str(e.value)
    assert "\n" not in message and path.name in message, message
    for word in words:
        assert word in message, message


def test_tiny_gguf_loads(tmp_path):
    tensors = tiny_gguf(tmp_path / "m.gguf")
    model = load_gguf_model(tmp_path / "m.gguf")
    assert torch.equal(model.embed.weight, torch.from_numpy(tensors["token_embd.weight"]))
    assert model.config.n_layers == 2 and model.config.kv_heads == 2


def test_gguf_block_count_four_byte_edit_is_refused_fast(tmp_path):
    path = tmp_path / "m.gguf"
    tiny_gguf(path)
    data = bytearray(path.read_bytes())
    key = b"llama.block_count"
    at = data.index(key) + len(key)
    assert struct.unpack_from("<I", data, at + 4)[0] == 2  # the value follows its u32 type tag
    struct.pack_into("<I", data, at + 4, 50000)
    path.write_bytes(bytes(data))
    expect_gguf_error(path, "llama.block_count=50000", "layers 0..1", "blk.N.")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"llama.block_count": "2"}, ["llama.block_count must be a positive integer", "'2'"]),
        ({"llama.block_count": None}, ["missing key llama.block_count"]),
        ({"llama.attention.head_count_kv": 0}, ["llama.attention.head_count_kv must be a positive integer, got 0"]),
        ({"llama.attention.head_count_kv": [2, 2]}, ["llama.attention.head_count_kv must be a positive integer"]),
        ({"llama.attention.head_count_kv": 3}, ["llama.attention.head_count_kv=3", "llama.attention.head_count=4"]),
        ({"llama.attention.head_count": 8, "llama.attention.key_length": 8},
         ["attn_q.weight' has shape (32, 32)", "llama.attention.head_count=8"]),
        ({"llama.embedding_length": 64}, ["'token_embd.weight' has shape (16, 32)", "llama.embedding_length=64"]),
        ({"llama.embedding_length": 30}, ["llama.embedding_length=30 is not divisible by llama.attention.head_count"]),
        ({"llama.feed_forward_length": 2**40}, ["ffn_up.weight' has shape (48, 32)", "llama.feed_forward_length"]),
        ({"llama.vocab_size": 17}, ["tokenizer.ggml.tokens holds 16 tokens", "llama.vocab_size=17"]),
        ({"tokenizer.ggml.tokens": [f"t{i}" for i in range(20)]}, ["'token_embd.weight' has shape (16, 32)"]),
        ({"llama.rope.freq_base": "fast"}, ["llama.rope.freq_base must be a finite number"]),
        ({"llama.rope.dimension_count": 16}, ["llama.rope.dimension_count", "(0, 1]"]),
        ({"general.architecture": ["llama"]}, ["general.architecture must be a string"]),
        ({"llama.expert_count": 8}, ["llama.expert_count=8", "not supported"]),
    ],
)
def test_bad_gguf_metadata_names_its_key(tmp_path, change, words):
    path = tmp_path / "m.gguf"
    tiny_gguf(path, **change)
    expect_gguf_error(path, *words)
