"""BitNet b1.58 (quant/bitnet.py): ternary weights and int8 activations against hand-computed codes and against the
reference code written here from the BitNet b1.58 "Training Tips, Code and FAQ" note (`weight_quant`,
`activation_quant`), BitLinear against Hugging Face's `AutoBitLinear(online_quant=True)` (a test-only oracle:
forward and straight-through gradients bit for bit), the integer form of the product, bitnet_model on a tiny
Transformer, and training one with the shared Trainer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge import ModelConfig, Transformer
from lmforge.quant.bitnet import (
    BitLinear,
    activation_quant,
    activation_quantize,
    bitnet_model,
    ternary_quantize,
    weight_quant,
)
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import Schedule
from lmforge.train.trainer import Trainer

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"

# ----------------------------------------------------------------------------------------------------- reference
# The training-tips note's code (its BitLinear forward: x_quant = x + (activation_quant(x) - x).detach(), w_quant
# likewise, y = F.linear(x_quant, w_quant)), with its RMSNorm left out as bitnet.py leaves it out.


def ref_activation_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-token quantization to 8 bits. No grouping is needed for quantization."""
    scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    return (x * scale).round().clamp_(-128, 127) / scale


def ref_weight_quant(w: torch.Tensor) -> torch.Tensor:
    """Per-tensor quantization to 1.58 bits. No grouping is needed for quantization."""
    scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
    return (w * scale).round().clamp_(-1, 1) / scale


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------- quantizers


def test_ternary_codes_by_hand() -> None:
    w = torch.tensor([[0.1, -0.5, 0.9], [0.0, 0.3, -0.2]])  # mean |w| = 2.0 / 6 = 1/3: w / γ = .3 -1.5 2.7 0 .9 -.6
    codes, scale = ternary_quantize(w)
    assert codes.dtype == torch.int8 and codes.tolist() == [[0, -1, 1], [0, 1, -1]]
    torch.testing.assert_close(scale, torch.tensor(3.0))
    torch.testing.assert_close(weight_quant(w), codes.float() / 3.0, rtol=0, atol=0)
    zero_codes, zero_scale = ternary_quantize(torch.zeros(2, 3))  # γ clamped at ε: codes 0, no NaN
    assert zero_codes.abs().sum() == 0 and torch.equal(weight_quant(torch.zeros(2, 3)), torch.zeros(2, 3))
    torch.testing.assert_close(zero_scale, torch.tensor(1e5))


def test_activation_codes_by_hand() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0]])  # s = 127 / 4 = 31.75; a token of zeros
    codes, scale = activation_quantize(x)
    assert codes.dtype == torch.int8 and codes.tolist() == [[32, -64, 16, 127], [0, 0, 0, 0]]  # -63.5 -> -64 (even)
    torch.testing.assert_close(scale, torch.tensor([[31.75], [127 / 1e-5]]))
    assert torch.equal(activation_quant(x)[1], torch.zeros(4))


@pytest.mark.parametrize("shape", [(24, 32), (7, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_equal_the_reference_code(shape, dtype) -> None:
    w = (randn(*shape) * 0.02).to(dtype)
    ref = ref_weight_quant(w.float()).to(dtype)
    assert weight_quant(w).dtype == dtype and torch.equal(weight_quant(w), ref)
    codes, scale = ternary_quantize(w)
    assert set(codes.unique().tolist()) == {-1, 0, 1}
    torch.testing.assert_close(scale, 1 / w.float().abs().mean(), rtol=0, atol=0)
    assert torch.equal((codes.float() / scale).to(dtype), ref)
    # the paper's formula W / (γ + ε) (float64) agrees except for weights within ~ε/γ of a rounding midpoint
    paper = (w.double() / (w.double().abs().mean() + 1e-5)).round().clamp(-1, 1)
    assert (paper != codes.double()).float().mean() < 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_equal_the_reference_code_and_stay_int8(dtype) -> None:
    x = (randn(3, 9, 64, seed=1) * torch.logspace(-2, 2, 9)[:, None]).to(dtype)  # tokens of very different scales
    x[0, 0, 5] = 300.0  # an outlier sets its token's scale
    assert torch.equal(activation_quant(x), ref_activation_quant(x.float()).to(dtype))
    codes, scale = activation_quantize(x)
    assert codes.dtype == torch.int8 and scale.shape == (3, 9, 1)
    assert codes.min() >= -127 and codes.max() <= 127  # |x s| <= 127: -128 never occurs
    assert torch.equal(codes.abs().amax(dim=-1), torch.full((3, 9), 127, dtype=torch.int8))  # absmax -> 127
    if dtype == torch.float32:
        assert torch.equal(codes.float() / scale, activation_quant(x))


# ----------------------------------------------------------------------------------------------------- the layer


def test_bitlinear_matches_hf_autobitlinear() -> None:
    bitnet_hf = pytest.importorskip("transformers.integrations.bitnet")
    torch.manual_seed(0)
    ref = bitnet_hf.AutoBitLinear(48, 40, bias=True, online_quant=True)
    ours = BitLinear(nn.Parameter(ref.weight.detach().clone()), nn.Parameter(ref.bias.detach().clone()))
    x = randn(4, 6, 48, seed=2) * 3
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch._dynamo.config.patch(disable=True):  # its quantizers are @torch.compile'd: run them eagerly
        y_ref = ref(x_ref)
    y = ours(x_ours)
    g = randn(4, 6, 40, seed=3)
    y_ref.backward(g)
    y.backward(g)
    assert torch.equal(y, y_ref)
    assert torch.equal(x_ours.grad, x_ref.grad)
    assert torch.equal(ours.weight.grad, ref.weight.grad) and torch.equal(ours.bias.grad, ref.bias.grad)


def test_straight_through_gradients_have_no_clipping_mask() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        lin.weight[0, :4] = 1.0  # far beyond 1.5 γ: clipped to ±1 in the forward, still trained
    layer = BitLinear.from_linear(lin)
    assert layer.weight is lin.weight and layer.bias is None
    x = randn(5, 32, seed=4).requires_grad_()
    g = randn(5, 16, seed=5)
    layer(x).backward(g)
    x_hat = ref_activation_quant(x.detach())
    w_hat = ref_weight_quant(lin.weight.detach())
    assert torch.equal(lin.weight.grad, g.T @ x_hat)  # dL/dW = dL/dW̃ = gᵀ x̃
    torch.testing.assert_close(x.grad, g @ w_hat, rtol=1e-6, atol=1e-6)  # dL/dx = dL/dx̃ = g W̃
    assert (lin.weight.grad[0, :4] != 0).all()


def test_the_product_is_an_integer_matmul_rescaled() -> None:
    torch.manual_seed(1)
    layer = BitLinear.from_linear(nn.Linear(64, 24))
    x = randn(10, 64, seed=6)
    c_w, s_w = layer.ternary()
    c_x, s_x = activation_quantize(x)
    acc = c_x.long() @ c_w.long().T  # int64: exact; C_W ternary, so only additions and subtractions
    expected = acc.double() / (s_x.double() * s_w.double()) + layer.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-6)


def _tiny(seed: int = 0, seq: int = 32) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=seq)
    return Transformer(cfg)


def test_bitnet_model_swaps_the_block_linears_only() -> None:
    model = _tiny()
    before = dict(model.named_parameters())
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        y_float = model(ids)
    swap = bitnet_model(model)
    names = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
    assert len(names) == 2 * 7 and all(n.startswith("blocks.") for n in names)
    assert type(model.lm_head) is nn.Linear and type(model.embed) is nn.Embedding
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    with torch.no_grad():
        y = model(ids)
    assert (y - y_float).abs().max() > 1e-3  # ternary weights change the function
    swap.restore()
    with torch.no_grad():
        assert torch.equal(model(ids), y_float)


# ----------------------------------------------------------------------------------------------------- training

SEQ = 64


class ByteWindows:
    """Random windows of a byte tensor: batch(step) is a pure function of (seed, step)."""

    def __init__(self, data: torch.Tensor, rows: int, seed: int = 0) -> None:
        self.data, self.rows, self.seed = data, rows, seed

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.data) - SEQ - 1, (self.rows,), generator=g)
        r = torch.stack([self.data[s : s + SEQ + 1] for s in starts.tolist()])
        return {"input_ids": r[:, :-1], "targets": r[:, 1:]}


def test_training_a_bitnet_model_with_the_trainer_lowers_the_loss() -> None:
    ids = torch.tensor(list((DATA / "hamlet_gut.txt").read_bytes()[:100_000]))
    split = len(ids) * 9 // 10
    model = _tiny(seq=SEQ)
    bitnet_model(model)
    initial = {n: m.ternary()[0].clone() for n, m in model.named_modules() if isinstance(m, BitLinear)}
    steps = 60
    optimizer = build_optimizer("adamw", model, lr=3e-3, weight_decay=0.0)
    schedule = Schedule("cosine", total_steps=steps, warmup_steps=5, min_lr_ratio=0.1)
    train, val = ByteWindows(ids[:split], 16), ByteWindows(ids[split:], 16, seed=1)
    trainer = Trainer(model, optimizer, schedule, train, val_data=val, max_steps=steps, eval_every=steps, eval_steps=2,
                      log_every=1, progress=False)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and steadier on a busy machine
    try:
        with torch.no_grad():
            model.eval()
            start = trainer.evaluate()["val_loss"]
        last = trainer.fit(resume=False)
    finally:
        torch.set_num_threads(threads)
    losses = [r["loss"] for r in trainer.history if "loss" in r]
    assert start > 5.0 and last["val_loss"] < start - 2.0  # ~ln 256 = 5.5 at start; bytes are far from uniform
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0
    flipped = [(m.ternary()[0] != initial[n]).float().mean() for n, m in model.named_modules()
               if isinstance(m, BitLinear)]  # fmt: skip
    assert min(flipped) > 0.01  # every layer's ternary codes moved
    assert all(set(m.ternary()[0].unique().tolist()) <= {-1, 0, 1} for m in model.modules() if isinstance(m, BitLinear))
