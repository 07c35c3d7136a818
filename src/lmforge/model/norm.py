"""Normalisation layers.

LayerNorm (Ba et al., 2016):  y = (x - mean(x)) / sqrt(var(x) + eps) * w + b
RMSNorm (Zhang & Sennrich, 2019):  y = x / sqrt(mean(x^2) + eps) * w
Gemma's RMSNorm stores w as an offset from one:  y = x / sqrt(mean(x^2) + eps) * (1 + w)

RMSNorm computes its statistics in float32 whatever the input dtype and casts the
result back, as the reference implementations do; LayerNorm uses torch's fused kernel.

Hook point (model/hookpoints.py): "hook_normalized", the normalized input before the affine weights
(x / sqrt(mean(x^2) + eps), or (x - mean(x)) / sqrt(var(x) + eps)), as TransformerLens names it.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.hookpoints import Tap


class RMSNorm(nn.Module):
    tap: Tap | None = None

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.tap is not None:
            h = self.tap("hook_normalized", h)
        if self.unit_offset:  # Gemma multiplies in float32, then casts
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


class LayerNorm(nn.Module):
    tap: Tap | None = None

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tap is None:
            return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        h = self.tap("hook_normalized", nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps))
        return h * self.weight + self.bias


def make_norm(kind: str, dim: int, eps: float, unit_offset: bool = False) -> nn.Module:
    """The norm named by `ModelConfig.norm`."""
    if kind == "layernorm":
        return LayerNorm(dim, eps)
    return RMSNorm(dim, eps, unit_offset)
