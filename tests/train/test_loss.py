"""Losses: cross entropy vs torch, z-loss in closed form, chunked == plain (values, gradients, lower peak memory),
MoE auxiliary losses reaching the router."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn import functional as F

from lmforge.config import ModelConfig, MoEConfig
from lmforge.model.transformer import Transformer
from lmforge.train.loss import chunked_cross_entropy, cross_entropy, moe_loss_coefs, total_loss


def _targets(shape: tuple[int, ...], V: int, ignore_index: int = -100, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, V, shape, generator=g)
    return t.masked_fill(torch.rand(shape, generator=g) < 0.3, ignore_index)  # ~30% ignored


@pytest.mark.parametrize("shape", [(2, 7, 11), (13, 5)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_cross_entropy_matches_torch(shape, label_smoothing, reduction, ignore_index):
    torch.manual_seed(0)
    V = shape[-1]
    logits = (3 * torch.randn(shape)).requires_grad_()
    targets = _targets(shape[:-1], V, ignore_index)
    out = cross_entropy(
        logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
    )
    ref = F.cross_entropy(
        logits.reshape(-1, V),
        targets.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    torch.testing.assert_close(out.loss.reshape(-1) if reduction == "none" else out.loss, ref)
    torch.testing.assert_close(out.ce, out.loss.detach())
    assert out.tokens == (targets != ignore_index).sum()
    assert not out.ce.requires_grad and not out.z_loss.requires_grad
    up = torch.randn_like(ref)  # a non-trivial upstream gradient
    (g,) = torch.autograd.grad(out.loss.reshape(ref.shape), logits, up)
    (g_ref,) = torch.autograd.grad(ref, logits, up)
    torch.testing.assert_close(g, g_ref)


def test_z_loss_closed_form():
    """z-loss = c * mean over counted tokens of logsumexp(z)^2, added to the cross entropy."""
    torch.manual_seed(0)
    logits = 4 * torch.randn(3, 6, 17) + 2
    targets = _targets((3, 6), 17)
    c = 1e-2
    out = cross_entropy(logits, targets, z_loss=c)
    keep = targets != -100
    expected_z = c * torch.logsumexp(logits[keep], dim=-1).square().mean()
    torch.testing.assert_close(out.z_loss, expected_z)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits.view(-1, 17), targets.view(-1)) + expected_z)


def test_all_ignored_gives_zero_not_nan():
    logits = torch.randn(4, 9, requires_grad=True)
    out = cross_entropy(logits, torch.full((4,), -100), z_loss=1e-3)
    assert out.loss.item() == 0.0 and out.tokens.item() == 0
    out.loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="label_smoothing="):
        cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction="):
        chunked_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), torch.zeros(2, dtype=torch.long), reduction="none")
    with pytest.raises(ValueError, match="targets"):
        cross_entropy(torch.randn(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size="):
        chunked_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), torch.zeros(2, dtype=torch.long), chunk_size=0)


def _plain(hidden, weight, targets, softcap=None, **kw):
    """The reference path: the full logits, then cross entropy (Transformer.logits does the same softcap)."""
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return cross_entropy(logits, targets, **kw)


CHUNK_CASES = {
    # name: (B, T, D, V, chunk_size, kwargs)
    "plain": (2, 9, 16, 50, 4, {}),
    "uneven_chunks": (3, 7, 8, 33, 5, {"label_smoothing": 0.1}),
    "one_chunk": (1, 6, 8, 20, 64, {"z_loss": 1e-2}),
    "chunk_of_one": (2, 3, 4, 10, 1, {"label_smoothing": 0.2, "z_loss": 1e-3}),
    "softcap": (2, 8, 16, 40, 3, {"softcap": 2.0}),
    "everything": (2, 10, 12, 64, 7, {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 5.0, "reduction": "sum"}),
    "ignore_7": (2, 10, 12, 30, 6, {"ignore_index": 7}),
}


@pytest.mark.parametrize("name", sorted(CHUNK_CASES))
def test_chunked_equals_plain(name):
    B, T, D, V, chunk, kw = CHUNK_CASES[name]
    torch.manual_seed(0)
    hidden = torch.randn(B, T, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    targets = _targets((B, T), V, kw.get("ignore_index", -100))
    ref = _plain(hidden, weight, targets, **kw)
    out = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk, **kw)
    for field in ("loss", "ce", "z_loss", "tokens"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field))
    grads_ref = torch.autograd.grad(2.5 * ref.loss, (hidden, weight))  # upstream gradient 2.5
    grads = torch.autograd.grad(2.5 * out.loss, (hidden, weight))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape
        torch.testing.assert_close(g, g_ref)


def test_chunked_gradients_against_finite_differences():
    """float64 gradcheck: the hand-written gradient (smoothing, z-loss, softcap, ignored tokens)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    targets = _targets((2, 5), 13)

    def f(h, w):
        return chunked_cross_entropy(h, w, targets, chunk_size=3, label_smoothing=0.1, z_loss=0.05, softcap=3.0).loss

    assert torch.autograd.gradcheck(f, (hidden, weight))


def test_chunked_without_grad_and_with_one_input_frozen():
    torch.manual_seed(0)
    hidden, weight = torch.randn(4, 5, 8), torch.randn(30, 8)
    targets = _targets((4, 5), 30)
    ref = _plain(hidden, weight, targets, z_loss=1e-2).loss
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets, 3, z_loss=1e-2).loss, ref)
    weight.requires_grad_()  # a frozen trunk: only the head trains
    out = chunked_cross_entropy(hidden, weight, targets, 3, z_loss=1e-2)
    (g,) = torch.autograd.grad(out.loss, weight)
    (g_ref,) = torch.autograd.grad(_plain(hidden, weight, targets, z_loss=1e-2).loss, weight)
    torch.testing.assert_close(g, g_ref)
    weight.requires_grad_(False)
    hidden.requires_grad_()  # a frozen head (LoRA): its (V, D) gradient is never computed
    out = chunked_cross_entropy(hidden, weight, targets, 3, z_loss=1e-2)
    (g,) = torch.autograd.grad(out.loss, hidden)
    (g_ref,) = torch.autograd.grad(_plain(hidden, weight, targets, z_loss=1e-2).loss, hidden)
    torch.testing.assert_close(g, g_ref)
    assert weight.grad is None


def test_chunked_bf16_inputs_give_bf16_grads():
    torch.manual_seed(0)
    hidden = torch.randn(3, 8, 16).bfloat16().requires_grad_()
    weight = torch.randn(50, 16).bfloat16().requires_grad_()
    targets = _targets((3, 8), 50)
    out = chunked_cross_entropy(hidden, weight, targets, chunk_size=5, z_loss=1e-3)
    out.loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = _plain(h32, w32, targets, z_loss=1e-3)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)  # computed in float32 from the same bf16 values
    torch.testing.assert_close(hidden.grad.float(), h32.grad, atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(weight.grad.float(), w32.grad, atol=1e-3, rtol=1e-2)


def test_chunked_through_a_transformer_with_final_softcap():
    """Every parameter's gradient equals the plain `model(ids)` -> cross_entropy path (tied embeddings too)."""
    cfg = ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        max_seq_len=16,
        final_softcap=3.0,
        tie_embeddings=True,
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, 97, (2, 12))
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    params = list(model.parameters())
    ref = cross_entropy(model(ids), targets, label_smoothing=0.1)
    grads_ref = torch.autograd.grad(ref.loss, params)
    h = model.hidden_states(ids)
    out = chunked_cross_entropy(h, model.head_weight, targets, 5, label_smoothing=0.1, softcap=cfg.final_softcap)
    grads = torch.autograd.grad(out.loss, params)
    torch.testing.assert_close(out.loss, ref.loss)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-4)


PEAK_SCRIPT = textwrap.dedent(
    """
    import gc, sys, torch
    from lmforge.train.loss import chunked_cross_entropy, cross_entropy

    def status(field):  # kB figures from /proc/self/status
        line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    def step(n, V, D):
        torch.manual_seed(0)
        h = torch.randn(n, D, requires_grad=True)
        w = (0.1 * torch.randn(V, D)).requires_grad_()
        t = torch.randint(0, V, (n,))
        gc.collect()
        before = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        if sys.argv[1] == "chunked":
            loss = chunked_cross_entropy(h, w, t, chunk_size=128, z_loss=1e-4).loss
        else:
            loss = cross_entropy(h @ w.t(), t, z_loss=1e-4).loss
        loss.backward()
        return status("VmHWM") - before

    step(256, 1024, 64)  # first pass: library code and kernels are paged in
    print(step(int(sys.argv[2]), 32768, 64))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_chunked_peak_memory_is_lower():
    """N = 2048 tokens, V = 32768: the full fp32 logits are 256 MB."""
    n = 2048
    growth = {}
    for path in ("plain", "chunked"):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, path, str(n)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        growth[path] = int(out.stdout)
    logits = n * 32768 * 4
    # measured: plain grows 1.35 GB (5.0x the logits), chunked 61 MB (0.23x); at n = 4096: 2.69 GB vs 96 MB
    assert growth["plain"] > 2 * logits, growth
    assert growth["chunked"] < 0.25 * growth["plain"], growth


def _moe_model(aux_coef: float, z_coef: float) -> Transformer:
    moe = MoEConfig(n_experts=4, top_k=2, d_expert=16, aux_loss_coef=aux_coef, z_loss_coef=z_coef)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16, moe=moe)
    torch.manual_seed(0)
    return Transformer(cfg)


def test_moe_aux_losses_reach_the_router():
    """grad(total) = grad(ce) + a grad(aux) + b grad(router z), and the aux terms do move the router."""
    a, b = 0.01, 0.001
    model = _moe_model(a, b)
    routers = [blk.mlp.router.weight for blk in model.blocks]
    ids = torch.randint(0, 64, (2, 10))
    ce = cross_entropy(model(ids)[:, :-1], ids[:, 1:]).loss
    aux = model.aux_losses()
    assert set(aux) == {"aux_loss", "z_loss"}
    coefs = moe_loss_coefs(model.config)
    assert coefs == {"aux_loss": a, "z_loss": b}
    total = total_loss(ce, aux, coefs)
    parts = [torch.autograd.grad(x, routers, retain_graph=True) for x in (total, ce, aux["aux_loss"], aux["z_loss"])]
    for g_total, g_ce, g_aux, g_z in zip(*parts, strict=True):
        assert g_aux.abs().sum() > 0 and g_z.abs().sum() > 0
        torch.testing.assert_close(g_total, g_ce + a * g_aux + b * g_z)
    torch.testing.assert_close(total, ce + a * aux["aux_loss"] + b * aux["z_loss"])


def test_total_loss_plumbing():
    lm = torch.tensor(2.0, requires_grad=True)
    assert total_loss(lm, {}, {}) is lm  # a dense model has no auxiliary losses
    assert total_loss(lm, {"aux_loss": torch.tensor(5.0)}, {"aux_loss": 0.0}) is lm  # coefficient 0: left out
    assert moe_loss_coefs(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=48)) == {}
    with pytest.raises(KeyError, match="z_loss"):
        total_loss(lm, {"z_loss": torch.tensor(1.0)}, {"aux_loss": 0.01})
