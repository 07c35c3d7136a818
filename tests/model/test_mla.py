"""Multi-head latent attention: parity with Hugging Face DeepSeek-V2/V3 attention (outputs and
gradients), absorbed form == plain form, and incremental decoding through the latent KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

from lmforge.config import MLAConfig, ModelConfig, RopeScaling
from lmforge.infer.kv_cache import KVCache
from lmforge.model.attention import build_mask
from lmforge.model.cache import AttentionInputs
from lmforge.model.mla import LatentAttention
from lmforge.model.position import rope_cos_sin

D, H, KV_RANK, NOPE, ROPE, V = 64, 4, 16, 8, 4, 8
B, T = 2, 9
THETA = 500.0
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 16,
}
# DeepSeek-V2 ships mscale = mscale_all_dim = 0.707; unequal values make the cos/sin factor differ from 1
YARN_UNEQUAL = {**YARN, "mscale": 0.707}


def make_cfg(q_lora: int | None = 24, **kw) -> ModelConfig:
    mla = MLAConfig(
        kv_lora_rank=KV_RANK, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V, q_lora_rank=q_lora
    )
    base = dict(vocab_size=50, d_model=D, n_layers=1, n_heads=H, d_ff=96, max_seq_len=64, mla=mla)
    return ModelConfig(**{**base, "rope_theta": THETA, "rope_layout": "interleaved", **kw})


def hf_config(version: str, q_lora: int | None, rope: dict | None, bias: bool = False, interleave: bool = True):
    cls = transformers.DeepseekV3Config if version == "v3" else transformers.DeepseekV2Config
    extra = {"rope_interleave": interleave} if version == "v3" else {}
    return cls(
        hidden_size=D,
        num_attention_heads=H,
        num_key_value_heads=H,
        q_lora_rank=q_lora,
        kv_lora_rank=KV_RANK,
        qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE,
        v_head_dim=V,
        max_position_embeddings=64,
        attention_bias=bias,
        rope_parameters={"rope_theta": THETA, **(rope or {"rope_type": "default"})},
        attn_implementation="eager",
        **extra,
    )


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # RMSNorm weights and biases too
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def rope_scaling(rope: dict | None) -> RopeScaling | None:
    if rope is None:
        return None
    return RopeScaling(
        kind="yarn",
        factor=rope["factor"],
        original_max_seq_len=rope["original_max_position_embeddings"],
        mscale=rope["mscale"],
        mscale_all_dim=rope["mscale_all_dim"],
    )


def expected_scale(rope: dict | None) -> float:
    """HF DeepSeek: qk_head_dim^-1/2, times mscale(factor, mscale_all_dim)^2 under yarn."""
    scale = (NOPE + ROPE) ** -0.5
    if rope is not None and rope["mscale_all_dim"]:
        scale *= (0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1.0) ** 2
    return scale


def hf_pair(version: str, q_lora: int | None, rope: dict | None, bias: bool = False, interleave: bool = True):
    """A randomised HF attention and the LatentAttention holding the same weights."""
    hcfg = hf_config(version, q_lora, rope, bias, interleave)
    mod = hf_v3 if version == "v3" else hf_v2
    hf = (mod.DeepseekV3Attention if version == "v3" else mod.DeepseekV2Attention)(hcfg, layer_idx=0)
    randomize(hf)
    rotary = (mod.DeepseekV3RotaryEmbedding if version == "v3" else mod.DeepseekV2RotaryEmbedding)(hcfg)
    assert hf.scaling == pytest.approx(expected_scale(rope), rel=1e-12)
    cfg = make_cfg(
        q_lora,
        rope_scaling=rope_scaling(rope),
        attn_scale=expected_scale(rope),
        attn_bias=bias,
        attn_out_bias=bias,
        rope_layout="interleaved" if interleave else "half",
    )
    ours = LatentAttention(cfg, 0)
    ours.runtime.attn_backend = "eager"
    ours.load_state_dict(hf.state_dict())  # strict: the parameter names are HF's
    return hf, rotary, ours


def run_hf(hf, rotary, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(x.dtype).min)
    pe = rotary(x, positions)
    return hf(hidden_states=x, position_embeddings=pe, attention_mask=additive)[0]


def run_ours(attn: LatentAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    cos, sin = rope_cos_sin(attn.cfg, torch.arange(x.shape[1]).expand(x.shape[0], -1))
    return attn(x, AttentionInputs(cos=cos, sin=sin, masks={"full": mask}))


def causal(t: int = T) -> torch.Tensor:
    return build_mask(torch.arange(t), torch.arange(t), None, None)


def inputs_x(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


HF_CASES = [
    (version, q_lora, rope, False, True) for version in ("v2", "v3") for q_lora in (24, None) for rope in (None, YARN)
] + [
    ("v2", 24, YARN_UNEQUAL, False, True),
    ("v3", 24, YARN, True, True),  # attention_bias: q_a_proj, kv_a_proj_with_mqa, o_proj
    ("v3", 24, None, False, False),  # rope_interleave False: the "half" layout
]


@pytest.mark.parametrize("version,q_lora,rope,bias,interleave", HF_CASES)
def test_matches_hf(version, q_lora, rope, bias, interleave):
    hf, rotary, ours = hf_pair(version, q_lora, rope, bias, interleave)
    x = inputs_x()
    with torch.no_grad():
        ref = run_hf(hf, rotary, x, causal())
        for absorb in (False, True):
            ours.runtime.mla_absorb = absorb
            torch.testing.assert_close(run_ours(ours, x, None), ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(run_ours(ours, x, causal()), ref, atol=1e-5, rtol=0)


def test_matches_hf_with_padding():
    hf, rotary, ours = hf_pair("v3", 24, YARN)
    x = inputs_x()
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :3] = False
    mask = build_mask(torch.arange(T), torch.arange(T), valid, None)
    with torch.no_grad():
        ref = run_hf(hf, rotary, x, mask)
        torch.testing.assert_close(run_ours(ours, x, mask), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_matches_hf_small_inputs(version):
    """Tiny activations make the latent norms' eps matter (DeepSeek uses 1e-6 there, whatever rms_norm_eps)."""
    hf, rotary, ours = hf_pair(version, 24, None)
    x = inputs_x() * 1e-2
    with torch.no_grad():
        torch.testing.assert_close(run_ours(ours, x, None), run_hf(hf, rotary, x, causal()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_gradients_match_hf(version):
    hf, rotary, ours = hf_pair(version, 24, YARN)
    x_hf = inputs_x().requires_grad_()
    x_ours = inputs_x().requires_grad_()
    w = torch.randn(B, T, D, generator=torch.Generator().manual_seed(7))
    (run_hf(hf, rotary, x_hf, causal()) * w).sum().backward()
    (run_ours(ours, x_ours, None) * w).sum().backward()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    assert rel(x_ours.grad, x_hf.grad) <= 1e-4
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert rel(p.grad, hf_params[name].grad) <= 1e-4, name


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("q_lora", [24, None])
def test_absorbed_equals_plain(backend, padded, q_lora):
    torch.manual_seed(0)
    ref_attn = LatentAttention(make_cfg(q_lora), 0)
    ref_attn.runtime.attn_backend = "eager"
    randomize(ref_attn, seed=3)
    attn = LatentAttention(make_cfg(q_lora), 0)
    attn.runtime.attn_backend = backend
    attn.load_state_dict(ref_attn.state_dict())
    x = inputs_x(2)
    mask = None
    if padded:
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[0, :4] = False
        mask = build_mask(torch.arange(T), torch.arange(T), valid, None)
    with torch.no_grad():
        ref = run_ours(ref_attn, x, mask)  # plain form, eager backend
        for absorb in (False, True):
            attn.runtime.mla_absorb = absorb
            torch.testing.assert_close(run_ours(attn, x, mask), ref, atol=1e-5, rtol=0)


class SpyCache(KVCache):
    """Records the shapes of the tensors a layer stores."""

    def __init__(self, max_len: int) -> None:
        super().__init__(max_len)
        self.stored: list[tuple[torch.Size, ...]] = []

    def store(self, layer: int, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if layer >= 0:  # not the positions the cache keeps for itself
            self.stored.append(tuple(t.shape for t in new))
        return super().store(layer, new)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("absorb", [False, True])
def test_incremental_decoding_matches_full(backend, absorb):
    attn = LatentAttention(make_cfg(24, rope_scaling=rope_scaling(YARN)), 0)
    attn.runtime.attn_backend, attn.runtime.mla_absorb = backend, absorb
    randomize(attn, seed=4)
    x = inputs_x(3)
    with torch.no_grad():
        full = run_ours(attn, x, None)
        cache = SpyCache(max_len=16)
        outs = []
        for start, end in [(0, 5), (5, 6), (6, 7), (7, 8), (8, 9)]:
            t, past = end - start, start
            positions = torch.arange(past, past + t).expand(B, -1)
            keys = cache.prepare(None, positions)  # the Transformer's protocol: prepare, run the layers, commit
            cos, sin = rope_cos_sin(attn.cfg, positions)
            mask = None if (t == 1 or past == 0) else build_mask(positions, keys.positions, keys.valid, None)
            outs.append(attn(x[:, start:end], AttentionInputs(cos=cos, sin=sin, masks={"full": mask}, cache=cache)))
            cache.commit()
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=0)
    # only the normalised latent and the roped shared key are cached
    assert cache.stored[0] == (torch.Size([B, 5, KV_RANK]), torch.Size([B, 5, ROPE]))
    assert all(s == (torch.Size([B, 1, KV_RANK]), torch.Size([B, 1, ROPE])) for s in cache.stored[1:])


@pytest.mark.parametrize("absorb", [False, True])
def test_transformer_cached_generation_with_left_padding(absorb):
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(make_cfg(24, n_layers=2)).eval()
    model.runtime.mla_absorb = absorb
    ids = torch.randint(0, 50, (B, 7))
    am = torch.ones(B, 7, dtype=torch.long)
    am[1, :2] = 0
    with torch.no_grad():
        full = model(ids, am)
        cache = KVCache(max_len=16)
        steps = [model(ids[:, :4], am[:, :4], cache=cache)]
        for i in range(4, 7):
            steps.append(model(ids[:, i : i + 1], am[:, : i + 1], cache=cache))
    real = am.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=1e-5, rtol=0)
