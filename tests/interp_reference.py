"""Tiny random lmforge models and the same weights in TransformerLens's `HookedTransformer` (the reference).

Two architectures: GPT-2 style (LayerNorm, learned positions, biases, GELU-tanh MLP, tied head) and Llama style
(RMSNorm, RoPE, GQA, SwiGLU, untied head). The weights are drawn larger than the default init (std 0.3, norm
weights around 1) so that attention patterns are far from uniform and every hook point carries signal, and kept
in float64 on both sides, so that a 1e-5 tolerance measures the arithmetic, not float32 rounding. The
TransformerLens side is built from a `HookedTransformerConfig` set to match, with no weight processing (no
LayerNorm folding, no centering): its parameters are our tensors, reshaped.
"""

from __future__ import annotations

import warnings

import torch

from lmforge.config import ModelConfig
from lmforge.model.transformer import Transformer

VOCAB, D, LAYERS, HEADS, D_FF, CTX = 97, 32, 3, 4, 48, 32

CONFIGS = {
    "gpt2": ModelConfig(arch="gpt2", vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, d_ff=D_FF,
                        max_seq_len=CTX, norm="layernorm", mlp="gelu_tanh", mlp_bias=True, attn_bias=True,
                        attn_out_bias=True, position="learned", tie_embeddings=True),
    "llama": ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=2, d_ff=D_FF,
                         max_seq_len=CTX, norm_eps=1e-6, rope_theta=500.0),
}  # fmt: skip


def random_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float64) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    return model


def hooked_transformer(model: Transformer):
    """A TransformerLens HookedTransformer computing the same function as `model`."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = model.config
    llama = c.position == "rope"
    tl_cfg = HookedTransformerConfig(
        n_layers=c.n_layers, d_model=c.d_model, d_head=c.dim_head, n_heads=c.n_heads, d_mlp=c.d_ff,
        d_vocab=c.vocab_size, n_ctx=c.max_seq_len, eps=c.norm_eps,
        act_fn="silu" if llama else "gelu_new", gated_mlp=llama, normalization_type="RMS" if llama else "LN",
        positional_embedding_type="rotary" if llama else "standard",
        rotary_dim=c.dim_head if llama else None, rotary_base=c.rope_theta,
        n_key_value_heads=c.kv_heads if c.kv_heads != c.n_heads else None,
        final_rms=llama, use_attn_result=True, device="cpu", dtype=model.embed.weight.dtype,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = HookedTransformer(tl_cfg, move_to_device=False).eval()
    ours = dict(model.named_parameters())
    h, kv, hd, d = c.n_heads, c.kv_heads, c.dim_head, c.d_model
    gqa = "_" if tl_cfg.n_key_value_heads is not None else ""

    def heads(w: torch.Tensor, n: int) -> torch.Tensor:  # (n*hd, d) -> (n, d, hd)
        return w.view(n, hd, d).transpose(1, 2)

    def bias(name: str, n: int) -> torch.Tensor:
        return ours[name].view(n, hd) if name in ours else zeros(n, hd)

    zeros = lambda *shape: torch.zeros(shape, dtype=model.embed.weight.dtype)
    sd = {"embed.W_E": ours["embed.weight"], "unembed.W_U": model.head_weight.T, "unembed.b_U": zeros(c.vocab_size)}
    if not llama:
        sd["pos_embed.W_pos"] = ours["pos_embed.weight"]
    norms = {"ln1": "attn_norm", "ln2": "mlp_norm"}
    for i in range(c.n_layers):
        ob, tb = f"blocks.{i}.", f"blocks.{i}."
        for tl_name, our_name in norms.items():
            sd[tb + tl_name + ".w"] = ours[ob + our_name + ".weight"]
            if not llama:
                sd[tb + tl_name + ".b"] = ours[ob + our_name + ".bias"]
        a = ob + "attn."
        sd[tb + "attn.W_Q"] = heads(ours[a + "q_proj.weight"], h)
        sd[tb + "attn.b_Q"] = bias(a + "q_proj.bias", h)
        for x in "KV":
            sd[tb + f"attn.{gqa}W_{x}"] = heads(ours[a + f"{x.lower()}_proj.weight"], kv)
            sd[tb + f"attn.{gqa}b_{x}"] = bias(a + f"{x.lower()}_proj.bias", kv)
        sd[tb + "attn.W_O"] = ours[a + "o_proj.weight"].view(d, h, hd).permute(1, 2, 0)
        sd[tb + "attn.b_O"] = ours.get(a + "o_proj.bias", zeros(d))
        m = ob + "mlp."
        sd[tb + "mlp.W_in"] = ours[m + "up_proj.weight"].T
        sd[tb + "mlp.W_out"] = ours[m + "down_proj.weight"].T
        sd[tb + "mlp.b_in"] = ours.get(m + "up_proj.bias", zeros(c.d_ff))
        sd[tb + "mlp.b_out"] = ours.get(m + "down_proj.bias", zeros(d))
        if llama:
            sd[tb + "mlp.W_gate"] = ours[m + "gate_proj.weight"].T
    sd["ln_final.w"] = ours["norm.weight"]
    if not llama:
        sd["ln_final.b"] = ours["norm.bias"]
    params = dict(tl.named_parameters())
    assert set(sd) == set(params), f"unmapped: {set(params) ^ set(sd)}"
    with torch.no_grad():
        for name, value in sd.items():
            assert params[name].shape == value.shape, name
            params[name].copy_(value)
    return tl
