"""The Transformer: wiring only. Each technique lives in its own module.

h_0 = embed(ids) [· sqrt(d) for Gemma] [+ absolute positions]
per block (pre-norm; Gemma 2 adds the bracketed post-norms):
    h = h + [post_attn_norm](attn(attn_norm(h)))
    h = h + [post_mlp_norm](mlp(mlp_norm(h)))       mlp: dense MLP or mixture of experts
logits = head(norm(h_L)) [soft-capped: c · tanh(logits / c)]

Hook points (model/hookpoints.py; `lmforge.interp.hooks` names them as TransformerLens does): the model's
"hook_embed" (token embeddings) and "hook_pos_embed" (learned or sinusoidal positions), and per block
"hook_resid_pre" (its input h), "hook_attn_out" (what attention adds), "hook_resid_mid", "hook_mlp_out" and
"hook_resid_post" (its output). Norms, attention and MLP have their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model.attention import Attention, build_mask
from lmforge.model.cache import AttentionInputs, Cache, KeyLayout
from lmforge.model.hookpoints import Tap
from lmforge.model.mlp import MLP
from lmforge.model.norm import make_norm
from lmforge.model.position import alibi_bias, rope_cos_sin, sinusoidal_embedding
from lmforge.model.runtime import RuntimeOptions


def _make_attention(cfg: ModelConfig, i: int, runtime: RuntimeOptions) -> nn.Module:
    if cfg.mla is not None:
        from lmforge.model.mla import LatentAttention

        return LatentAttention(cfg, i, runtime)
    return Attention(cfg, i, runtime)


def _make_mlp(cfg: ModelConfig, i: int, runtime: RuntimeOptions) -> nn.Module:
    if cfg.is_moe_layer(i):
        from lmforge.model.moe import MoE

        return MoE(cfg, runtime)
    return MLP(cfg.d_model, cfg.d_ff, cfg.mlp, cfg.mlp_bias)


class Block(nn.Module):
    tap: Tap | None = None

    def __init__(self, cfg: ModelConfig, i: int, runtime: RuntimeOptions) -> None:
        super().__init__()

        def norm() -> nn.Module:
            return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset)

        self.attn_norm, self.attn = norm(), _make_attention(cfg, i, runtime)
        self.mlp_norm, self.mlp = norm(), _make_mlp(cfg, i, runtime)
        self.post_attn_norm = norm() if cfg.post_norms else None
        self.post_mlp_norm = norm() if cfg.post_norms else None

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        tap = self.tap
        if tap is not None:
            x = tap("hook_resid_pre", x)
        h = self.attn(self.attn_norm(x), inputs)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        if tap is not None:
            h = tap("hook_attn_out", h)
        x = x + h
        if tap is not None:
            x = tap("hook_resid_mid", x)
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        if tap is None:
            return x + h
        return tap("hook_resid_post", x + tap("hook_mlp_out", h))


def _embedding(num: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    """nn.Embedding(num, dim); on the meta device (a loader's model, its tensors assigned after) without the
    embedding's own N(0, 1) draw, which on meta runs through torch's reference ops and imports torch._dynamo (~1 s
    of every load)."""
    weight = torch.empty(num, dim)
    if weight.device.type != "meta":
        return nn.Embedding(num, dim, padding_idx=padding_idx)
    return nn.Embedding(num, dim, padding_idx=padding_idx, _weight=weight)


class Transformer(nn.Module):
    tap: Tap | None = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.runtime = RuntimeOptions()  # how to compute (backend, MLA absorb, MoE path, checkpointing): shared
        self.embed = _embedding(cfg.vocab_size, cfg.d_model, cfg.pad_token_id)
        self.pos_embed = _embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i, self.runtime) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if self.embed.weight.device.type != "meta":  # a loader builds on meta and assigns the checkpoint's tensors
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
        cache: Cache | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for `input_ids` (B, T).

        attention_mask: (B, T), 1 for real tokens, 0 for padding (anywhere in a row); with a cache, the last T
        columns of a longer mask are used (the mask of every token so far, as transformers takes it).
        position_ids default to the count of real tokens before each one (in its row, the cache included), so
        padding is invisible.
        cache: a `Cache` (model/cache.py), e.g. `KVCache(max_len)`; the new real tokens are appended to it.
        doc_ids: packed rows (no cache): the document of each token; a token attends only to earlier tokens of its
        own document, so with position_ids restarting at each document it is computed as if alone.
        """
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids, cache, doc_ids=doc_ids))

    def logits(self, h: torch.Tensor, linear: Callable[..., torch.Tensor] = nn.functional.linear) -> torch.Tensor:
        """Vocabulary logits of final-normed states `h`; `linear(h, W)` computes h @ W^T (the static decoder
        passes its matrix-vector form), unless the head is a quantized layer with its own `project(h)`."""
        head = self.embed if self.lm_head is None else self.lm_head
        # a quantized head computes its own product (quant.weight_only)
        logits = head.project(h) if hasattr(head, "project") else linear(h, self.head_weight)
        cap = self.config.final_softcap
        return cap * torch.tanh(logits / cap) if cap is not None else logits

    def embed_tokens(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (scaled, for Gemma), plus learned or sinusoidal position embeddings."""
        cfg, tap = self.config, self.tap
        x = self.embed(input_ids)
        if cfg.embed_scale:
            x = x * torch.tensor(cfg.d_model**0.5, dtype=x.dtype)
        if tap is not None:
            x = tap("hook_embed", x)
        if cfg.position in ("learned", "sinusoidal"):
            if cfg.position == "learned":
                pos = self.pos_embed(position_ids)
            else:
                pos = sinusoidal_embedding(position_ids, cfg.d_model).to(x.dtype)
            x = x + (pos if tap is None else tap("hook_pos_embed", pos))
        return x

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states (B, T, d_model) (arguments as `forward`)."""
        if input_ids.dtype not in (torch.long, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (packed rows) cannot be used with a cache")
        valid = _new_token_mask(attention_mask, input_ids.shape[1], cache is not None)
        if position_ids is None:
            start = None if cache is None else cache.next_positions(input_ids.shape[0], input_ids.device)
            position_ids = _default_positions(valid, input_ids.shape, input_ids.device, start)
        keys = KeyLayout(position_ids, valid, past=0) if cache is None else cache.prepare(valid, position_ids)
        x = self.embed_tokens(input_ids, position_ids)
        inputs = self.attention_inputs(position_ids, valid, keys, cache, doc_ids, x.dtype)
        for block in self.blocks:
            if self.runtime.activation_checkpointing and torch.is_grad_enabled():  # recompute in backward
                x = torch.utils.checkpoint.checkpoint(block, x, inputs, use_reentrant=False)
            else:
                x = block(x, inputs)
        if cache is not None:
            cache.commit()
        return self.norm(x)

    def attention_inputs(
        self,
        positions: torch.Tensor,
        valid: torch.Tensor | None,
        keys: KeyLayout,
        cache: Cache | None,
        doc_ids: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> AttentionInputs:
        """What every layer's attention shares in one forward: masks per layer type, RoPE tables, ALiBi biases."""
        cfg, t = self.config, positions.shape[1]
        inputs = AttentionInputs(positions, valid, doc_ids, keys, cache=cache)
        if cfg.position == "rope":
            inputs.cos, inputs.sin = rope_cos_sin(cfg, positions)
        elif cfg.position == "alibi":
            inputs.alibi = alibi_bias(cfg.n_heads, positions, keys.positions).to(dtype)
        past = keys.past
        plain = keys.valid is None and doc_ids is None and past is not None and (t == 1 or past == 0)
        for kind in {cfg.layer_type(i) for i in range(cfg.n_layers)}:
            window = cfg.sliding_window if kind == "sliding" else None
            if plain and (window is None or past + t <= window):
                inputs.masks[kind] = None
            else:
                inputs.masks[kind] = build_mask(positions, keys.positions, keys.valid, window, doc_ids)
        return inputs

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """MoE load-balancing and router z-losses of the last forward, summed over layers."""
        moes = [b.mlp for b in self.blocks if hasattr(b.mlp, "aux_loss")]
        if not moes:
            return {}
        return {"aux_loss": sum(m.aux_loss for m in moes), "z_loss": sum(m.z_loss for m in moes)}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _new_token_mask(attention_mask: torch.Tensor | None, t: int, cached: bool) -> torch.Tensor | None:
    """(B, T) bool, True for the real new tokens; None when all are real."""
    if attention_mask is None:
        return None
    n = attention_mask.shape[-1]
    if n != t and not (cached and n > t):
        more = " or more (with a cache)" if cached else ""
        raise ValueError(f"attention_mask has {n} columns; expected {t}{more}")
    valid = attention_mask[:, -t:].bool()
    return None if bool(valid.all()) else valid


def _default_positions(
    valid: torch.Tensor | None, shape: torch.Size, device: torch.device, start: torch.Tensor | None
) -> torch.Tensor:
    """Each token's position: its row's start (0 without a cache) plus the real tokens before it in this call."""
    b, t = shape
    first = 0 if start is None else start[:, None]
    if valid is None:
        return torch.arange(t, device=device).expand(b, t) + first
    return (first + valid.long().cumsum(-1) - 1).clamp(min=0)
