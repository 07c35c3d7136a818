"""The Transformer: wiring only. Each technique lives in its own module.

h_0 = embed(ids) [· sqrt(d) for Gemma] [+ absolute positions]
per block (pre-norm; Gemma 2 adds the bracketed post-norms):
    h = h + [post_attn_norm](attn(attn_norm(h)))
    h = h + [post_mlp_norm](mlp(mlp_norm(h)))       mlp: dense MLP or mixture of experts
logits = head(norm(h_L)) [soft-capped: c · tanh(logits / c)]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from lmforge.config import ModelConfig
from lmforge.infer.kv_cache import KVCache
from lmforge.model.attention import Attention, AttentionInputs, build_mask
from lmforge.model.mlp import MLP
from lmforge.model.norm import make_norm
from lmforge.model.position import alibi_bias, rope_cos_sin, sinusoidal_embedding


def _make_attention(cfg: ModelConfig, i: int) -> nn.Module:
    if cfg.mla is not None:
        from lmforge.model.mla import LatentAttention

        return LatentAttention(cfg, i)
    return Attention(cfg, i)


def _make_mlp(cfg: ModelConfig, i: int) -> nn.Module:
    if cfg.is_moe_layer(i):
        from lmforge.model.moe import MoE

        return MoE(cfg)
    return MLP(cfg.d_model, cfg.d_ff, cfg.mlp, cfg.mlp_bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int) -> None:
        super().__init__()

        def norm() -> nn.Module:
            return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset)

        self.attn_norm, self.attn = norm(), _make_attention(cfg, i)
        self.mlp_norm, self.mlp = norm(), _make_mlp(cfg, i)
        self.post_attn_norm = norm() if cfg.post_norms else None
        self.post_mlp_norm = norm() if cfg.post_norms else None

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), inputs)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.activation_checkpointing = False  # training: keep only block inputs, recompute the rest in backward
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: matrices N(0, 0.02), residual output projections N(0, 0.02/sqrt(2L)),
        biases 0, norms untouched."""
        out_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual_out = name.endswith(("o_proj.weight", "down_proj.weight", "w_down"))
                nn.init.normal_(p, 0.0, out_std if residual_out else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        if self.config.pad_token_id is not None:
            with torch.no_grad():
                self.embed.weight[self.config.pad_token_id].zero_()

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for `input_ids` (B, T).

        attention_mask: (B, T) or, with a cache, (B, past + T); 1 for real tokens, 0 for padding.
        position_ids default to the count of real tokens before each one, so left padding is invisible.
        cache: a `KVCache`; the new tokens are appended to it.
        """
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids, cache))

    def logits(self, h: torch.Tensor, linear: Callable[..., torch.Tensor] = nn.functional.linear) -> torch.Tensor:
        """Vocabulary logits of final-normed states `h`; `linear(h, W)` computes h @ W^T (the static decoder
        passes its matrix-vector form)."""
        logits = linear(h, self.head_weight)
        cap = self.config.final_softcap
        return cap * torch.tanh(logits / cap) if cap is not None else logits

    def embed_tokens(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (scaled, for Gemma), plus learned or sinusoidal position embeddings."""
        cfg = self.config
        x = self.embed(input_ids)
        if cfg.embed_scale:
            x = x * torch.tensor(cfg.d_model**0.5, dtype=x.dtype)
        if cfg.position == "learned":
            x = x + self.pos_embed(position_ids)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_embedding(position_ids, cfg.d_model).to(x.dtype)
        return x

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states (B, T, d_model)."""
        cfg = self.config
        b, t = input_ids.shape
        if input_ids.dtype not in (torch.long, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        past = 0 if cache is None else cache.length
        valid_new = None
        if attention_mask is not None:
            if attention_mask.shape[-1] not in (t, past + t):
                raise ValueError(f"attention_mask has {attention_mask.shape[-1]} columns; expected {t} or {past + t}")
            valid_new = attention_mask[:, -t:].bool()
        if cache is not None:
            cache.reserve(b, t, input_ids.device)
            if valid_new is None:
                valid_new = torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        if position_ids is None:
            start = cache.next_pos[:, None] if cache is not None else 0
            if valid_new is None:
                position_ids = torch.arange(t, device=input_ids.device).expand(b, t) + start
            else:
                position_ids = (start + valid_new.long().cumsum(-1) - 1).clamp(min=0)
        key_valid = None
        if cache is not None:
            key_valid = torch.cat((cache.valid[:, :past], valid_new), dim=1)
            if bool(key_valid.all()):
                key_valid = None
        elif valid_new is not None and not bool(valid_new.all()):
            key_valid = valid_new

        x = self.embed_tokens(input_ids, position_ids)
        q_slots = torch.arange(past, past + t, device=x.device)
        k_slots = torch.arange(past + t, device=x.device)
        inputs = AttentionInputs(cache=cache)
        if cfg.position == "rope":
            inputs.cos, inputs.sin = rope_cos_sin(cfg, position_ids)
        elif cfg.position == "alibi":
            inputs.alibi = alibi_bias(cfg.n_heads, q_slots, k_slots).to(x.dtype)
        for kind in {cfg.layer_type(i) for i in range(cfg.n_layers)}:
            window = cfg.sliding_window if kind == "sliding" else None
            plain = key_valid is None and (t == 1 or past == 0) and (window is None or past + t <= window)
            inputs.masks[kind] = None if plain else build_mask(q_slots, k_slots, key_valid, window)

        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():  # recompute the block in backward
                x = torch.utils.checkpoint.checkpoint(block, x, inputs, use_reentrant=False)
            else:
                x = block(x, inputs)
        if cache is not None:
            cache.advance(valid_new, position_ids)
        return self.norm(x)

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """MoE load-balancing and router z-losses of the last forward, summed over layers."""
        moes = [b.mlp for b in self.blocks if hasattr(b.mlp, "aux_loss")]
        if not moes:
            return {}
        return {"aux_loss": sum(m.aux_loss for m in moes), "z_loss": sum(m.z_loss for m in moes)}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
