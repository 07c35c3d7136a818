"""Training losses: cross entropy (ignore mask, label smoothing, z-loss), chunked cross entropy, MoE aux losses.

Token i has logits z_i (V,), target y_i and lse_i = log sum_v exp(z_iv). Tokens whose target is `ignore_index`
count for nothing; with n the number of the others ("tokens"), reduction "mean" divides the sums by n
(0 when n = 0, where torch gives nan), "sum" does not, "none" keeps one value per token (0 where ignored).

  cross entropy:     ce_i = lse_i - z_iy                 (= -log softmax(z_i)_y)
  label smoothing:   ce_i = (1 - eps) (lse_i - z_iy) + eps (lse_i - mean_v z_iv)
                     (the target distribution (1 - eps) onehot(y) + eps / V; as torch's `label_smoothing`)
  z-loss (PaLM):     zl_i = c lse_i^2                    keeps lse near 0 so the logits do not drift (c ~ 1e-4)
  loss               = reduce(ce_i + zl_i)
  gradient:          dloss_i / dz_i = softmax(z_i) (1 + 2 c lse_i) - (1 - eps) onehot(y_i) - eps / V

Logits are upcast to float32 (kept float64 if so) before the softmax. `LossOutput` carries the differentiable
`loss` and, detached, its parts `ce` and `z_loss` (coefficient applied) and the token count, for logging.

Chunked cross entropy (`chunked_cross_entropy`) fuses the LM head into the loss: from hidden states H (N, D) and
the head W (V, D) it computes z = softcap(H W^T) (softcap(a) = c tanh(a / c), Gemma 2; dz/da = 1 - (z / c)^2)
for C tokens at a time, and, in the same pass, the gradients of the loss w.r.t. that chunk:
  G_a = (dloss/dz) * dz/da  (C, V),   dH_chunk = G_a W  (C, D),   dW += G_a^T H_chunk  (V, D).
Only dH (N, D) and dW (V, D) — the size of the inputs — are kept for the backward, which just scales them by
the incoming gradient (the "fused linear cross entropy" of Liger-Kernel). Versus recomputing the chunk logits
in the backward, this does the three matmuls once (the same 6 N V D flops as the plain path) at the cost of
doing the gradient work in the forward; it is skipped when neither input requires a gradient.
Memory, fp32: the plain path holds the N x V logits and, in the backward, several N x V gradients (softmax,
one-hot scatter, their sum); the chunked path holds a few C x V chunk temporaries (4 C V bytes each) plus
4 (N + V) D bytes of gradients. Measured peak growth for N = 4096, V = 32768, D = 64 (logits: 512 MB), C = 128:
plain 2.69 GB (5.0x the logits), chunked 96 MB (tests/train/test_loss.py). The chunked path computes in float32
(bf16 inputs are upcast chunk by chunk; the gradients are cast back to the inputs' dtypes).

The training loop's language-model objective (train/objective.py) composes these: `cross_entropy` or
`chunked_cross_entropy` with reduction "sum", plus the MoE terms below.

MoE (see `lmforge.model.moe`): `Transformer.aux_losses()` returns the load-balancing loss and the router z-loss
summed over MoE layers, without coefficients; `total_loss(lm_loss, model.aux_losses(), moe_loss_coefs(config))`
adds  aux_loss_coef * aux + z_loss_coef * router_z  to the LM loss (the router z-loss of ST-MoE is unrelated to
the vocabulary z-loss above). Both are per-forward means, so with gradient accumulation they are scaled like the
LM loss of the same micro-batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmforge.config import ModelConfig

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class LossOutput:
    loss: Tensor  # what to backpropagate: reduce(ce + z-loss)
    ce: Tensor  # the (label-smoothed) cross-entropy part, detached
    z_loss: Tensor  # the z-loss part, coefficient applied, detached
    tokens: Tensor  # number of counted (not ignored) targets, a 0-d int64 tensor


def _check(label_smoothing: float, z_loss: float, reduction: str, allowed: tuple[str, ...] = REDUCTIONS) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"invalid label_smoothing={label_smoothing!r}: must be in [0, 1]")
    if z_loss < 0.0:
        raise ValueError(f"invalid z_loss={z_loss!r}: must be >= 0")
    if reduction not in allowed:
        raise ValueError(f"invalid reduction={reduction!r}: must be one of {', '.join(allowed)}")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64."""
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _flat_targets(targets: Tensor, n: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Targets as (n,) with ignored entries replaced by 0 (a safe index), and the (n,) mask of counted ones."""
    if targets.numel() != n:
        raise ValueError(f"targets {tuple(targets.shape)} do not match {n} tokens of logits")
    t = targets.reshape(n)
    valid = t != ignore_index
    return t.masked_fill(~valid, 0), valid


def _token_losses(
    z: Tensor, t: Tensor, valid: Tensor, label_smoothing: float, z_loss: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token ce_i and zl_i (0 where ignored), lse_i and log softmax(z_i), for float32 logits z (n, V).

    One fused log-softmax pass gives everything: ce_i = -logp_iy, lse_i = z_iy - logp_iy and
    lse_i - mean_v z_iv = -mean_v logp_iv."""
    logp = torch.log_softmax(z, dim=-1)
    logp_y = logp.gather(1, t[:, None]).squeeze(1)
    ce = -logp_y
    if label_smoothing:
        ce = (1.0 - label_smoothing) * ce - label_smoothing * logp.mean(dim=-1)
    lse = z.gather(1, t[:, None]).squeeze(1) - logp_y
    zl = z_loss * lse.square() if z_loss else torch.zeros_like(lse)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return ce.where(valid, zero), zl.where(valid, zero), lse, logp


def _output(loss: Tensor, ce: Tensor, zl: Tensor, tokens: Tensor, reduction: str) -> LossOutput:
    """Reduce summed (or per-token) terms; `loss` keeps its graph, the parts are detached."""
    if reduction == "mean":
        denom = tokens.clamp(min=1)
        loss, ce, zl = loss / denom, ce / denom, zl / denom
    return LossOutput(loss=loss, ce=ce.detach(), z_loss=zl.detach(), tokens=tokens)


def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
) -> LossOutput:
    """Cross entropy of logits (..., V) against integer targets (...), e.g. (B, T, V) and (B, T).

    The ce part equals `F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=...,
    label_smoothing=..., reduction=...)`; `z_loss` is the PaLM coefficient c (0: off)."""
    _check(label_smoothing, z_loss, reduction)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    z = z.to(_compute_dtype(z))
    t, valid = _flat_targets(targets, z.shape[0], ignore_index)
    ce, zl, _, _ = _token_losses(z, t, valid, label_smoothing, z_loss)
    tokens = valid.sum()
    if reduction == "none":
        shape = targets.shape
        return _output((ce + zl).view(shape), ce.view(shape), zl.view(shape), tokens, reduction)
    return _output((ce + zl).sum(), ce.sum(), zl.sum(), tokens, reduction)


@dataclass(frozen=True)
class _ChunkOptions:
    chunk_size: int
    label_smoothing: float
    z_loss: float
    softcap: float | None


def _chunked_pass(
    hidden: Tensor, weight: Tensor, t: Tensor, valid: Tensor, opts: _ChunkOptions, scale: Tensor, need_grad: bool,
    grad_weight: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Summed ce and z-loss over hidden (N, D) @ weight (V, D)^T, chunk by chunk; with `need_grad`, also the
    gradients of scale * (ce + zl) summed w.r.t. hidden and (unless not `grad_weight`: a frozen head, as under
    LoRA, skips that (V, D) product) weight, in float32 (float64 for float64 inputs)."""
    chunk_size, label_smoothing, z_loss, softcap = opts.chunk_size, opts.label_smoothing, opts.z_loss, opts.softcap
    N, V = hidden.shape[0], weight.shape[0]
    dtype = _compute_dtype(hidden, weight)
    w32 = weight.to(dtype)
    ce_sum = torch.zeros((), dtype=dtype, device=hidden.device)
    zl_sum = torch.zeros_like(ce_sum)
    grad_h = torch.empty(N, hidden.shape[1], dtype=dtype, device=hidden.device) if need_grad else None
    grad_w = torch.zeros_like(w32) if need_grad and grad_weight else None
    for s in range(0, N, chunk_size):
        h = hidden[s : s + chunk_size].to(dtype)
        tc, vc = t[s : s + chunk_size], valid[s : s + chunk_size]
        z = h @ w32.t()  # (C, V): the only vocab-sized tensors live here
        if softcap is not None:
            z = z.div_(softcap).tanh_()  # tanh(a / c), kept for dz/da
            tanh, z = z, z * softcap
        ce, zl, lse, logp = _token_losses(z, tc, vc, label_smoothing, z_loss)
        ce_sum += ce.sum()
        zl_sum += zl.sum()
        if not need_grad:
            continue
        del z
        w = vc.to(dtype) * scale  # per-token weight of this chunk in the loss
        g = logp.exp_()  # softmax, in place of the log-softmax
        g.mul_(((1.0 + 2.0 * z_loss * lse) * w)[:, None])
        if label_smoothing:
            g.sub_((label_smoothing / V) * w[:, None])
        g.scatter_add_(1, tc[:, None], (-(1.0 - label_smoothing) * w)[:, None])
        if softcap is not None:
            g.mul_(1.0 - tanh.square_())
        grad_h[s : s + chunk_size] = g @ w32
        if grad_w is not None:
            grad_w.addmm_(g.t(), h)
    return ce_sum, zl_sum, grad_h, grad_w


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Returns (loss, ce, z_loss) sums scaled by `scale`; the gradients are computed in the forward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: Tensor, weight: Tensor, t: Tensor, valid: Tensor, opts: _ChunkOptions, scale: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        ce, zl, grad_h, grad_w = _chunked_pass(hidden, weight, t, valid, opts, scale, need_grad=True,
                                               grad_weight=ctx.needs_input_grad[1])  # fmt: skip
        ctx.save_for_backward(grad_h.to(hidden.dtype), None if grad_w is None else grad_w.to(weight.dtype))
        ce, zl = ce * scale, zl * scale
        ctx.mark_non_differentiable(ce, zl)
        return ce + zl, ce, zl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, _grad_ce: Tensor, _grad_zl: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, None if grad_w is None else grad_w * grad_loss, None, None, None, None


def chunked_cross_entropy(
    hidden: Tensor,
    head_weight: Tensor,
    targets: Tensor,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """`cross_entropy(softcap(hidden @ head_weight^T), targets, ...)` without ever holding the (N, V) logits.

    hidden: (..., D) final-normed states (`Transformer.hidden_states`); head_weight: (V, D)
    (`Transformer.head_weight`); targets: (...); softcap: `config.final_softcap`. `chunk_size` tokens' logits
    exist at a time. Reduction "mean" or "sum"."""
    _check(label_smoothing, z_loss, reduction, allowed=("mean", "sum"))
    if chunk_size < 1:
        raise ValueError(f"invalid chunk_size={chunk_size!r}: must be >= 1")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"invalid softcap={softcap!r}: must be > 0 or None")
    D = head_weight.shape[1]
    if hidden.shape[-1] != D:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match head_weight {tuple(head_weight.shape)}")
    h = hidden.reshape(-1, D)
    t, valid = _flat_targets(targets, h.shape[0], ignore_index)
    tokens = valid.sum()
    dtype = _compute_dtype(h, head_weight)
    scale = 1.0 / tokens.clamp(min=1).to(dtype) if reduction == "mean" else torch.ones((), dtype=dtype, device=h.device)
    opts = _ChunkOptions(chunk_size, label_smoothing, z_loss, softcap)
    if torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad):
        loss, ce, zl = _ChunkedCrossEntropy.apply(h, head_weight, t, valid, opts, scale)
    else:
        ce, zl, _, _ = _chunked_pass(h, head_weight, t, valid, opts, scale, need_grad=False)
        ce, zl = ce * scale, zl * scale
        loss = ce + zl
    return LossOutput(loss=loss, ce=ce, z_loss=zl, tokens=tokens)


def moe_loss_coefs(config: ModelConfig) -> dict[str, float]:
    """The coefficients of `Transformer.aux_losses()` terms for this config ({} without MoE)."""
    m = config.moe
    return {} if m is None else {"aux_loss": m.aux_loss_coef, "z_loss": m.z_loss_coef}


def total_loss(lm_loss: Tensor, aux_losses: Mapping[str, Tensor], coefs: Mapping[str, float]) -> Tensor:
    """lm_loss + sum_k coefs[k] * aux_losses[k]; a term with coefficient 0 is left out of the graph.

    Every auxiliary loss needs a coefficient (a KeyError names one that has none), so none is dropped silently."""
    total = lm_loss
    for name, value in aux_losses.items():
        if name not in coefs:
            raise KeyError(f"auxiliary loss {name!r} has no coefficient (coefficients given: {sorted(coefs)})")
        if coefs[name]:
            total = total + coefs[name] * value
    return total
