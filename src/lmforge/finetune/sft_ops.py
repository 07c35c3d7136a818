"""Pure tensor helpers of fine-tuning and preference training: per-token log-probabilities and entropies, and
sums, means and whitening over the entries a mask selects.

With logits z (..., V) over a vocabulary of V tokens and p = softmax(z):

    token_logprobs(z, y)[i] = log p_i(y_i) = z_i[y_i] - logsumexp(z_i)     (0 where y_i == ignore_index)
    token_entropy(z)[i]     = H(p_i) = -sum_v p_iv log p_iv                 (terms with p_iv = 0 count 0)

both computed in float32 whatever the logits' dtype (bf16 logits give float32 results), over chunks of rows so
that the float32 temporaries never exceed about `CHUNK_ELEMENTS` entries (the (N, V) float32 copy of bf16
logits is never built whole when no gradient is needed; with autograd each chunk's saved tensors remain).
`token_logprobs` equals ``-cross_entropy(z, y, reduction="none")`` and `token_entropy` equals
``Categorical(logits=z).entropy()``; they take labels already aligned with the logits (the batch's "targets").

Masks select the entries where they are nonzero (bool or 0/1 of any dtype, broadcast against x). With
n = the number of selected entries (over `dim`, or all of them when dim is None):

    masked_sum(x, m)        = sum_{m != 0} x                   (unselected entries never enter: nan there is fine)
    masked_mean(x, m)       = masked_sum(x, m) / n,            0 when n = 0 (not TRL's nan: an all-masked
                                                               micro-batch gives a zero loss, not a nan one)
    masked_var(x, m)        = masked_mean((x - mean)^2, m) * n / (n - 1)   (unbiased, Bessel; ValueError when
                                                               n < 2; unbiased=False drops the factor)
    masked_normalize(x, m)  = (x - mean) * rsqrt(var + eps)    (+ mean again when shift_mean=False)

`masked_normalize` is TRL's ``masked_whiten`` (trl/core.py, later trl/trainer/utils.py: unbiased variance,
eps = 1e-8, ``shift_mean``), with a `dim` for per-row statistics. As there, the statistics come from the
selected entries but the map is applied to every entry; mask the result when the others matter.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "CHUNK_ELEMENTS",
    "masked_mean",
    "masked_normalize",
    "masked_sum",
    "masked_var",
    "token_entropy",
    "token_logprobs",
]

CHUNK_ELEMENTS = 1 << 25  # float32 entries of one chunk of logits rows (128 MiB)


def _row_chunks(logits: Tensor) -> tuple[Tensor, int]:
    """The logits as (N, V) rows and the number of rows per chunk."""
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary axis last, got shape {tuple(logits.shape)}")
    flat = logits.reshape(-1, logits.shape[-1])
    return flat, max(1, CHUNK_ELEMENTS // flat.shape[1])


def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """log softmax(logits)[label] per position, float32, of labels' shape (logits (..., V), labels (...));
    0 where the label is `ignore_index`."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: expected (..., V) and (...)")
    flat, rows = _row_chunks(logits)
    flat_labels = labels.reshape(-1)
    keep = flat_labels != ignore_index
    safe = torch.where(keep, flat_labels, 0).unsqueeze(-1)
    parts = []
    for s in range(0, flat.shape[0], rows):
        z = flat[s : s + rows].float()
        parts.append(z.gather(-1, safe[s : s + rows]).squeeze(-1) - torch.logsumexp(z, dim=-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return torch.where(keep, out, 0.0).reshape(labels.shape)


def token_entropy(logits: Tensor) -> Tensor:
    """-sum p log p of softmax(logits) over the last axis, float32, of shape logits.shape[:-1]."""
    flat, rows = _row_chunks(logits)
    parts = []
    for s in range(0, flat.shape[0], rows):
        logp = torch.log_softmax(flat[s : s + rows].float(), dim=-1)
        p = logp.exp()
        parts.append(-(p * logp.masked_fill(p == 0, 0.0)).sum(-1))  # 0 log 0 = 0, also for -inf logits
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return out.reshape(logits.shape[:-1])


def _selected(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """x and the mask as bool, broadcast to one shape."""
    return torch.broadcast_tensors(x, mask.to(device=x.device) != 0)


def _sum(x: Tensor, dim: int | tuple[int, ...] | None, keepdim: bool) -> Tensor:
    return x.sum() if dim is None else x.sum(dim=dim, keepdim=keepdim)


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> Tensor:
    """Sum of the entries of x where mask != 0 (over `dim`, or all)."""
    x, m = _selected(x, mask)
    return _sum(torch.where(m, x, 0), dim, keepdim)


def _count(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None, keepdim: bool) -> Tensor:
    x, m = _selected(x, mask)
    return _sum(m.to(x.dtype if x.is_floating_point() else torch.float32), dim, keepdim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> Tensor:
    """Mean of the entries of x where mask != 0 (over `dim`, or all); 0 where no entry is selected."""
    return masked_sum(x, mask, dim, keepdim) / _count(x, mask, dim, keepdim).clamp(min=1)


def masked_var(
    x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False, *, unbiased: bool = True
) -> Tensor:
    """Variance of the selected entries (over `dim`, or all); unbiased (n / (n - 1), TRL's masked_var) needs
    n >= 2 selected entries in every slice (ValueError otherwise)."""
    mean = masked_mean(x, mask, dim, keepdim=True)
    var = masked_mean((x - mean) ** 2, mask, dim, keepdim)
    if unbiased:
        n = _count(x, mask, dim, keepdim)
        if bool((n < 2).any()):
            raise ValueError(f"masked_var: unbiased variance needs at least 2 selected entries, got {int(n.min())}")
        var = var * (n / (n - 1))
    return var


def masked_normalize(
    x: Tensor,
    mask: Tensor,
    dim: int | tuple[int, ...] | None = None,
    *,
    eps: float = 1e-8,
    unbiased: bool = True,
    shift_mean: bool = True,
) -> Tensor:
    """TRL's masked_whiten: (x - mean) * rsqrt(var + eps) with the selected entries' mean and (unbiased) variance,
    applied to every entry, x's shape; shift_mean=False adds the mean back."""
    mean = masked_mean(x, mask, dim, keepdim=True)
    var = masked_var(x, mask, dim, keepdim=True, unbiased=unbiased)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean
