"""Causal self-attention: MHA, GQA and MQA, with the variants modern models use.

    Attention(Q, K, V) = softmax(s · Q K^T + B + M) V

s is the softmax scale (1/sqrt(d) by default), B an optional additive bias
(ALiBi), M the mask (0 where allowed, -inf elsewhere). With n_kv < n_heads key/value
heads, each group of n_heads / n_kv query heads shares one K/V head: GQA
(Ainslie et al., 2023), with MQA the case n_kv = 1 (Shazeer, 2019).

Variants:
  - q/k/v biases (Qwen 2, GPT-2) and an output bias;
  - QK-norm: RMSNorm over each head of q and k before RoPE (Qwen 3);
  - sliding window: query i sees keys j with i - W < j <= i (Mistral; Gemma 2 on every other layer);
  - logit soft-capping: logits <- c · tanh(logits / c) (Gemma 2).

Two backends compute the same thing: "eager" writes the equation out (the
reference, and the only one that soft-caps) and "sdpa" calls
torch.nn.functional.scaled_dot_product_attention (fused kernels).

Hook points (model/hookpoints.py; TransformerLens's names and layouts; B batch, T positions, H heads):
hook_q (B, T, H, D) and hook_k, hook_v (B, T, Hkv, D) after the projections, hook_rot_q / hook_rot_k after
RoPE, hook_attn_scores (B, H, Tq, Tk) the masked logits (-inf where masked), hook_pattern their softmax,
hook_z (B, T, H, Dv) each head's output, and hook_result (B, T, H, d_model) each head's share of the output
projection, result_h = z_h W_O[:, h]^T (the output is sum_h result_h + b_O). The scores and pattern exist only
on the eager path: a hook on them makes the layer compute its softmax explicitly; otherwise it keeps its backend.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from lmforge.config import ModelConfig
from lmforge.model.cache import AttentionInputs
from lmforge.model.hookpoints import Tap
from lmforge.model.norm import RMSNorm
from lmforge.model.position import apply_rope
from lmforge.model.runtime import RuntimeOptions


def build_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    key_valid: torch.Tensor | None,
    window: int | None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask (B or 1, 1, Tq, Tk), True where query i may attend key j, from their positions (Tq,) or
    (B, Tq) and (Tk,) or (B, Tk): p_j <= p_i, p_i - p_j < window, key j holds a real token, and, for packed rows
    (`doc_ids` (B, T), queries and keys the same tokens), both lie in one document. A query that may see no key
    (padding) sees the keys at its own position instead, or else every key, so no softmax row is empty (its output
    is ignored)."""
    i, j = q_pos[..., :, None], k_pos[..., None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    if allowed.dim() == 2:
        allowed = allowed[None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    allowed = allowed | (~allowed.any(-1, keepdim=True) & (i == j))
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "sdpa",
    gqa: bool | None = None,
) -> torch.Tensor:
    """q (B, H, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv) -> (B, H, Tq, Dv).

    `mask` None means causal with Tq == Tk, or a single query that sees every key. `gqa`: whether Hkv < H, when
    the caller knows it as a constant (None: from the shapes, which torch.compile may have made symbolic after a
    second model's sizes: SDPA refuses a symbolic `enable_gqa`)."""
    causal = mask is None and q.shape[-2] > 1
    if backend == "sdpa" and softcap is None:
        attn_mask = mask
        if bias is not None:
            attn_mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
            if causal:
                attn_mask = attn_mask + _causal_bias(q.shape[-2], k.shape[-2], q.device)
                causal = False
        gqa = q.shape[1] != k.shape[1] if gqa is None else gqa
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale, enable_gqa=gqa
        )
    probs = torch.softmax(attention_scores(q, k, mask, scale, softcap, bias), dim=-1, dtype=torch.float32)
    return probs.to(q.dtype) @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits the softmax of `attend` normalises, (B, H, Tq, Tk): s · q k^T [soft-capped] [+ bias], -inf
    where the mask (None: causal, lower-right aligned) forbids."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if bias is not None:
        logits = logits + bias
    if mask is None:
        if q.shape[-2] > 1:
            logits = logits + _causal_bias(q.shape[-2], k.shape[-2], q.device)
    else:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits


def _causal_bias(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """0 on and below the (lower-right aligned) diagonal, -inf above."""
    return torch.full((tq, tk), float("-inf"), device=device).triu(tk - tq + 1)


class Attention(nn.Module):
    tap: Tap | None = None

    def __init__(self, cfg: ModelConfig, layer_idx: int, runtime: RuntimeOptions | None = None) -> None:
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.runtime = RuntimeOptions() if runtime is None else runtime  # shared with the model: attn_backend
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_head
        self.q_proj = nn.Linear(d, h * hd, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(d, kv * hd, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(h * hd, d, bias=cfg.attn_out_bias)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.layer_type = cfg.layer_type(layer_idx)
        self.gqa = kv != h  # a constant for torch.compile (bools are not made symbolic; head counts may be)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        cfg, tap = self.cfg, self.tap
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, cfg.n_heads, cfg.dim_head)
        k = self.k_proj(x).view(b, t, cfg.kv_heads, cfg.dim_head)
        v = self.v_proj(x).view(b, t, cfg.kv_heads, cfg.dim_head)
        if tap is not None:
            q, k, v = tap("hook_q", q), tap("hook_k", k), tap("hook_v", v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if inputs.cos is not None:
            q = apply_rope(q, inputs.cos, inputs.sin, cfg.rope_layout)
            k = apply_rope(k, inputs.cos, inputs.sin, cfg.rope_layout)
            if tap is not None:
                q = tap("hook_rot_q", q.transpose(1, 2)).transpose(1, 2)
                k = tap("hook_rot_k", k.transpose(1, 2)).transpose(1, 2)
        z = inputs.attend(self.layer_idx, self.layer_type, q, (k, v), partial(self._attend, inputs.alibi))
        z = z.transpose(1, 2)
        if tap is None:
            return self.o_proj(z.reshape(b, t, -1))
        z = tap("hook_z", z)
        if "hook_result" not in tap:
            return self.o_proj(z.reshape(b, t, -1))
        if type(self.o_proj) is not nn.Linear:
            raise TypeError(f"hook_result needs a plain nn.Linear o_proj, layer {self.layer_idx} has "
                            f"{type(self.o_proj).__name__}")  # fmt: skip
        w_o = self.o_proj.weight.view(cfg.d_model, cfg.n_heads, -1)
        result = tap("hook_result", torch.einsum("bthd,mhd->bthm", z, w_o))
        out = result.sum(2)
        return out if self.o_proj.bias is None else out + self.o_proj.bias

    def _attend(
        self, bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        cfg, tap = self.cfg, self.tap
        if tap is None or ("hook_attn_scores" not in tap and "hook_pattern" not in tap):
            return attend(q, k, v, mask, cfg.softmax_scale, cfg.attn_softcap, bias, self.runtime.attn_backend, self.gqa)
        scores = tap("hook_attn_scores", attention_scores(q, k, mask, cfg.softmax_scale, cfg.attn_softcap, bias))
        pattern = tap("hook_pattern", torch.softmax(scores, dim=-1, dtype=torch.float32))
        return pattern.to(q.dtype) @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
