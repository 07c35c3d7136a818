"""Q5_0 and Q4_K quantization and GGUF export.

Oracles: `gguf.quants.quantize` for Q5_0 (bytes equal); for Q4_K, which the `gguf` package cannot
quantize, a line-by-line scalar transcription of ggml-quants.c's `quantize_row_q4_K_ref` and
`make_qkx2_quants` below (float32 scalars, C's loop order), with `gguf.quants.dequantize` for the
reconstruction error; transformers' GGUF loader and llama.cpp's fallback rule for the export.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import lmforge
from lmforge.config import ModelConfig
from lmforge.io.gguf_export import gguf_name, gguf_tensors, tensor_type
from lmforge.io.gguf_model import unpermute_rope_rows
from lmforge.io.gguf_quants import GGMLType, dequantize, quantize
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.bpe import train_bpe
from lmforge.tokenizer.pretokenize import LLAMA3_PATTERN

GQ = gguf.GGMLQuantizationType
F = np.float32
DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"

# ---------------------------------------------------------------------------------------------
# The reference: ggml-quants.c transcribed, one scalar at a time
# ---------------------------------------------------------------------------------------------


def nearest_int(fval: np.float32) -> int:
    val = F(fval) + F(12582912.0)
    return (int(val.view(np.int32)) & 0x007FFFFF) - 0x00400000


def make_qkx2_quants(n, nmax, x, weights, rmin, rdelta, nstep):
    """-> (scale, the_min, L), use_mad = false."""
    L, Laux = [0] * n, [0] * n
    mn, mx = x[0], x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > 0:
        mn = F(0)
    if mx == mn:
        return F(0), -mn, [0] * n
    iscale = F(nmax) / (mx - mn)
    scale = F(1) / iscale
    best_error = F(0)
    for i in range(n):
        L[i] = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
        diff = scale * F(L[i]) + mn - x[i]
        diff = diff * diff
        best_error += weights[i] * diff
    for step in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (mx - mn)
        sum_l = sum_l2 = sum_xl = F(0)
        for i in range(n):
            q = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
            Laux[i] = q
            w = weights[i]
            sum_l += w * F(q)
            sum_l2 += w * F(q) * F(q)
            sum_xl += w * F(q) * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            cur_error = F(0)
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[i]
                diff = diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                L = list(Laux)
                best_error, scale, mn = cur_error, this_scale, this_min
    return scale, -mn, L


def get_scale_min_k4(j: int, q: bytearray) -> tuple[int, int]:
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def quantize_row_q4_k_ref(row: np.ndarray) -> bytes:
    out = bytearray()
    for i in range(len(row) // 256):
        x = row[256 * i : 256 * (i + 1)]
        L, scales, mins = [0] * 256, [F(0)] * 8, [F(0)] * 8
        max_scale = max_min = F(0)
        for j in range(8):
            sum_x2 = F(0)
            for k in range(32):
                sum_x2 += x[32 * j + k] * x[32 * j + k]
            av_x = np.sqrt(sum_x2 / F(32))
            weights = [av_x + abs(x[32 * j + k]) for k in range(32)]
            scales[j], mins[j], L[32 * j : 32 * j + 32] = make_qkx2_quants(
                32, 15, x[32 * j : 32 * j + 32], weights, -1.0, 0.1, 20
            )
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
        inv_min = F(63) / max_min if max_min > 0 else F(0)
        sc = bytearray(12)
        for j in range(8):
            ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # uint8_t ls = nearest_int(...)
            lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
            if j < 4:
                sc[j], sc[j + 4] = ls, lm
            else:
                sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                sc[j - 4] |= (ls >> 4) << 6
                sc[j] |= (lm >> 4) << 6
        d, dmin = np.float16(max_scale / F(63)), np.float16(max_min / F(63))
        for j in range(8):
            s, m = get_scale_min_k4(j, sc)
            dj = F(d) * F(s)
            if dj == 0:
                continue
            dm = F(dmin) * F(m)
            for ii in range(32):
                L[32 * j + ii] = max(0, min(15, nearest_int((x[32 * j + ii] + dm) / dj)))
        qs = bytearray(128)
        for j in range(0, 256, 64):
            for k in range(32):
                qs[j // 2 + k] = L[j + k] | (L[j + k + 32] << 4)
        out += d.tobytes() + dmin.tobytes() + sc + qs
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Quantizers
# ---------------------------------------------------------------------------------------------


def q4k_rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    normal = rng.standard_normal((8, 1024)).astype(F)
    outliers = rng.standard_normal((2, 256)).astype(F)
    outliers[0, [3, 100, 200]] = [40.0, -65.0, 18.0]
    outliers[1, 70] = 300.0  # one sub-block's scale dwarfs the others: their 6-bit scales round down
    quiet = rng.standard_normal((1, 256)).astype(F)
    quiet[0, 32:64] *= 1e-4  # a 6-bit scale of 0: that sub-block keeps the fit's codes
    return {
        "normal": normal,
        "laplace": rng.laplace(size=(8, 256)).astype(F),
        "outliers": outliers,
        "quiet_sub_block": quiet,
        "constants": np.array([[0.37] * 256, [-0.37] * 256, [0.0] * 256], F),  # min clipped to 0; flat; zero
        "negative": (rng.standard_normal((1, 256)) - 5).astype(F),  # every sub-block below 0
        "grid": np.tile(np.arange(32, dtype=F) / 2, (1, 8)),  # exact halves: nearest_int's ties
        "huge": (rng.standard_normal((1, 256)) * 1e20).astype(F),  # x^2 overflows: the C's inf/nan comparisons
        "tiny": (rng.standard_normal((1, 256)) * 1e-39).astype(F),  # subnormal: the f16 scales flush to 0
    }


Q4K_ROWS = q4k_rows()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the scalar reference overflows where C does
@pytest.mark.parametrize("case", sorted(Q4K_ROWS))
def test_q4_k_bytes_equal_the_scalar_reference(case):
    x = Q4K_ROWS[case]
    ours = quantize(x, "Q4_K")
    assert ours.dtype == np.uint8 and ours.shape == (x.shape[0], x.shape[1] // 256 * 144)
    for row, got in zip(x, ours, strict=True):
        assert got.tobytes() == quantize_row_q4_k_ref(row), case


def test_a_zero_6_bit_scale_keeps_the_fitted_codes():
    """The quiet sub-block's scale rounds to 0 against its loud neighbours; its stored codes are still the fit's."""
    raw = quantize(Q4K_ROWS["quiet_sub_block"], "Q4_K")[0]
    scale_1, codes_1 = raw[4 + 1] & 63, raw[16:48] >> 4  # sub-block 1: 6-bit scale, high nibbles of qs[0:32]
    assert scale_1 == 0 and codes_1.any()


def reconstruction(x: np.ndarray, qtype: str) -> np.ndarray:
    return gguf.quants.dequantize(quantize(x, qtype), GQ[qtype]).reshape(x.shape)


def test_q4_k_reconstruction_error():
    """|x - x'| <= d·sc per sub-block: rounding costs half a step, and the least-squares range may leave an
    extreme weight outside it (measured: 0.79 steps at most here). The RMS error is below Q4_0's (a fitted scale
    and min per 32 weights, against one symmetric scale)."""
    x = np.random.default_rng(3).standard_normal((64, 1024)).astype(F)
    raw = quantize(x, "Q4_K").reshape(-1, 144)
    d = raw[:, :2].copy().view(np.float16).astype(F)  # (blocks, 1)
    sc = np.concatenate([raw[:, 4:8] & 63, (raw[:, 12:16] & 0xF) | ((raw[:, 4:8] >> 6) << 4)], axis=1)
    step = (d * sc).reshape(-1, 1)  # one step per 32-weight sub-block
    err = np.abs(reconstruction(x, "Q4_K") - x).reshape(-1, 32)
    assert (err <= step + 1e-6).all(), (err / step).max()
    rms = {t: np.sqrt(np.mean((reconstruction(x, t) - x) ** 2)) for t in ("Q4_K", "Q4_0")}
    assert rms["Q4_K"] < 0.9 * rms["Q4_0"], rms


def q5_0_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    ties = np.tile(np.arange(-16, 16, dtype=F) + 0.5, (4, 8))
    ties[:, 0::32] = -16.0  # d = -16 / -16 = 1: x + 16.5 lands on integers for half-integers
    signs = rng.uniform(-1, 1, (4, 256)).astype(F)
    signs[:, 5::32], signs[:, 9::32] = 3.0, -3.0  # |+3| == |-3|: the first one is the signed max
    signs[1::2, 5::32], signs[1::2, 9::32] = -3.0, 3.0
    return {
        "normal": rng.standard_normal((16, 256)).astype(F),
        "zeros": np.zeros((2, 256), F),
        "ties": ties,
        "sign_ties": signs,
        "large": (rng.standard_normal((8, 256)) * 10.0 ** rng.integers(-3, 30, size=(8, 1))).astype(F),
    }


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the reference warns on overflowing scales
@pytest.mark.parametrize(("case", "x"), sorted(q5_0_inputs().items()))
def test_q5_0_bytes_equal_the_gguf_package(case, x):
    ours = quantize(x, "Q5_0")
    assert ours.shape == (x.shape[0], x.shape[1] // 32 * 22)
    assert ours.tobytes() == np.ascontiguousarray(gguf.quants.quantize(x, GQ.Q5_0)).tobytes(), case


def test_unsupported_quantizers_stay_errors():
    with pytest.raises(NotImplementedError, match="Q5_1"):
        quantize(np.zeros((1, 32), F), "Q5_1")
    with pytest.raises(NotImplementedError, match="Q6_K"):
        quantize(np.zeros((1, 256), F), "Q6_K")
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        quantize(np.zeros((1, 96), F), "Q4_K")


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

VOCAB = 352
# relative RMS error of the weight matrices, measured on Gaussian weights: Q4_K 7.1%, Q5_0 4.3%, (Q4_0 8.6%)
WEIGHT_ERROR = {"q4_k": 0.075, "q5_0": 0.046}
AMPLIFICATION = 8.0  # ... which this 2-layer random model amplifies 5.4x (Q4_K), 5.8x (Q5_0) in its logits


@pytest.fixture(scope="module")
def tok():
    text = (DATA / "hamlet_gut.txt").read_text()[:40_000]
    return train_bpe([text], vocab_size=320, pattern=LLAMA3_PATTERN, progress=False, workers=1)


def random_llama(d_ff: int = 96) -> Transformer:
    """Rows of 256 weights (d_model) for every matrix but ffn_down, whose rows are d_ff long."""
    cfg = ModelConfig(
        arch="llama", vocab_size=VOCAB, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=d_ff, max_seq_len=128
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() == 1 else 0.08) + (1.0 if "norm" in name else 0.0))
    return model


def prompt(tok) -> torch.Tensor:
    return torch.tensor([tok.encode((DATA / "hamlet_gut.txt").read_text()[50_000:50_600])[:48]])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def relative_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def test_llama_cpp_fallback_types():
    """llama-quant.cpp: Q4_K on rows of 256k; Q5_0 on rows of 32k; F16 otherwise; 1-D tensors F32."""
    assert tensor_type((8, 512), GGMLType.Q4_K) == GGMLType.Q4_K
    assert tensor_type((8, 96), GGMLType.Q4_K) == GGMLType.Q5_0
    assert tensor_type((8, 80), GGMLType.Q4_K) == GGMLType.F16
    assert tensor_type((512,), GGMLType.Q4_K) == GGMLType.F32
    assert tensor_type((8, 96), GGMLType.Q5_0) == GGMLType.Q5_0 and tensor_type((8, 80), GGMLType.Q5_0) == GGMLType.F16
    types = {name: t.name for name, (_, t) in gguf_tensors(random_llama(d_ff=80), "q4_k").items()}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_K"


@pytest.mark.parametrize(("qtype", "file_type"), [("q4_k", 14), ("q5_0", 8)])
def test_export_writes_llama_cpp_types_and_bytes(tmp_path, tok, qtype, file_type):
    """general.file_type is llama_ftype (14 = MOSTLY_Q4_K_S, 8 = MOSTLY_Q5_0); each tensor is of llama.cpp's type,
    its bytes those of the independent quantizers (gguf's Q5_0; the scalar Q4_K reference, on a few rows)."""
    model = random_llama()
    lmforge.save(model, tmp_path / "m.gguf", tok, qtype=qtype)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.file_type"].contents() == file_type
    weights = gguf_tensors(model, qtype)
    for t in reader.tensors:
        w = weights[t.name][0].numpy()
        want = "F32" if w.ndim == 1 else "Q5_0" if qtype == "q5_0" or t.name.endswith("ffn_down.weight") else "Q4_K"
        assert t.tensor_type.name == want, t.name
        raw = np.asarray(t.data).view(np.uint8).reshape(w.shape[0] if w.ndim > 1 else 1, -1)
        if want == "Q5_0":
            assert raw.tobytes() == gguf.quants.quantize(w, GQ.Q5_0).tobytes(), t.name
        elif want == "Q4_K" and t.name == "blk.1.attn_v.weight":
            assert [r.tobytes() for r in raw[:6]] == [quantize_row_q4_k_ref(r) for r in w[:6]]


@pytest.mark.parametrize("qtype", ["q4_k", "q5_0"])
def test_lmforge_loads_the_dequantized_weights(tmp_path, tok, qtype):
    """The loaded model holds lmforge's dequantization of the file's tensors (q/k rows un-permuted), bit for
    bit, so its logits are those of that model; both stay within the format's rounding of the original."""
    model = random_llama()
    lmforge.save(model, tmp_path / "m.gguf", tok, qtype=qtype)
    back, _ = lmforge.load(tmp_path / "m.gguf", quantized=False)
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    cfg, want = model.config, {}
    for name, w in model.state_dict().items():
        t = tensors[gguf_name(name)]
        deq = torch.from_numpy(dequantize(np.asarray(t.data), t.tensor_type.name)).reshape(w.shape)
        heads = {"attn_q": cfg.n_heads, "attn_k": cfg.kv_heads}.get(t.name.split(".")[-2])
        want[name] = unpermute_rope_rows(deq, heads) if heads else deq
    for name, w in back.state_dict().items():
        assert torch.equal(w, want[name]), name
    expected = random_llama()
    expected.load_state_dict(want)
    ids = prompt(tok)
    assert torch.equal(logits(back, ids), logits(expected, ids))
    matrices = [n for n, w in want.items() if w.dim() == 2]
    error = relative_rms(
        torch.cat([want[n].ravel() for n in matrices]), torch.cat([model.state_dict()[n].ravel() for n in matrices])
    )
    assert error <= WEIGHT_ERROR[qtype], error
    assert relative_rms(logits(back, ids), logits(model, ids)) <= AMPLIFICATION * error


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["q4_k", "q5_0"])
def test_transformers_reads_the_export(tmp_path, tok, qtype):
    """transformers' GGUF loader (gguf's dequantization, its own un-permutation) gives lmforge's logits."""
    import transformers

    lmforge.save(random_llama(), tmp_path / "m.gguf", tok, qtype=qtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ours, _ = lmforge.load(tmp_path / "m.gguf")
    ids = prompt(tok)
    assert (logits(ours, ids) - logits(ref, ids).logits).abs().max().item() <= 1e-4
