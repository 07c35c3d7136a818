"""Multi-head latent attention (MLA), DeepSeek-V2 (2024) and DeepSeek-V3.

MLA caches a small latent per token instead of full per-head keys and values.
For x (B, T, d) and H heads, with n = qk_nope_head_dim, r = qk_rope_head_dim,
dv = v_head_dim, c = kv_lora_rank:

    queries   c_q = RMSNorm(W_dq x),  q = W_uq c_q           (low rank, q_lora_rank set)
              q = W_q x                                      (full rank, q_lora_rank None)
              q = [q_nope; RoPE(q_pe)]                       per head: n + r channels
    latent    [c_kv; k_pe] = W_dkv x,  c_kv <- RMSNorm(c_kv)   c_kv: c numbers per token
              k_pe = RoPE(k_pe)                              r numbers, one key shared by all heads
    per head  k_nope = W_uk c_kv,  v = W_uv c_kv,  k = [k_nope; k_pe]
    output    o = W_o concat_h softmax(s · q k^T + M) v

Latent cache: only c_kv and the roped k_pe depend on the token, so a cache
holds (c + r) numbers per token and layer instead of 2·H·head_dim: for
DeepSeek-V3, 512 + 64 = 576 against 2·128·192 = 49152.

Absorbed form (inference): W_uk and W_uv fold into the query and the output,
    s_ij = (W_uk^T q_nope_i) · c_kv_j + q_pe_i · k_pe_j
    o_i  = W_uv (sum_j p_ij c_kv_j)
so attention runs over the cached latent directly: MQA with a single shared
"head" whose key is [c_kv; k_pe] (c + r channels) and whose value is c_kv.
Both forms compute the same function; `RuntimeOptions.mla_absorb` picks one, by default the absorbed form when
attending over a cache without gradients (decoding then never re-expands the cached latent), the expanded one
otherwise (training: the per-head matrices are cheaper than the latent's c + r channels per head).

RoPE pairs channels 2i, 2i+1 (rope_layout "interleaved"; DeepSeek-V2 multiplies
complex numbers, V3's rope_interleave rotates the same pairs). Parameter names
are those of the Hugging Face DeepSeek checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model.attention import attend
from lmforge.model.cache import AttentionInputs
from lmforge.model.norm import RMSNorm
from lmforge.model.position import apply_rope
from lmforge.model.runtime import RuntimeOptions

# DeepSeek builds q_a_layernorm and kv_a_layernorm with the default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, runtime: RuntimeOptions | None = None) -> None:
        super().__init__()
        if cfg.mla is None:
            raise ValueError("LatentAttention needs cfg.mla")
        self.cfg, self.layer_idx = cfg, layer_idx
        self.runtime = RuntimeOptions() if runtime is None else runtime  # shared with the model: backend, absorb
        self.layer_type = cfg.layer_type(layer_idx)
        m, d, h = cfg.mla, cfg.d_model, cfg.n_heads
        qk_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, m.q_lora_rank, bias=cfg.attn_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(m.q_lora_rank, h * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, m.kv_lora_rank + m.qk_rope_head_dim, bias=cfg.attn_bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * m.v_head_dim, d, bias=cfg.attn_out_bias)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.mla.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        cfg, m = self.cfg, self.cfg.mla
        b, t, _ = x.shape
        q = self._query(x).view(b, t, cfg.n_heads, -1).transpose(1, 2)  # (B, H, T, n + r)
        q_nope, q_pe = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, c)
        q_pe = apply_rope(q_pe, inputs.cos, inputs.sin, cfg.rope_layout)
        k_pe = apply_rope(k_pe[:, None], inputs.cos, inputs.sin, cfg.rope_layout)[:, 0]  # (B, T, r)
        if self.absorbs(inputs):
            q, fn = torch.cat((q_nope @ self._split_kv_b()[0], q_pe), dim=-1), self._absorbed  # (B, H, T, c + r)
        else:
            q, fn = torch.cat((q_nope, q_pe), dim=-1), self._expanded
        out = inputs.attend(self.layer_idx, self.layer_type, q, (c_kv, k_pe), fn)  # the latent is what is stored
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def absorbs(self, inputs: AttentionInputs) -> bool:
        """Whether this call runs the absorbed form: `runtime.mla_absorb`, or by default when decoding over a cache."""
        if self.runtime.mla_absorb is not None:
            return self.runtime.mla_absorb
        return inputs.cache is not None and not torch.is_grad_enabled()

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        return attend(q, k, v, mask, cfg.softmax_scale, cfg.attn_softcap, None, self.runtime.attn_backend)

    def _split_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk (H, n, c) and W_uv (H, dv, c): the rows of kv_b_proj that expand the latent into keys and values."""
        m, h = self.cfg.mla, self.cfg.n_heads
        w = self.kv_b_proj.weight.view(h, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        return w.split([m.qk_nope_head_dim, m.v_head_dim], dim=1)

    def _expanded(
        self, q: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Expand the latent into per-head keys and values: ordinary multi-head attention. q (B, H, T, n + r)."""
        m, h = self.cfg.mla, self.cfg.n_heads
        b, s, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(b, s, h, -1).transpose(1, 2)  # (B, H, S, n + dv)
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, None].expand(-1, h, -1, -1)), dim=-1)
        return self._attend(q, k, v, mask)  # (B, H, T, dv)

    def _absorbed(
        self, q: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attend over the latent (MQA) with W_uk folded into q (B, H, T, c + r), then apply W_uv to the output."""
        k = torch.cat((c_kv, k_pe), dim=-1)[:, None]  # (B, 1, S, c + r)
        latent_out = self._attend(q, k, c_kv[:, None], mask)  # (B, H, T, c)
        return latent_out @ self._split_kv_b()[1].transpose(1, 2)  # (B, H, T, dv)
