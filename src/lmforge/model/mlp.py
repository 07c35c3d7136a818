"""Position-wise feed-forward networks.

Plain (GPT-2):        y = W_down · act(W_up · x + b_up) + b_down,   act = GELU (exact or tanh)
Gated (Shazeer 2020): y = W_down · (act(W_gate · x) ⊙ W_up · x)
    SwiGLU: act = SiLU (Llama, Mistral, Qwen, DeepSeek)
    GeGLU:  act = GELU-tanh (Gemma), or exact GELU ("geglu_exact")

GELU-tanh is the approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

Hook points (model/hookpoints.py, TransformerLens's names): "hook_pre" the pre-activation (W_up x + b_up, or
W_gate x when gated), "hook_pre_linear" W_up x (gated only), "hook_post" the hidden layer W_down reads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from lmforge.model.hookpoints import Tap

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
    "geglu_exact": F.gelu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def is_gated(kind: str) -> bool:
    return kind in ("swiglu", "geglu", "geglu_exact")


class MLP(nn.Module):
    tap: Tap | None = None

    def __init__(self, d_model: int, d_ff: int, kind: str = "swiglu", bias: bool = False) -> None:
        super().__init__()
        self.act = ACTIVATIONS[kind]
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias) if is_gated(kind) else None
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tap = self.tap
        pre = self.up_proj(x) if self.gate_proj is None else self.gate_proj(x)
        if tap is not None:
            pre = tap("hook_pre", pre)
        hidden = self.act(pre)
        if self.gate_proj is not None:
            linear = self.up_proj(x)
            hidden = hidden * (linear if tap is None else tap("hook_pre_linear", linear))
        if tap is not None:
            hidden = tap("hook_post", hidden)
        return self.down_proj(hidden)
