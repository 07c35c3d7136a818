"""Spherical linear interpolation (SLERP) between two models, one tensor at a time (Shoemake 1985).

Each tensor is flattened to a vector; with u = v0 / |v0|, w = v1 / |v1| and the angle theta = acos(u . w):

    slerp(t; v0, v1) = sin((1 - t) theta) / sin(theta) * v0  +  sin(t theta) / sin(theta) * v1

t = 0 gives v0 (the base model), t = 1 gives v1. When the two are (anti)colinear, |u . w| > 0.9995, sin(theta)
vanishes and the rule falls back to the linear interpolation (1 - t) v0 + t v1 (mergekit's `dot_threshold`).
A norm below eps = 1e-8 counts as 1 (a zero tensor is not normalised).

`t` may differ per tensor: in a mergekit YAML it is a gradient list (`t: [0, 0.5, 1]` spread over the layers,
optionally per `filter: self_attn`), resolved by `merge.config`. The arithmetic is mergekit's: float32 (float64
for float64 inputs), norms and dot product accumulated over chunks of 2^20 elements, so results are bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from lmforge.merge.linear import work_dtype

DOT_THRESHOLD = 0.9995
CHUNK = 1024 * 1024  # elements per chunk: bounds the float32 scratch of a large bf16 tensor


def _chunks(a: Tensor, b: Tensor, dtype: torch.dtype) -> Iterator[tuple[slice, Tensor, Tensor]]:
    for start in range(0, a.shape[1], CHUNK):
        cols = slice(start, start + CHUNK)
        yield cols, a[:, cols].to(dtype), b[:, cols].to(dtype)


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = DOT_THRESHOLD, eps: float = 1e-8) -> Tensor:
    """Interpolate from `v0` (t=0) to `v1` (t=1) along the great circle; same shape and dtype as `v0`."""
    dtype = work_dtype(v0)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([t], dtype=dtype).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    norms_a, norms_b = [], []
    for _, x, y in _chunks(a, b, dtype):
        norms_a.append(torch.linalg.vector_norm(x, dim=1, keepdim=True))
        norms_b.append(torch.linalg.vector_norm(y, dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(norms_a), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norms_b), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([(x / norm_a * (y / norm_b)).sum(dim=1, keepdim=True) for _, x, y in _chunks(a, b, dtype)])
    dot = dot.sum(dim=0).clamp(-1, 1)
    colinear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(colinear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(colinear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(colinear, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)
    for cols, x, y in _chunks(a, b, dtype):
        result[:, cols] = coef_a * x + coef_b * y
    return result.reshape(v0.shape)
