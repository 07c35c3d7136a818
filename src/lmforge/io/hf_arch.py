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
from lmforge.configfile import ConfigError
from lmforge.io.file_keys import KeyReader, check_layer_count, expect_shape, spans, speaking_file
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


class ModelFilesError(LmforgeError):
    """The model directory's files do not match its config.json (a missing, unexpected or misshapen tensor, a
    count the tensors contradict, an unreadable config.json or index); the message names the file and the tensor
    or key. Defined here so the structure checks below can raise it; `lmforge.io.hf` exports it. Not to be
    confused with `lmforge.train.checkpoint.CheckpointError`, a training checkpoint that cannot be loaded."""


def _hf_keys(arch: str, rope: str) -> dict[str, str]:
    """ModelConfig field -> the config.json key it comes from (`rope`: the section RoPE settings came from)."""
    if arch == "gpt2":
        return {
            "d_model": "n_embd", "n_layers": "n_layer", "n_heads": "n_head", "d_ff": "n_inner",
            "max_seq_len": "n_positions", "norm_eps": "layer_norm_epsilon",
        }  # fmt: skip
    experts = {"mixtral": "num_local_experts", "qwen3_moe": "num_experts"}.get(arch, "n_routed_experts")
    keys = {
        "d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
        "n_kv_heads": "num_key_value_heads", "d_ff": "intermediate_size", "max_seq_len": "max_position_embeddings",
        "norm_eps": "rms_norm_eps", "attn_softcap": "attn_logit_softcapping", "attn_scale": "query_pre_attn_scalar",
        "final_softcap": "final_logit_softcapping", "layer_types[...]": "layer_types",
        "rope_theta": f"{rope}rope_theta",
        "rope_scaling.kind": f"{rope}rope_type", "rope_scaling.factor": f"{rope}factor",
        "rope_scaling.original_max_seq_len": f"{rope}original_max_position_embeddings",
        "moe.n_experts": experts, "n_experts": experts, "moe.top_k": "num_experts_per_tok",
        "moe.d_expert": "intermediate_size" if arch == "mixtral" else "moe_intermediate_size",
        "moe.layer_step": "decoder_sparse_step", "moe.first_k_dense": "first_k_dense_replace",
        "moe.aux_loss_coef": "router_aux_loss_coef", "moe.scoring": "scoring_func",
        "moe.dense_layers": "mlp_only_layers",
    }  # fmt: skip
    for name in ("mscale", "mscale_all_dim", "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
        keys[f"rope_scaling.{name}"] = f"{rope}{name}"
    for name in ("n_group", "topk_group", "n_shared_experts", "routed_scaling_factor", "norm_topk_prob"):
        keys[f"moe.{name}"] = name
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank"):
        keys[f"mla.{name}"] = name
    return keys


# ---------------------------------------------------------------------------- config


def _rope_section(r: KeyReader) -> KeyReader:
    """Where RoPE settings live: `rope_parameters` (transformers >= 5) or the older `rope_scaling`."""
    return r.section("rope_parameters") if r.values.get("rope_parameters") else r.section("rope_scaling")


def _rope_from_hf(r: KeyReader) -> tuple[float, RopeScaling | None]:
    p = _rope_section(r)
    theta = p.number("rope_theta", r.number("rope_theta", 10000.0))
    kind = p.text("rope_type", None) or p.text("type", "default")
    if kind == "default":
        return theta, None
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise UnsupportedArchitectureError(
            f"{r.where}: {p.label}rope_type {kind!r} is not supported (linear, dynamic, yarn, llama3)"
        )
    orig = p.size("original_max_position_embeddings", None)
    factor = p.number("factor", None)
    if kind == "dynamic":
        orig = r.size("max_position_embeddings", None)
    if factor is None and orig:
        factor = r.size("max_position_embeddings") / orig
    names = ("low_freq_factor", "high_freq_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow")
    fields: dict[str, Any] = {k: p.number(k) for k in (*names, "attention_factor") if p.present(k)}
    if p.present("truncate"):
        fields["truncate"] = p.flag("truncate")
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


def _pad_id(d: dict[str, Any], vocab_size: int) -> int | None:
    """pad_token_id when it indexes the vocabulary; configs often carry one that does not (kept in `extra` then)."""
    pad = d.get("pad_token_id")
    return pad if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < vocab_size else None


def _layer_types(r: KeyReader, n_layers: int) -> tuple[str, ...] | None:
    """Per-layer attention kinds; derived like transformers does when config.json predates `layer_types`."""
    if not r.present("sliding_window") or r.flag("use_sliding_window", None) is False:
        return None
    types = r.texts("layer_types")
    if not types and r.values.get("model_type") == "gemma2":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if not types:
        start = r.count("max_window_layers", 0)
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


def config_from_hf(d: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """The `ModelConfig` of a Hugging Face `config.json` dict (`where`: the file, named in errors).

    Every key is read with a typed getter, and a `ConfigError` from ModelConfig's own checks is
    re-raised naming config.json's key (``num_hidden_layers``), not the ModelConfig field (``n_layers``)."""
    r = KeyReader(d, where, ConfigError)
    arch = r.text("model_type", None)
    if arch not in SUPPORTED:
        raise UnsupportedArchitectureError(
            f"{where}: model_type {arch!r} is not supported; lmforge loads: {', '.join(SUPPORTED)}"
        )
    with speaking_file(where, _hf_keys(arch, _rope_section(r).label), ConfigError):
        return _gpt2_from_hf(r) if arch == "gpt2" else _llama_family_from_hf(r, arch)


def _gpt2_from_hf(r: KeyReader) -> ModelConfig:
    d = r.values
    extra = {k: v for k, v in d.items() if k not in _CONSUMED}
    extra.update({k: d[k] for k in ("pad_token_id",) if k in d})  # GPT-2's embedding has no padding row
    act = r.text("activation_function", "gelu_new")
    if act not in _GPT2_ACT:
        raise UnsupportedArchitectureError(
            f"{r.where}: activation_function {act!r} is not supported ({', '.join(_GPT2_ACT)})"
        )
    n_embd, n_head = r.size("n_embd"), r.size("n_head")
    if n_embd % n_head:
        raise ConfigError(f"{r.where}: n_embd={n_embd} is not divisible by n_head={n_head}")
    return ModelConfig(
        arch="gpt2", vocab_size=r.size("vocab_size"), d_model=n_embd, n_layers=r.size("n_layer"),
        n_heads=n_head, d_ff=r.size("n_inner", 4 * n_embd), max_seq_len=r.size("n_positions"),
        norm="layernorm", norm_eps=r.number("layer_norm_epsilon", 1e-5), mlp=_GPT2_ACT[act],
        mlp_bias=True, attn_bias=True, attn_out_bias=True, position="learned",
        tie_embeddings=r.flag("tie_word_embeddings", True), extra=extra,
    )  # fmt: skip


def _llama_family_from_hf(r: KeyReader, arch: str) -> ModelConfig:
    d = r.values
    theta, scaling = _rope_from_hf(r)
    n_layers, n_heads, vocab = r.size("num_hidden_layers"), r.size("num_attention_heads"), r.size("vocab_size")
    bias = r.flag("attention_bias", False)
    act = r.text("hidden_activation", None) or r.text("hidden_act", "silu")
    if act not in _MLP_ACT:
        raise UnsupportedArchitectureError(f"{r.where}: hidden_act {act!r} is not supported ({', '.join(_MLP_ACT)})")
    common: dict[str, Any] = dict(
        arch=arch, vocab_size=vocab, d_model=r.size("hidden_size"), n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=r.size("num_key_value_heads", n_heads),
        head_dim=r.size("head_dim", None), d_ff=r.size("intermediate_size"),
        max_seq_len=r.size("max_position_embeddings", 2048), norm_eps=r.number("rms_norm_eps", 1e-6),
        mlp=_MLP_ACT[act], mlp_bias=r.flag("mlp_bias", False), attn_bias=bias, attn_out_bias=bias,
        rope_theta=theta, rope_scaling=scaling, tie_embeddings=r.flag("tie_word_embeddings", False),
        pad_token_id=_pad_id(d, vocab), extra={k: v for k, v in d.items() if k not in _CONSUMED},
    )  # fmt: skip
    if arch in ("mistral", "mixtral"):
        common["sliding_window"] = r.size("sliding_window", None)
    if arch in ("qwen2", "qwen3", "qwen3_moe", "gemma2"):
        common["layer_types"] = _layer_types(r, n_layers)
        common["sliding_window"] = r.size("sliding_window", None) if common["layer_types"] else None
    if arch == "qwen2":
        common.update(attn_bias=True, attn_out_bias=False)
    if arch in ("qwen3", "qwen3_moe"):
        common["qk_norm"] = True
    if arch == "gemma2":
        common.update(
            norm_unit_offset=True, post_norms=True, embed_scale=True,
            attn_scale=r.number("query_pre_attn_scalar", 256, positive=True) ** -0.5,
            attn_softcap=r.number("attn_logit_softcapping", None),
            final_softcap=r.number("final_logit_softcapping", None),
        )  # fmt: skip
    if arch == "mixtral":
        common["moe"] = MoEConfig(
            n_experts=r.size("num_local_experts"), top_k=r.size("num_experts_per_tok"),
            d_expert=r.size("intermediate_size"), aux_loss_coef=r.number("router_aux_loss_coef", 0.0),
        )  # fmt: skip
    if arch == "qwen3_moe":
        common["moe"] = MoEConfig(
            n_experts=r.size("num_experts", None) or r.size("num_local_experts"),
            top_k=r.size("num_experts_per_tok"), d_expert=r.size("moe_intermediate_size"),
            norm_topk_prob=r.flag("norm_topk_prob", False), layer_step=r.size("decoder_sparse_step", 1),
            dense_layers=r.counts("mlp_only_layers"), aux_loss_coef=r.number("router_aux_loss_coef", 0.0),
        )  # fmt: skip
    if arch in ("deepseek_v2", "deepseek_v3"):
        common.update(_deepseek_from_hf(r, arch, scaling))
    return ModelConfig(**common)


def _deepseek_from_hf(r: KeyReader, arch: str, scaling: RopeScaling | None) -> dict[str, Any]:
    mla = MLAConfig(
        kv_lora_rank=r.size("kv_lora_rank"), qk_nope_head_dim=r.size("qk_nope_head_dim"),
        qk_rope_head_dim=r.size("qk_rope_head_dim"), v_head_dim=r.size("v_head_dim"),
        q_lora_rank=r.size("q_lora_rank", None),
    )  # fmt: skip
    scale = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5
    if scaling is not None and scaling.mscale_all_dim:  # transformers applies it for any scaling kind
        m = 0.1 * scaling.mscale_all_dim * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0
        scale = scale * m * m
    group_limited = r.text("topk_method", "noaux_tc" if arch == "deepseek_v3" else "greedy") != "greedy"
    v3 = arch == "deepseek_v3"
    moe = MoEConfig(
        n_experts=r.size("n_routed_experts"), top_k=r.size("num_experts_per_tok"),
        d_expert=r.size("moe_intermediate_size"),
        scoring="sigmoid" if v3 else r.text("scoring_func", "softmax"),
        norm_topk_prob=v3 and r.flag("norm_topk_prob", True),  # V2 never renormalises
        group_score="top2_sum" if v3 else "max",
        routed_scaling_factor=r.number("routed_scaling_factor", 1.0),
        n_group=r.count("n_group", 0) or 1 if group_limited else 1,
        topk_group=r.count("topk_group", 0) or 1 if group_limited else 1,
        score_correction_bias=v3, n_shared_experts=r.count("n_shared_experts", 0),
        first_k_dense=r.count("first_k_dense_replace", 0),  # transformers ignores moe_layer_freq: kept in extra
        aux_loss_coef=r.number("router_aux_loss_coef", 0.0),
    )  # fmt: skip
    interleaved = arch == "deepseek_v2" or r.flag("rope_interleave", True)  # V2 always rotates pairs
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


# ---------------------------------------------------------------------------- structure


_LAYER = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.")


def check_structure(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """config.json's counts against the checkpoint's tensors (names and header shapes; nothing is read),
    before any module is built: layers, experts, vocabulary and hidden size, heads, MLP width.

    `shapes` uses canonical names (GPT-2's with the "transformer." prefix). A `num_hidden_layers` of
    50000 when the files hold 30 layers is refused at once, naming the key and the layers found,
    instead of building 50000 (meta) modules first."""
    keys = {"vocab_size": "vocab_size", **_hf_keys(cfg.arch, "")}
    gpt2 = cfg.arch == "gpt2"
    prefix = "transformer.h" if gpt2 else "model.layers"
    found = {int(m.group(1)) for name in shapes if (m := _LAYER.match(name))}
    check_layer_count(
        cfg.n_layers, found, keys["n_layers"], where, f"{prefix}.N.", ModelFilesError, cfg.arch == "deepseek_v3"
    )

    def expect(name: str, shape: tuple[int, ...], why: str) -> None:
        expect_shape(shapes, name, shape, why, where, ModelFilesError)

    d, v = cfg.d_model, cfg.vocab_size
    embed = "transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"
    expect(embed, (v, d), f"vocab_size={v} x {keys['d_model']}={d}")
    if gpt2:
        expect("transformer.wpe.weight", (cfg.max_seq_len, d), f"n_positions={cfg.max_seq_len}")
    for i in range(cfg.n_layers):
        if gpt2:
            expect(f"{prefix}.{i}.mlp.c_fc.weight", (d, cfg.d_ff), f"n_inner={cfg.d_ff}")
            continue
        if not cfg.is_moe_layer(i) and f"{prefix}.{i}.mlp.up_proj.weight" in shapes:
            expect(f"{prefix}.{i}.mlp.up_proj.weight", (cfg.d_ff, d), f"intermediate_size={cfg.d_ff}")
        if cfg.mla is None:
            hd = cfg.dim_head
            for proj, n, key in (("q", cfg.n_heads, "n_heads"), ("k", cfg.kv_heads, "n_kv_heads")):
                why = f"{keys[key]}={n} x head_dim={hd}"
                expect(f"{prefix}.{i}.self_attn.{proj}_proj.weight", (n * hd, d), why)
    if cfg.moe is not None:
        experts: dict[int, set[int]] = {}
        for name in shapes:
            if m := _EXPERT.match(name):
                experts.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        n = cfg.moe.n_experts
        for i in (i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)):
            got = experts.get(i, set())
            if len(got) != n or max(got, default=-1) != n - 1:  # distinct indices: exactly 0..n-1
                raise ModelFilesError(
                    f"{where}: {keys['moe.n_experts']}={n}, but layer {i} holds experts {spans(got)} "
                    f"({prefix}.{i}.mlp.experts.N.)"
                )


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
