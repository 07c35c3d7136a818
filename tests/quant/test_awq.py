"""AWQ (quant/awq.py) against a reimplementation, in this file, of the reference loops of llm-awq
(mit-han-lab/llm-awq, awq/quantize/quantizer.py `pseudo_quantize_tensor`, auto_scale.py `_search_module_scale`,
auto_clip.py `auto_clip_layer`), written the way they are written there (in-place weight edits and a state-dict
restore, broadcast products), in float64 where the reference works in float16; plus invariants: folding scales
leaves a float model's function unchanged, AWQ beats round-to-nearest on a model with outlier channels, and what
AWQ cannot handle is refused before any work."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmforge.config import MLAConfig, ModelConfig, MoEConfig
from lmforge.model.mlp import MLP
from lmforge.model.norm import LayerNorm, RMSNorm
from lmforge.model.transformer import Transformer
from lmforge.quant import awq
from lmforge.quant.awq import (
    apply_clip,
    awq_quantize_model,
    fold_scales,
    pseudo_quantize,
    search_clip,
    search_scale,
)
from lmforge.quant.calibration import for_each_block
from lmforge.quant.primitives import QuantError, quantize_asymmetric

# ----------------------------------------------------------------------------------------------------- reference


def ref_pseudo_quantize(w: torch.Tensor, n_bit: int, q_group_size: int) -> torch.Tensor:
    """llm-awq's pseudo_quantize_tensor, zero_point=True."""
    org_w_shape = w.shape
    if q_group_size > 0:
        w = w.reshape(-1, q_group_size)
    max_val = w.amax(dim=1, keepdim=True)
    min_val = w.amin(dim=1, keepdim=True)
    max_int, min_int = 2**n_bit - 1, 0
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(min_int, max_int)
    w = (torch.clamp(torch.round(w / scales) + zeros, min_int, max_int) - zeros) * scales
    return w.reshape(org_w_shape)


@torch.no_grad()
def ref_search_module_scale(block: nn.Module, linears2scale: list[nn.Linear], x: torch.Tensor, n_bit: int,
                            group: int) -> tuple[float, torch.Tensor, list[float]]:  # fmt: skip
    """llm-awq's _search_module_scale (the loss without its float16 -> float32 cast: everything is float64)."""
    org_out = block(x)
    x_max = x.abs().view(-1, x.shape[-1]).mean(0)
    best_error, best_ratio, best_scales = float("inf"), -1, None
    n_grid, history = 20, []
    org_sd = {k: v.clone() for k, v in block.state_dict().items()}
    for ratio in range(n_grid):
        ratio = ratio * 1 / n_grid
        scales = x_max.pow(ratio).clamp(min=1e-4).view(-1)
        scales = scales / (scales.max() * scales.min()).sqrt()
        for fc in linears2scale:
            fc.weight.mul_(scales.view(1, -1))
            fc.weight.data = ref_pseudo_quantize(fc.weight.data, n_bit, group) / (scales.view(1, -1))
        out = block(x)
        loss = (org_out - out).pow(2).mean().item()
        history.append(loss)
        if loss < best_error:
            best_error, best_ratio, best_scales = loss, ratio, scales
        block.load_state_dict(org_sd)
    return best_ratio, best_scales.view(-1), history


@torch.no_grad()
def ref_auto_clip_layer(w: torch.Tensor, input_feat: torch.Tensor, n_bit: int, group_size: int, n_grid: int = 20,
                        max_shrink: float = 0.5, n_sample_token: int = 512) -> torch.Tensor:  # fmt: skip
    """llm-awq's auto_clip_layer (one output-row batch: the batching only bounds memory); (co, n_group, 1)."""
    input_feat = input_feat.view(-1, input_feat.shape[-1])
    input_feat = input_feat.reshape(1, input_feat.shape[0], -1, group_size)
    input_feat = input_feat[:, 0 :: max(1, input_feat.shape[1] // n_sample_token)]
    w = w.reshape(w.shape[0], 1, -1, group_size)
    org_max_val = w.abs().amax(dim=-1, keepdim=True)  # co, 1, n_group, 1
    best_max_val = org_max_val.clone()
    min_errs = torch.ones_like(org_max_val) * 1e9
    org_out = (input_feat * w).sum(dim=-1)  # co, n_token, n_group
    for i_s in range(int(max_shrink * n_grid)):
        max_val = org_max_val * (1 - i_s / n_grid)
        cur_w = torch.clamp(w, -max_val, max_val)
        q_w = ref_pseudo_quantize(cur_w, n_bit, group_size)
        cur_out = (input_feat * q_w).sum(dim=-1)
        err = (cur_out - org_out).pow(2).mean(dim=1).view(min_errs.shape)
        cur_best_idx = err < min_errs
        min_errs[cur_best_idx] = err[cur_best_idx]
        best_max_val[cur_best_idx] = max_val[cur_best_idx]
    return best_max_val.squeeze(1)


# ----------------------------------------------------------------------------------------------------- fixtures


def outlier_features(tokens: int, d: int, channels: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """float64 activations ~ N(0, 1) with a few input channels ~20x larger (outlier features)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64)
    x[:, list(channels)] *= 20
    return x


def tiny_model(seed: int = 0, outliers: bool = True, **overrides) -> Transformer:
    torch.manual_seed(seed)
    fields = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64)
    model = Transformer(ModelConfig(**{**fields, **overrides})).eval()
    if outliers:  # outlier input channels: a few norm weights scaled up (Gemma's (1 + w): the offset)
        with torch.no_grad():
            for block in model.blocks:
                for norm, chans in ((block.attn_norm, [3, 17, 40]), (block.mlp_norm, [5, 33])):
                    if getattr(norm, "unit_offset", False):
                        norm.weight[chans] = 19.0
                    else:
                        norm.weight[chans] *= 20
    return model


def windows(n: int = 6, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def rtn(model: Transformer, bits: int, group_size: int) -> Transformer:
    """Round-to-nearest: every block linear pseudo-quantized as it is (the reference's quantizer)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in out.named_modules():
            if isinstance(m, nn.Linear) and name.startswith("blocks."):
                m.weight.copy_(ref_pseudo_quantize(m.weight, bits, group_size))
    return out


# ----------------------------------------------------------------------------------------------------- quantizer


def test_pseudo_quantize_is_the_reference_and_the_zero_point_quantizer_on_groups_that_straddle_zero() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for bits, group in ((4, 16), (3, 32), (8, 64), (4, None)):
        got = pseudo_quantize(w, bits, group)
        torch.testing.assert_close(got, ref_pseudo_quantize(w, bits, group or -1), rtol=0, atol=0)
        # every group holds both signs here, where quant/primitives' widened range is the group's own
        if bits in (4, 8):
            prim = quantize_asymmetric(w.float(), bits, group_size=group or 64).dequantize()
            torch.testing.assert_close(got.float(), prim, rtol=0, atol=1e-6)


def test_pseudo_quantize_by_hand_a_positive_group_clips_at_its_far_end() -> None:
    # 2 bits, [0.5, 2]: step 1.5 / 3 = 0.5, zero clamp(-round(1), 0, 3) = 0, codes [1, 2, 3, 4 -> 3]
    got = pseudo_quantize(torch.tensor([[0.5, 1.0, 1.5, 2.0]]), bits=2, group_size=4)
    assert got.tolist() == [[0.5, 1.0, 1.5, 1.5]]


# ----------------------------------------------------------------------------------------------------- scales


def toy_mlp(d: int = 32, f: int = 48, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(d, f, "swiglu").double()


def test_scale_search_equals_the_reference_loop() -> None:
    norm = RMSNorm(32).double()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 32, dtype=torch.float64))
    x = norm(outlier_features(96, 32, (2, 11, 29)))
    for bits, group in ((4, 16), (3, 8)):
        mlp = toy_mlp()
        before = copy.deepcopy(mlp.state_dict())
        found = search_scale(x, [mlp.gate_proj, mlp.up_proj], mlp, bits=bits, group_size=group)
        for k, v in mlp.state_dict().items():  # the search puts the weights back
            assert torch.equal(v, before[k])
        ratio, scales, history = ref_search_module_scale(mlp, [mlp.gate_proj, mlp.up_proj], x, bits, group)
        assert found.ratio == ratio and ratio > 0  # the outlier channels make scaling pay
        torch.testing.assert_close(found.scales, scales, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.tensor(found.errors), torch.tensor(history), rtol=1e-12, atol=0)
        assert min(history) < history[0]  # better than round-to-nearest (α = 0)

    # a single linear is its own module (llm-awq's o_proj / down_proj groups)
    lin = nn.Linear(32, 24).double()
    found = search_scale(x, [lin], bits=4, group_size=16)
    ratio, scales, history = ref_search_module_scale(lin, [lin], x, 4, 16)
    assert found.ratio == ratio
    torch.testing.assert_close(found.scales, scales, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(found.errors), torch.tensor(history), rtol=1e-12, atol=0)


def test_folding_scales_into_norms_and_linears_keeps_the_function() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 32, generator=g)
    scales = torch.exp(torch.randn(32, generator=g))
    for norm in (RMSNorm(32), RMSNorm(32, unit_offset=True), LayerNorm(32), nn.LayerNorm(32)):
        with torch.no_grad():
            for p in norm.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        lin = nn.Linear(32, 8)
        expected = lin(norm(x))
        fold_scales(norm, [lin], scales)
        torch.testing.assert_close(lin(norm(x)), expected, rtol=0, atol=1e-5)
    up, down = nn.Linear(32, 16), nn.Linear(16, 8)
    s16 = scales[:16]
    expected = down(up(x))
    fold_scales(up, [down], s16)
    torch.testing.assert_close(down(up(x)), expected, rtol=0, atol=1e-5)
    with pytest.raises(QuantError, match="cannot fold scales into a GELU"):
        fold_scales(nn.GELU(), [down], s16)


@pytest.mark.parametrize("overrides", [
    {},  # Llama: RMSNorm, SwiGLU, MHA (v -> o)
    {"norm": "layernorm", "mlp": "gelu_tanh", "mlp_bias": True, "attn_bias": True, "attn_out_bias": True},  # GPT-2
    {"norm_unit_offset": True, "post_norms": True, "mlp": "geglu", "n_kv_heads": 2},  # Gemma 2 style, GQA
])  # fmt: skip
def test_folding_every_group_of_a_model_leaves_its_outputs_unchanged(overrides: dict) -> None:
    model = tiny_model(**overrides)
    ids = windows(2, 16)
    with torch.no_grad():
        expected = model(ids)
        g = torch.Generator().manual_seed(0)
        for block in model.blocks:
            attn, mlp = block.attn, block.mlp

            def s(n: int) -> torch.Tensor:
                return torch.exp(0.7 * torch.randn(n, generator=g))

            fold_scales(block.attn_norm, [attn.q_proj, attn.k_proj, attn.v_proj], s(64))
            if attn.v_proj.out_features == attn.o_proj.in_features:
                fold_scales(attn.v_proj, [attn.o_proj], s(64))
            fold_scales(block.mlp_norm, [m for m in (mlp.gate_proj, mlp.up_proj) if m is not None], s(64))
            if mlp.gate_proj is not None:
                fold_scales(mlp.up_proj, [mlp.down_proj], s(128))
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- clipping


def test_clip_search_equals_the_reference_loop() -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 64, generator=g, dtype=torch.float64)
    w[::7, 3] *= 6  # a few large weights: clipping them pays
    x = outlier_features(200, 64, (9,), seed=6)
    for bits, group, n_sample in ((4, 16, 64), (3, 32, 512), (4, None, 50)):
        got = search_clip(w, x, bits=bits, group_size=group, n_sample_token=n_sample)
        expected = ref_auto_clip_layer(w, x, bits, group or 64, n_sample_token=n_sample)
        torch.testing.assert_close(got, expected[..., 0], rtol=0, atol=1e-12)
        assert (got < w.reshape(40, -1, group or 64).abs().amax(-1)).any()  # some groups do clip
    lin = nn.Linear(64, 40, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(w)
    apply_clip(lin, got)
    torch.testing.assert_close(lin.weight, w.clamp(-got, got), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------- the model


def output_error(model: Transformer, reference: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(ids) - reference).pow(2).mean().item()


@pytest.mark.parametrize("overrides", [{}, {"norm": "layernorm", "mlp": "gelu", "attn_bias": True, "n_kv_heads": 2}])
def test_awq_beats_round_to_nearest_on_a_model_with_outlier_channels(overrides: dict) -> None:
    model, bits, group = tiny_model(**overrides), 4, 16
    held_out = windows(4, 24, seed=9)
    with torch.no_grad():
        reference = model(held_out)
    quantized = copy.deepcopy(model)
    result = awq_quantize_model(quantized, windows(), bits=bits, group_size=group, progress=False)
    awq_error = output_error(quantized, reference, held_out)
    rtn_error = output_error(rtn(model, bits, group), reference, held_out)
    assert awq_error < 0.5 * rtn_error, (awq_error, rtn_error)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    assert sorted(result.quantized) == sorted(names)
    assert not any(n.endswith(("q_proj", "k_proj")) for n in result.clips)  # q/k are not clipped (llm-awq)
    for name in names:  # every weight lies on its group's grid: at most 2^bits values per group
        w = quantized.get_submodule(name).weight.detach().reshape(-1, group)
        assert max(len(set(row.tolist())) for row in w) <= 2**bits
    folded = {s.prev.split(".", 2)[-1] for s in result.scales}
    gated, mha = not overrides, "n_kv_heads" not in overrides
    assert folded == {"attn_norm", "mlp_norm"} | ({"mlp.up_proj"} if gated else set()) | (
        {"attn.v_proj"} if mha else set())  # fmt: skip
    assert model.lm_head.weight.equal(quantized.lm_head.weight)


class _AttentionOf(nn.Module):
    """A block's attention as a module of its normed input alone (llm-awq's `module2inspect=self_attn` + kwargs)."""

    def __init__(self, attn: nn.Module, inputs) -> None:
        super().__init__()
        self.attn, self.inputs = attn, inputs

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn(h, self.inputs)


@torch.no_grad()
def ref_awq_block(block: nn.Module, x: torch.Tensor, inputs, bits: int, group: int, ratios: list[float]) -> None:
    """llm-awq's run_awq body for one Llama block: record the linears' inputs, search the four scales on the
    unmodified block (auto_scale_block), apply them and divide the recorded inputs (apply_scale), clip all but q/k
    (auto_clip_block, apply_clip), then pseudo-quantize every linear (pseudo_quantize_model_weight)."""
    attn, mlp = block.attn, block.mlp
    feats = {}
    names = {"q": attn.q_proj, "o": attn.o_proj, "up": mlp.up_proj, "down": mlp.down_proj}
    hooks = [m.register_forward_hook(lambda _m, a, _o, k=k: feats.__setitem__(k, a[0].clone()))
             for k, m in names.items()]  # fmt: skip
    block(x, inputs)
    for h in hooks:
        h.remove()
    plan = [
        (block.attn_norm, [attn.q_proj, attn.k_proj, attn.v_proj], _AttentionOf(attn, inputs), "q"),
        (attn.v_proj, [attn.o_proj], attn.o_proj, "o"),
        (block.mlp_norm, [mlp.gate_proj, mlp.up_proj], mlp, "up"),
        (mlp.up_proj, [mlp.down_proj], mlp.down_proj, "down"),
    ]
    found = [ref_search_module_scale(module, layers, feats[key], bits, group) for _, layers, module, key in plan]
    for (prev, layers, _, key), (ratio, scales, _) in zip(plan, found, strict=True):
        ratios.append(ratio)
        if isinstance(prev, nn.Linear):  # scale_fc_fc
            prev.weight.div_(scales.view(-1, 1))
        else:  # scale_ln_fcs
            prev.weight.div_(scales)
        for fc in layers:
            fc.weight.mul_(scales.view(1, -1))
        feats[key].div_(scales.view(1, -1))
    for lin, key in ((attn.v_proj, "q"), (attn.o_proj, "o"), (mlp.gate_proj, "up"), (mlp.up_proj, "up"),
                     (mlp.down_proj, "down")):  # fmt: skip
        max_val = ref_auto_clip_layer(lin.weight, feats[key], bits, group)
        shape = lin.weight.shape
        lin.weight.data = torch.clamp(lin.weight.data.reshape(*max_val.shape[:2], -1), -max_val, max_val).reshape(shape)
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        lin.weight.data = ref_pseudo_quantize(lin.weight.data, bits, group)


def test_the_model_pass_equals_the_reference_pipeline_block_by_block() -> None:
    model, bits, group = tiny_model(seed=2), 4, 16
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    result = awq_quantize_model(ours, windows(), bits=bits, group_size=group, progress=False)
    ratios: list[float] = []
    for_each_block(theirs, windows(), lambda _, b, x, inputs: ref_awq_block(b, x, inputs, bits, group, ratios),
                   progress=False)  # fmt: skip
    assert [s.ratio for s in result.scales] == ratios
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)


def test_where_restricts_what_is_quantized_and_the_rest_keeps_its_weights() -> None:
    model = tiny_model()
    quantized = copy.deepcopy(model)
    result = awq_quantize_model(quantized, windows(3, 16), group_size=16, where="blocks.*.mlp.*", progress=False)
    assert all(".mlp." in n for n in result.quantized) and len(result.quantized) == 6
    for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"):
        for i in range(2):
            assert quantized.get_submodule(f"blocks.{i}.{name}").weight.equal(
                model.get_submodule(f"blocks.{i}.{name}").weight)  # fmt: skip


# ----------------------------------------------------------------------------------------------------- refusals


@pytest.fixture
def no_work(monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("calibration started before the arguments were checked")

    monkeypatch.setattr(awq, "for_each_block", fail)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bits": 1}, "bits=1 must be an integer in 2..8"),
    ({"bits": 9}, "bits=9"),
    ({"bits": 4.0}, "bits=4.0"),
    ({"group_size": 0}, "group_size=0 must be a positive integer"),
    ({"group_size": -1}, "group_size=-1"),
    ({"group_size": 48}, "group_size=48 does not divide the 64 input features of blocks.0.attn.q_proj"),
    ({"n_grid": 0}, "n_grid=0"),
    ({"where": "lm_head"}, "lm_head is outside them"),
    ({"where": "blocks.*.attn_norm"}, "selects no linear layer"),
])  # fmt: skip
def test_bad_arguments_are_refused_before_any_work(no_work, kwargs: dict, message: str) -> None:
    model = tiny_model(outliers=False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(QuantError, match=message):
        awq_quantize_model(model, windows(2, 8), **kwargs, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("overrides", "message"), [
    ({"moe": MoEConfig(n_experts=4, top_k=2, d_expert=32)}, r"blocks.0.mlp of the Transformer is a MoE"),
    ({"mla": MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)},
     r"blocks.0.attn of the Transformer is a LatentAttention \(multi-head latent attention"),
])  # fmt: skip
def test_unsupported_architectures_are_refused_before_any_work(no_work, overrides: dict, message: str) -> None:
    model = tiny_model(outliers=False, **overrides)
    with pytest.raises(QuantError, match=message):
        awq_quantize_model(model, windows(2, 8), group_size=16, progress=False)


def test_a_shared_norm_or_another_block_is_refused(no_work) -> None:
    model = tiny_model(outliers=False)
    model.blocks[1].mlp_norm = model.blocks[0].mlp_norm  # one norm read by two blocks: a fold would change both
    with pytest.raises(QuantError, match=r"blocks\.0\.mlp_norm\.weight of the Transformer is shared"):
        awq_quantize_model(model, windows(2, 8), group_size=16, progress=False)
    model = tiny_model(outliers=False)
    model.blocks[0] = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(QuantError, match=r"blocks\.0 of the Transformer is a Sequential"):
        awq_quantize_model(model, windows(2, 8), group_size=16, progress=False)
    with pytest.raises(QuantError, match="not an lmforge Transformer"):
        awq_quantize_model(nn.Sequential(nn.Linear(4, 4)), windows(2, 8), group_size=4, progress=False)
