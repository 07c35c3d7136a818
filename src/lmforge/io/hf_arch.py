"""Per-architecture translation between Hugging Face checkpoints and lmforge.

Two tables per family: how `config.json` fields map onto `ModelConfig`, and how
each lmforge parameter name maps onto checkpoint tensor names (with the few
reshapes checkpoints need: GPT-2's fused, transposed Conv1D q/k/v, and routed
experts stored one tensor per expert).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.config import MLAConfig, ModelConfig, MoEConfig, RopeScaling
from lmforge.utils.errors import LmforgeError

HF_CLASSES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
SUPPORTED = tuple(HF_CLASSES)
_MLP_ACT = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu", "gelu": "geglu_exact"}
_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "gelu_fast": "gelu_tanh"}


class UnsupportedArchitectureError(LmforgeError):
    pass


# ---------------------------------------------------------------------------- config


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = d.get("rope_parameters") or {**(d.get("rope_scaling") or {}), "rope_theta": d.get("rope_theta", 10000.0)}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise UnsupportedArchitectureError(f"rope_type {kind!r} is not supported (linear, dynamic, yarn, llama3)")
    orig = params.get("original_max_position_embeddings")
    factor = params.get("factor")
    if kind == "dynamic":
        orig = d.get("max_position_embeddings")
    if factor is None and orig:
        factor = d["max_position_embeddings"] / orig
    fields = {k: params[k] for k in ("low_freq_factor", "high_freq_factor", "mscale", "mscale_all_dim") if k in params}
    fields.update(
        {k: params[k] for k in ("beta_fast", "beta_slow", "attention_factor", "truncate") if params.get(k) is not None}
    )
    return theta, RopeScaling(kind=kind, factor=float(factor or 1.0), original_max_seq_len=orig, **fields)


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    s = cfg.rope_scaling
    out: dict[str, Any] = {"rope_type": "default" if s is None else s.kind, "rope_theta": cfg.rope_theta}
    if s is None:
        return out
    out["factor"] = s.factor
    if s.kind in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = s.original_max_seq_len
    if s.kind == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.kind == "yarn":
        out.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, mscale=s.mscale, mscale_all_dim=s.mscale_all_dim)
        if s.attention_factor is not None:
            out["attention_factor"] = s.attention_factor
        if not s.truncate:
            out["truncate"] = False
    return out


def _pad_id(d: dict[str, Any]) -> int | None:
    pad = d.get("pad_token_id")
    return pad if isinstance(pad, int) and 0 <= pad < d["vocab_size"] else None


def _layer_types(d: dict[str, Any], n_layers: int) -> tuple[str, ...] | None:
    """Per-layer attention kinds; derived like transformers does when config.json predates `layer_types`."""
    if d.get("sliding_window") is None or d.get("use_sliding_window") is False:
        return None
    types = d.get("layer_types")
    if not types and d.get("model_type") == "gemma2":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if not types:
        start = d.get("max_window_layers", 0)
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(n_layers)]
    return tuple("sliding" if t == "sliding_attention" else "full" for t in types[:n_layers])


_CONSUMED = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
    "hidden_activation",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "sliding_window",
    "use_sliding_window",
    "layer_types",
    "model_type",
    "architectures",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "router_aux_loss_coef",
    "n_routed_experts",
    "n_shared_experts",
    "routed_scaling_factor",
    "n_group",
    "topk_group",
    "topk_method",
    "first_k_dense_replace",
    "scoring_func",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "qk_head_dim",
    "rope_interleave",
    "max_window_layers",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_positions",
    "layer_norm_epsilon",
    "activation_function",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "pad_token_id",
}


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    arch = d.get("model_type")
    if arch not in SUPPORTED:
        raise UnsupportedArchitectureError(
            f"model_type {arch!r} is not supported; lmforge loads: {', '.join(SUPPORTED)}"
        )
    extra = {k: v for k, v in d.items() if k not in _CONSUMED}
    if arch == "gpt2":  # GPT-2's embedding has no padding row: keep pad_token_id as plain metadata
        extra.update({k: d[k] for k in ("pad_token_id",) if k in d})
        return ModelConfig(
            arch=arch, vocab_size=d["vocab_size"], d_model=d["n_embd"], n_layers=d["n_layer"], n_heads=d["n_head"],
            d_ff=d.get("n_inner") or 4 * d["n_embd"], max_seq_len=d["n_positions"], norm="layernorm",
            norm_eps=d.get("layer_norm_epsilon", 1e-5), mlp=_GPT2_ACT[d.get("activation_function", "gelu_new")],
            mlp_bias=True, attn_bias=True, attn_out_bias=True, position="learned",
            tie_embeddings=d.get("tie_word_embeddings", True), extra=extra,
        )  # fmt: skip
    theta, scaling = _rope_from_hf(d)
    n_layers = d["num_hidden_layers"]
    bias = bool(d.get("attention_bias", False))
    act = d.get("hidden_activation") or d.get("hidden_act", "silu")
    common: dict[str, Any] = dict(
        arch=arch, vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layers=n_layers,
        n_heads=d["num_attention_heads"], n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim"), d_ff=d["intermediate_size"], max_seq_len=d.get("max_position_embeddings", 2048),
        norm_eps=d.get("rms_norm_eps", 1e-6), mlp=_MLP_ACT.get(act, "swiglu"), mlp_bias=bool(d.get("mlp_bias", False)),
        attn_bias=bias, attn_out_bias=bias, rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), pad_token_id=_pad_id(d), extra=extra,
    )  # fmt: skip
    if act not in _MLP_ACT:
        raise UnsupportedArchitectureError(f"hidden_act {act!r} is not supported ({', '.join(_MLP_ACT)})")
    if arch in ("mistral", "mixtral"):
        common["sliding_window"] = d.get("sliding_window")
    if arch in ("qwen2", "qwen3", "qwen3_moe", "gemma2"):
        common["layer_types"] = _layer_types(d, n_layers)
        common["sliding_window"] = d.get("sliding_window") if common["layer_types"] else None
    if arch == "qwen2":
        common.update(attn_bias=True, attn_out_bias=False)
    if arch in ("qwen3", "qwen3_moe"):
        common["qk_norm"] = True
    if arch == "gemma2":
        common.update(
            norm_unit_offset=True, post_norms=True, embed_scale=True,
            attn_scale=d.get("query_pre_attn_scalar", 256) ** -0.5,
            attn_softcap=d.get("attn_logit_softcapping"), final_softcap=d.get("final_logit_softcapping"),
        )  # fmt: skip
    if arch == "mixtral":
        common["moe"] = MoEConfig(
            n_experts=d["num_local_experts"], top_k=d["num_experts_per_tok"], d_expert=d["intermediate_size"],
            aux_loss_coef=d.get("router_aux_loss_coef", 0.0),
        )  # fmt: skip
    if arch == "qwen3_moe":
        common["moe"] = MoEConfig(
            n_experts=d.get("num_experts") or d["num_local_experts"], top_k=d["num_experts_per_tok"],
            d_expert=d["moe_intermediate_size"],
            norm_topk_prob=bool(d.get("norm_topk_prob", False)), layer_step=d.get("decoder_sparse_step", 1),
            dense_layers=tuple(d.get("mlp_only_layers") or ()), aux_loss_coef=d.get("router_aux_loss_coef", 0.0),
        )  # fmt: skip
    if arch in ("deepseek_v2", "deepseek_v3"):
        common.update(_deepseek_from_hf(d, arch, scaling))
    return ModelConfig(**common)


def _deepseek_from_hf(d: dict[str, Any], arch: str, scaling: RopeScaling | None) -> dict[str, Any]:
    mla = MLAConfig(
        kv_lora_rank=d["kv_lora_rank"], qk_nope_head_dim=d["qk_nope_head_dim"],
        qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"], q_lora_rank=d.get("q_lora_rank"),
    )  # fmt: skip
    scale = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5
    if scaling is not None and scaling.mscale_all_dim:  # transformers applies it for any scaling kind
        m = 0.1 * scaling.mscale_all_dim * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0
        scale = scale * m * m
    group_limited = d.get("topk_method", "noaux_tc" if arch == "deepseek_v3" else "greedy") != "greedy"
    moe = MoEConfig(
        n_experts=d["n_routed_experts"], top_k=d["num_experts_per_tok"], d_expert=d["moe_intermediate_size"],
        scoring="sigmoid" if arch == "deepseek_v3" else d.get("scoring_func", "softmax"),
        norm_topk_prob=arch == "deepseek_v3" and bool(d.get("norm_topk_prob", True)),  # V2 never renormalises
        group_score="top2_sum" if arch == "deepseek_v3" else "max",
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        n_group=d.get("n_group") or 1 if group_limited else 1,
        topk_group=d.get("topk_group") or 1 if group_limited else 1,
        score_correction_bias=arch == "deepseek_v3", n_shared_experts=d.get("n_shared_experts") or 0,
        first_k_dense=d.get("first_k_dense_replace", 0),  # transformers ignores moe_layer_freq: kept in extra
        aux_loss_coef=d.get("router_aux_loss_coef", 0.0) or 0.0,
    )  # fmt: skip
    interleaved = arch == "deepseek_v2" or d.get("rope_interleave", True)  # V2 always rotates pairs
    return dict(mla=mla, moe=moe, attn_scale=scale, rope_layout="interleaved" if interleaved else "half", head_dim=None)


def _int_if_whole(x: float) -> float | int:
    return round(x) if abs(x - round(x)) < 1e-6 else x


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    arch = cfg.arch
    if arch not in SUPPORTED:
        raise UnsupportedArchitectureError(f"arch {arch!r} has no Hugging Face mapping ({', '.join(SUPPORTED)})")
    d: dict[str, Any] = {"model_type": arch, "architectures": [HF_CLASSES[arch]], **cfg.extra}
    if arch == "gpt2":
        d.update(
            vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
            n_inner=cfg.d_ff, n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
            activation_function={"gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.mlp],
            tie_word_embeddings=cfg.tie_embeddings,
        )  # fmt: skip
        return d
    d.update(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=_rope_to_hf(cfg), attention_bias=cfg.attn_bias if arch != "qwen2" else False,
        pad_token_id=cfg.pad_token_id,
    )  # fmt: skip
    if cfg.mla is None:
        d["head_dim"] = cfg.dim_head
    act = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh", "geglu_exact": "gelu"}.get(cfg.mlp, cfg.mlp)
    d["hidden_activation" if arch == "gemma2" else "hidden_act"] = act
    if arch == "llama":
        d["mlp_bias"] = cfg.mlp_bias
    if arch in ("mistral", "mixtral"):
        d["sliding_window"] = cfg.sliding_window
    if arch in ("qwen2", "qwen3", "qwen3_moe", "gemma2"):
        d["sliding_window"] = cfg.sliding_window
        types = [cfg.layer_type(i) for i in range(cfg.n_layers)]
        d["layer_types"] = [f"{t}_attention" if t == "sliding" else "full_attention" for t in types]
        if arch != "gemma2":
            d["use_sliding_window"] = cfg.sliding_window is not None
            d["max_window_layers"] = cfg.n_layers
    if arch == "gemma2":
        d.update(
            query_pre_attn_scalar=_int_if_whole(cfg.softmax_scale**-2), attn_logit_softcapping=cfg.attn_softcap,
            final_logit_softcapping=cfg.final_softcap,
        )  # fmt: skip
    m = cfg.moe
    if arch == "mixtral":
        d.update(num_local_experts=m.n_experts, num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss_coef)
    if arch == "qwen3_moe":
        d.update(
            num_experts=m.n_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=m.d_expert,
            norm_topk_prob=m.norm_topk_prob, decoder_sparse_step=m.layer_step, mlp_only_layers=list(m.dense_layers),
            router_aux_loss_coef=m.aux_loss_coef,
        )  # fmt: skip
    if arch in ("deepseek_v2", "deepseek_v3"):
        d.update(_deepseek_to_hf(cfg))
    return d


def _deepseek_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m, a = cfg.moe, cfg.mla
    d = dict(
        q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
        qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim, n_routed_experts=m.n_experts,
        num_experts_per_tok=m.top_k, moe_intermediate_size=m.d_expert, n_shared_experts=m.n_shared_experts,
        routed_scaling_factor=m.routed_scaling_factor, n_group=m.n_group, topk_group=m.topk_group,
        first_k_dense_replace=m.first_k_dense, norm_topk_prob=m.norm_topk_prob,
        head_dim=a.qk_rope_head_dim,
    )  # fmt: skip
    if cfg.arch == "deepseek_v3":
        d["rope_interleave"] = cfg.rope_layout == "interleaved"
    if cfg.arch == "deepseek_v2":
        d["topk_method"] = "group_limited_greedy" if m.n_group > 1 else "greedy"
    return d


# ---------------------------------------------------------------------------- tensors


def _same(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return ts


@dataclass
class TensorMap:
    """lmforge tensors `ours` <-> checkpoint tensors `theirs`, with the reshapes in both directions."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    load: Callable[[list[torch.Tensor]], list[torch.Tensor]] = _same
    save: Callable[[list[torch.Tensor]], list[torch.Tensor]] = _same


def _transposed(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.t() if t.dim() == 2 else t for t in ts]


def _stack(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.stack(ts)]


def _unstack(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(ts[0].unbind(0))


_LLAMA_RENAMES = [
    (r"^embed\.", "model.embed_tokens."),
    (r"^norm\.", "model.norm."),
    (r"^blocks\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^blocks\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^blocks\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"^blocks\.(\d+)\.mlp\.router\.", r"model.layers.\1.mlp.gate."),
    (r"^blocks\.(\d+)\.mlp\.score_bias$", r"model.layers.\1.mlp.gate.e_score_correction_bias"),
    (r"^blocks\.(\d+)\.mlp\.shared\.", r"model.layers.\1.mlp.shared_experts."),
    (r"^blocks\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
]
_GEMMA2_RENAMES = [
    (r"^blocks\.(\d+)\.mlp_norm\.", r"model.layers.\1.pre_feedforward_layernorm."),
    (r"^blocks\.(\d+)\.post_attn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^blocks\.(\d+)\.post_mlp_norm\.", r"model.layers.\1.post_feedforward_layernorm."),
]
_GPT2_RENAMES = [
    (r"^embed\.", "transformer.wte."),
    (r"^pos_embed\.", "transformer.wpe."),
    (r"^norm\.", "transformer.ln_f."),
    (r"^blocks\.(\d+)\.attn_norm\.", r"transformer.h.\1.ln_1."),
    (r"^blocks\.(\d+)\.mlp_norm\.", r"transformer.h.\1.ln_2."),
    (r"^blocks\.(\d+)\.attn\.o_proj\.", r"transformer.h.\1.attn.c_proj."),
    (r"^blocks\.(\d+)\.mlp\.up_proj\.", r"transformer.h.\1.mlp.c_fc."),
    (r"^blocks\.(\d+)\.mlp\.down_proj\.", r"transformer.h.\1.mlp.c_proj."),
]
# checkpoint tensors that are derived buffers, not weights: skipped on load
IGNORED = [r"rotary_emb\.inv_freq$", r"\.attn\.(masked_)?bias$"]


def _rename(name: str, renames: list[tuple[str, str]]) -> str:
    for pattern, repl in renames:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def tensor_maps(cfg: ModelConfig, our_names: list[str]) -> list[TensorMap]:
    """The mapping of every lmforge parameter (by name) onto checkpoint tensor names."""
    maps: list[TensorMap] = []
    gpt2 = cfg.arch == "gpt2"
    renames = _GPT2_RENAMES if gpt2 else (_GEMMA2_RENAMES if cfg.arch == "gemma2" else []) + _LLAMA_RENAMES
    expert_names = {"w_gate": "w1", "w_up": "w3", "w_down": "w2"} if cfg.arch == "mixtral" else None
    done: set[str] = set()
    for name in our_names:
        if name in done:
            continue
        m = re.match(r"^blocks\.(\d+)\.(attn|mlp)\.(\w+?)(\.weight|\.bias)?$", name)
        if gpt2 and m and m.group(3) in ("q_proj", "k_proj", "v_proj"):
            i, suffix = m.group(1), m.group(4)
            ours = tuple(f"blocks.{i}.attn.{p}{suffix}" for p in ("q_proj", "k_proj", "v_proj"))
            done.update(ours)
            maps.append(
                TensorMap(
                    ours,
                    (f"transformer.h.{i}.attn.c_attn{suffix}",),
                    load=lambda ts: list(ts[0].t().chunk(3, dim=0)) if ts[0].dim() == 2 else list(ts[0].chunk(3)),
                    save=lambda ts: [torch.cat(ts, 0).t() if ts[0].dim() == 2 else torch.cat(ts)],
                )
            )
        elif m and m.group(3) in ("w_gate", "w_up", "w_down"):
            i, w = m.group(1), m.group(3)
            if expert_names:
                theirs = tuple(
                    f"model.layers.{i}.block_sparse_moe.experts.{e}.{expert_names[w]}.weight"
                    for e in range(cfg.moe.n_experts)
                )
            else:
                proj = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}[w]
                theirs = tuple(f"model.layers.{i}.mlp.experts.{e}.{proj}.weight" for e in range(cfg.moe.n_experts))
            maps.append(TensorMap((name,), theirs, load=_stack, save=_unstack))
        elif m and expert_names and m.group(3) == "router":
            maps.append(TensorMap((name,), (f"model.layers.{m.group(1)}.block_sparse_moe.gate.weight",)))
        elif gpt2 and name.endswith(".weight") and re.search(r"\.(c_proj|c_fc)\.", _rename(name, renames)):
            maps.append(TensorMap((name,), (_rename(name, renames),), load=_transposed, save=_transposed))
        else:
            maps.append(TensorMap((name,), (_rename(name, renames),)))
    return maps
