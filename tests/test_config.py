"""ModelConfig: validation names the field; HF translation round-trips; presets have known sizes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_reference import hf_config
from lmforge.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, RopeScaling
from lmforge.io.hf_arch import SUPPORTED, UnsupportedArchitectureError, config_from_hf, config_to_hf
from lmforge.model.runtime import RuntimeOptions
from lmforge.model.transformer import Transformer
from lmforge.utils.errors import LmforgeError


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"d_model": 0}, "d_model"),
        ({"n_heads": 3}, "head_dim"),  # 512 / 3 is not whole
        ({"n_kv_heads": 3}, "n_kv_heads"),  # does not divide 8 heads
        ({"norm": "batchnorm"}, "norm"),
        ({"mlp": "relu2"}, "mlp"),
        ({"position": "xpos"}, "position"),
        ({"rope_layout": "spiral"}, "rope_layout"),
        ({"rotary_fraction": 1.5}, "rotary_fraction"),
        ({"layer_types": ("full",)}, "layer_types"),
        ({"layer_types": ("sliding",) * 8}, "layer_types"),  # no sliding_window
        ({"attn_softcap": -1.0}, "attn_softcap"),
        ({"pad_token_id": 10**6}, "pad_token_id"),
        ({"pad_token_id": "1"}, "pad_token_id"),
        ({"vocab_size": "many"}, "vocab_size"),
        ({"vocab_size": True}, "vocab_size"),
        ({"vocab_size": 2**63}, "vocab_size"),  # outside int64
        ({"n_layers": 2**64}, "n_layers"),
        ({"vocab_size": 2**40, "d_model": 2**40, "head_dim": 64}, "vocab_size"),  # vocab x d_model overflows int64
        ({"rope_theta": float("nan")}, "rope_theta"),
        ({"rope_theta": float("inf")}, "rope_theta"),
        ({"rope_theta": 0.0}, "rope_theta"),
        ({"rope_theta": "1e4"}, "rope_theta"),
        ({"norm_eps": float("inf")}, "norm_eps"),
        ({"norm_eps": float("nan")}, "norm_eps"),
        ({"attn_scale": float("nan")}, "attn_scale"),
        ({"final_softcap": float("inf")}, "final_softcap"),
        ({"rotary_fraction": float("nan")}, "rotary_fraction"),
        ({"rotary_fraction": "half"}, "rotary_fraction"),
        ({"layer_types": 3}, "layer_types"),
    ],
)
def test_bad_value_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        ModelConfig(**changes)


def test_runtime_options_are_not_config_fields():
    """The attention backend is a runtime option (checked there), not part of what a checkpoint defines."""
    with pytest.raises(ConfigError, match=r"\battn_backend\b"):
        RuntimeOptions(attn_backend="flash9")
    assert "attn_backend" not in {f.name for f in dataclasses.fields(ModelConfig)}


def rope(kind: str, **kw) -> RopeScaling:
    return RopeScaling(kind=kind, original_max_seq_len=64, **kw)


def moe(**kw) -> MoEConfig:
    return MoEConfig(n_experts=4, top_k=2, d_expert=8, **kw)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: RopeScaling(kind="ntk-by-parts"), "rope_scaling.kind"),
        (lambda: RopeScaling(kind="llama3", factor=8.0), "rope_scaling.original_max_seq_len"),
        (lambda: MLAConfig(kv_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8), "mla.kv_lora_rank"),
        (lambda: MoEConfig(n_experts=4, top_k=5, d_expert=8), "moe.top_k"),
        (lambda: RopeScaling(kind="linear", factor=float("inf")), "rope_scaling.factor"),
        (lambda: rope("yarn", attention_factor=float("nan")), "rope_scaling.attention_factor"),
        (lambda: rope("yarn", beta_fast=float("inf")), "rope_scaling.beta_fast"),
        (lambda: rope("llama3", low_freq_factor=2.0, high_freq_factor=2.0), "rope_scaling.high_freq_factor"),
        (lambda: RopeScaling(kind="dynamic", original_max_seq_len=2**63), "rope_scaling.original_max_seq_len"),
        (lambda: moe(routed_scaling_factor=float("nan")), "moe.routed_scaling_factor"),
        (lambda: moe(aux_loss_coef=float("inf")), "moe.aux_loss_coef"),
        (lambda: moe(dense_layers=(-1,)), r"moe.dense_layers\[0\]"),
        (lambda: moe(first_k_dense="1"), "moe.first_k_dense"),
        (lambda: MLAConfig(kv_lora_rank=2**63, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8), "mla.kv_lora"),
        (lambda: ModelConfig(moe=MoEConfig(n_experts=2**20, top_k=2, d_expert=2**40)), "moe.d_expert"),  # overflow
    ],
)
def test_nested_bad_value_names_the_field(make, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make()


@pytest.mark.parametrize("arch", SUPPORTED)
def test_hf_config_round_trip(arch):
    cfg = config_from_hf(hf_config(arch).to_dict())
    assert cfg.arch == arch
    again = config_from_hf(config_to_hf(cfg))
    assert again == cfg
    assert again.extra == cfg.extra


@pytest.mark.parametrize("arch", SUPPORTED)
def test_to_hf_is_accepted_by_transformers(arch):
    import transformers

    cfg = config_from_hf(hf_config(arch).to_dict())
    hf = transformers.AutoConfig.for_model(**config_to_hf(cfg))
    assert config_from_hf(hf.to_dict()) == cfg


def test_a_nan_rope_theta_in_config_json_is_refused():
    """The value checks live in ModelConfig, so they also cover configs mapped from config.json (JSON allows NaN)."""
    d = hf_config("llama").to_dict()
    d.pop("rope_parameters", None)
    d["rope_theta"] = float("nan")
    with pytest.raises(LmforgeError, match="rope_theta"):
        config_from_hf(d)


def test_unsupported_architecture_is_named():
    with pytest.raises(UnsupportedArchitectureError, match="'bert'"):
        config_from_hf({"model_type": "bert"})


def test_unsupported_rope_type_is_named():
    d = hf_config("llama").to_dict()
    d["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4}
    with pytest.raises(UnsupportedArchitectureError, match="longrope"):
        config_from_hf(d)


def test_presets_have_known_sizes():
    with torch.device("meta"):
        # GPT-2 small has 124,439,808 parameters (tied head), as published
        assert Transformer(ModelConfig.preset("gpt2-124m")).num_parameters() == 124_439_808
        n = Transformer(ModelConfig.preset("llama-20m")).num_parameters()
        assert 15e6 < n < 25e6
        assert Transformer(ModelConfig.preset("smollm2-135m")).num_parameters() == 134_515_008
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'"):
        ModelConfig.preset("gpt5")


def test_layer_helpers():
    cfg = ModelConfig(n_layers=4, sliding_window=8, layer_types=("sliding", "full", "sliding", "full"))
    assert [cfg.layer_type(i) for i in range(4)] == ["sliding", "full", "sliding", "full"]
    moe = ModelConfig(n_layers=4, moe=MoEConfig(n_experts=4, top_k=2, d_expert=16, first_k_dense=1, layer_step=1))
    assert [moe.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
