"""Model configuration: one dataclass describes every supported architecture.

A `ModelConfig` is the single source of truth for the shape of a `Transformer`.
Architecture families differ only in field values (`lmforge.io.hf_arch.config_from_hf` and
`config_to_hf` translate to and from Hugging Face `config.json`; this module reads and writes no files),
never in code paths chosen by name. Every field is validated on construction with the checks of
`lmforge.configfile`; a bad value raises `ConfigError` naming the field and what is allowed: integers are
below 2**63 (int64, as torch and every file format store them) and no bool, floats are finite (a NaN
rope_theta or an infinite norm_eps can only give NaN logits), and no weight matrix has more elements than an
int64 counts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lmforge.configfile import (
    HIDDEN,
    INT64_LIMIT,
    ConfigError,
    check,
    check_choice,
    check_finite,
    check_integer,
    check_positive,
    is_finite,
    is_int,
)

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "geglu", "geglu_exact", "gelu", "gelu_tanh")
POSITIONS = ("rope", "learned", "sinusoidal", "alibi", "none")
ROPE_LAYOUTS = ("half", "interleaved")
ROPE_SCALINGS = ("linear", "dynamic", "yarn", "llama3")
LAYER_TYPES = ("full", "sliding")
SCORINGS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for context extension (see `lmforge.model.position`)."""

    kind: str
    factor: float = 1.0
    original_max_seq_len: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0  # 0: not given (DeepSeek's yarn sets mscale and mscale_all_dim)
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        check_choice("rope_scaling.kind", self.kind, ROPE_SCALINGS)
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            check_finite(f"rope_scaling.{name}", getattr(self, name), above=0)
        for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            check_finite(f"rope_scaling.{name}", getattr(self, name))
        check_finite("rope_scaling.attention_factor", self.attention_factor, above=0, optional=True)
        if self.original_max_seq_len is not None:
            check_positive("rope_scaling.original_max_seq_len", self.original_max_seq_len)
        if self.kind in ("llama3", "yarn") or (self.kind == "dynamic" and self.original_max_seq_len):
            check(
                self.original_max_seq_len is not None,
                "rope_scaling.original_max_seq_len",
                self.original_max_seq_len,
                f"a positive integer is required for {self.kind} scaling",
            )
        if self.kind == "llama3":  # the smoothing divides by their difference
            check(self.high_freq_factor != self.low_freq_factor, "rope_scaling.high_freq_factor",
                  self.high_freq_factor, "must differ from low_freq_factor for llama3 scaling")  # fmt: skip


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3) dimensions."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: a full-rank q projection

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            check_positive(f"mla.{name}", getattr(self, name))
        if self.q_lora_rank is not None:
            check_positive("mla.q_lora_rank", self.q_lora_rank)


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts feed-forward (see `lmforge.model.moe`)."""

    n_experts: int
    top_k: int
    d_expert: int  # hidden size of each routed expert
    scoring: str = "softmax"  # router score: softmax or sigmoid over expert logits
    norm_topk_prob: bool = True  # renormalise the k selected weights to sum to 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # group-limited routing (DeepSeek-V3): experts split in n_group groups
    topk_group: int = 1  # ... of which only topk_group groups may be chosen per token
    group_score: str = "max"  # a group's score: "max" expert score (DeepSeek-V2) or "top2_sum" (DeepSeek-V3)
    score_correction_bias: bool = False  # DeepSeek-V3 load-balancing bias (selection only)
    n_shared_experts: int = 0
    d_shared: int | None = None  # hidden size of the fused shared expert (default n_shared * d_expert)
    first_k_dense: int = 0  # the first k layers use a dense MLP of size d_ff
    layer_step: int = 1  # MoE in layers where (i + 1) % layer_step == 0 (Qwen "decoder_sparse_step")
    dense_layers: tuple[int, ...] = ()  # extra layers forced dense (Qwen "mlp_only_layers")
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("n_experts", "top_k", "d_expert", "n_group", "topk_group", "layer_step"):
            check_positive(f"moe.{name}", getattr(self, name))
        check_choice("moe.scoring", self.scoring, SCORINGS)
        check(self.top_k <= self.n_experts, "moe.top_k", self.top_k, f"must be <= n_experts={self.n_experts}")
        check(
            self.n_experts % self.n_group == 0,
            "moe.n_group",
            self.n_group,
            f"must divide n_experts={self.n_experts}",
        )
        check(self.topk_group <= self.n_group, "moe.topk_group", self.topk_group, f"must be <= n_group={self.n_group}")
        check_choice("moe.group_score", self.group_score, ("max", "top2_sum"))
        group_size = self.n_experts // self.n_group
        check(
            self.top_k <= self.topk_group * group_size,
            "moe.top_k",
            self.top_k,
            f"must be <= topk_group * experts per group = {self.topk_group * group_size}",
        )
        if self.group_score == "top2_sum" and self.topk_group < self.n_group:
            check(group_size >= 2, "moe.n_group", self.n_group, "top2_sum group scores need >= 2 experts per group")
        check_integer("moe.n_shared_experts", self.n_shared_experts)
        check_integer("moe.first_k_dense", self.first_k_dense)
        check(isinstance(self.dense_layers, tuple | list), "moe.dense_layers", self.dense_layers, "must be a list")
        for i, layer in enumerate(self.dense_layers):
            check_integer(f"moe.dense_layers[{i}]", layer)
        if self.d_shared is not None:
            check_positive("moe.d_shared", self.d_shared)
        check_finite("moe.routed_scaling_factor", self.routed_scaling_factor)
        for name in ("aux_loss_coef", "z_loss_coef"):
            check_finite(f"moe.{name}", getattr(self, name), at_least=0)

    @property
    def shared_size(self) -> int:
        return self.d_shared if self.d_shared is not None else self.n_shared_experts * self.d_expert


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the shape and arithmetic of a `Transformer`."""

    arch: str = "llama"  # the Hugging Face model_type this config maps to
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: = n_heads (MHA); 1: MQA; else GQA
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 1376
    max_seq_len: int = 2048
    # norms
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma: y = x_hat * (1 + w)
    post_norms: bool = False  # Gemma 2: extra norms after attention and after the MLP
    # feed-forward
    mlp: str = "swiglu"
    mlp_bias: bool = False
    moe: MoEConfig | None = None
    # attention
    attn_bias: bool = False  # biases on q, k, v
    attn_out_bias: bool = False  # bias on the output projection
    qk_norm: bool = False  # RMSNorm on each head of q and k (Qwen 3)
    attn_scale: float | None = None  # None: 1/sqrt(head_dim of q.k)
    attn_softcap: float | None = None  # Gemma 2: logits <- c * tanh(logits / c)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer "full" or "sliding"; None: all sliding if window
    mla: MLAConfig | None = None
    # positions
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_layout: str = "half"  # "half": rotate halves (HF Llama); "interleaved": rotate pairs (GPT-J, DeepSeek)
    rotary_fraction: float = 1.0  # partial rotary: rotate the first fraction of each head
    rope_scaling: RopeScaling | None = None
    # embeddings and head
    tie_embeddings: bool = False
    embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model)
    pad_token_id: int | None = None  # its embedding row gets no gradient from the lookup (padding_idx)
    final_softcap: float | None = None
    # unknown HF config.json fields, written back by config_to_hf; not a field of a TOML config file
    extra: dict[str, Any] = field(default_factory=dict, compare=False, metadata=HIDDEN)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            check_positive(name, getattr(self, name))
        kv = self.kv_heads
        check_positive("n_kv_heads", kv)
        check(self.n_heads % kv == 0, "n_kv_heads", kv, f"must divide n_heads={self.n_heads}")
        if self.head_dim is None and self.mla is None:
            check(
                self.d_model % self.n_heads == 0,
                "head_dim",
                None,
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim",
            )
        if self.head_dim is None and self.mla is None:  # normalise, so equal shapes compare equal
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.head_dim is not None:
            check_positive("head_dim", self.head_dim)
        check_choice("norm", self.norm, NORMS)
        check_finite("norm_eps", self.norm_eps, above=0)
        check_finite("rope_theta", self.rope_theta, above=0)
        check_choice("mlp", self.mlp, MLPS)
        check_choice("position", self.position, POSITIONS)
        check_choice("rope_layout", self.rope_layout, ROPE_LAYOUTS)
        check(is_finite(self.rotary_fraction) and 0 < self.rotary_fraction <= 1, "rotary_fraction",
              self.rotary_fraction, "must be in (0, 1]")  # fmt: skip
        rot = self.rotary_dim
        check(rot % 2 == 0, "rotary_fraction", self.rotary_fraction, f"gives odd rotary dim {rot}")
        if self.sliding_window is not None:
            check_positive("sliding_window", self.sliding_window)
        if self.layer_types is not None:
            check(
                isinstance(self.layer_types, tuple | list) and len(self.layer_types) == self.n_layers,
                "layer_types",
                self.layer_types,
                f"needs one entry per layer ({self.n_layers})",
            )
            for t in self.layer_types:
                check_choice("layer_types[...]", t, LAYER_TYPES)
            check(
                "sliding" not in self.layer_types or self.sliding_window is not None,
                "layer_types",
                self.layer_types,
                "has sliding layers but sliding_window is not set",
            )
        for name in ("attn_softcap", "final_softcap", "attn_scale"):
            check_finite(name, getattr(self, name), above=0, optional=True)
        if self.pad_token_id is not None:
            check(is_int(self.pad_token_id) and 0 <= self.pad_token_id < self.vocab_size, "pad_token_id",
                  self.pad_token_id, "must index the vocab")  # fmt: skip
        if self.mla is not None:
            check(self.position == "rope", "position", self.position, "MLA needs rope")
        self._check_tensor_sizes()

    def _check_tensor_sizes(self) -> None:
        """No weight has more elements than an int64 counts (each field is < 2**63, their products may not be)."""
        d, n = self.d_model, self.n_heads
        sizes = [("vocab_size", self.vocab_size, "vocab_size * d_model", self.vocab_size * d),
                 ("max_seq_len", self.max_seq_len, "max_seq_len * d_model", self.max_seq_len * d),
                 ("d_ff", self.d_ff, "d_model * d_ff", d * self.d_ff),
                 ("n_heads", n, "n_heads * head_dim * d_model", n * self.dim_head * d)]  # fmt: skip
        if (m := self.moe) is not None:
            sizes.append(("moe.d_expert", m.d_expert, "n_experts * d_expert * d_model", m.n_experts * m.d_expert * d))
            sizes.append(("moe.d_shared", m.d_shared, "the shared experts' size * d_model", m.shared_size * d))
        if (a := self.mla) is not None:
            q_rows, kv_rows = n * (a.qk_nope_head_dim + a.qk_rope_head_dim), n * (a.qk_nope_head_dim + a.v_head_dim)
            sizes.append(("mla.q_lora_rank", a.q_lora_rank, "the q projection", q_rows * (a.q_lora_rank or d)))
            sizes.append(("mla.kv_lora_rank", a.kv_lora_rank, "the kv up-projection", kv_rows * a.kv_lora_rank))
        for name, value, what, numel in sizes:
            check(numel < INT64_LIMIT, name, value, f"gives {what} = {numel} elements, more than 2**63")

    # derived sizes -------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dim_head(self) -> int:
        """Per-head size of q, k and v (for MLA: the rope part is separate)."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """How many channels of each q/k head RoPE rotates."""
        if self.mla is not None:
            return self.mla.qk_rope_head_dim
        return int(self.dim_head * self.rotary_fraction)

    @property
    def softmax_scale(self) -> float:
        if self.attn_scale is not None:
            return self.attn_scale
        qk_dim = self.dim_head if self.mla is None else self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim
        return 1.0 / math.sqrt(qk_dim)

    def layer_type(self, i: int) -> str:
        if self.layer_types is not None:
            return self.layer_types[i]
        return "sliding" if self.sliding_window is not None else "full"

    def is_moe_layer(self, i: int) -> bool:
        m = self.moe
        if m is None or i < m.first_k_dense or i in m.dense_layers:
            return False
        return (i + 1) % m.layer_step == 0

    # conversion ----------------------------------------------------------
    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see `PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, ModelConfig] = {
    # a tiny model for tests and the CPU speedrun
    "tiny": ModelConfig(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, max_seq_len=512),
    # ~20M parameters, Llama-style (benchmarks)
    "llama-20m": ModelConfig(
        vocab_size=8192, d_model=384, n_layers=8, n_heads=6, n_kv_heads=2, d_ff=1024, max_seq_len=1024
    ),
    # GPT-2 small (124M)
    "gpt2-124m": ModelConfig(
        arch="gpt2",
        vocab_size=50257,
        d_model=768,
        n_layers=12,
        n_heads=12,
        d_ff=3072,
        max_seq_len=1024,
        norm="layernorm",
        mlp="gelu_tanh",
        mlp_bias=True,
        attn_bias=True,
        attn_out_bias=True,
        position="learned",
        tie_embeddings=True,
    ),
    # SmolLM2-135M (Llama architecture)
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        d_ff=1536,
        max_seq_len=8192,
        rope_theta=100000.0,
        tie_embeddings=True,
    ),
}
