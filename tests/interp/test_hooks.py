"""Hook points against TransformerLens 3.9 (same weights, both architectures), and the hook machinery itself."""

from __future__ import annotations

import pytest
import torch

from interp_reference import CONFIGS, random_model
from lmforge.infer.kv_cache import KVCache
from lmforge.interp import HookError, add_hook, hook_names, hooks, remove_hooks, run_with_cache, run_with_hooks

TOL = {"atol": 1e-5, "rtol": 1e-5, "check_dtype": False}  # patterns and RMSNorm x_hat are float32 here


def test_every_cached_activation_matches_transformer_lens(pair, tokens):
    model, tl = pair
    ours = run_with_cache(model, tokens)
    _, theirs = tl.run_with_cache(tokens)
    assert set(ours) <= set(theirs.keys()), f"names TransformerLens lacks: {set(ours) - set(theirs.keys())}"
    rope = model.config.position == "rope"  # RoPE: rot_q/k and a gated MLP's hook_pre_linear; else hook_pos_embed
    assert len(ours) == model.config.n_layers * (19 if rope else 16) + (2 if rope else 3)
    for name, ours_value in ours.items():
        torch.testing.assert_close(ours_value, theirs[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_hooks_fire_in_the_listed_order(pair, tokens):
    model, _ = pair
    fired = []
    run_with_hooks(model, tokens, [(lambda name: True, lambda x, name: fired.append(name))])
    assert fired == hook_names(model)


@pytest.mark.parametrize("point", ["attn.hook_z", "attn.hook_result", "attn.hook_pattern", "hook_mlp_out"])
def test_zero_ablation_changes_the_logits_as_in_transformer_lens(pair, tokens, point):
    model, tl = pair
    layer, head = 1, 2
    name = f"blocks.{layer}.{point}"

    def ablate(x, hook):  # TransformerLens passes the HookPoint, we pass the name: the body is the same
        x = x.clone()
        if "pattern" in name:
            x[:, head] = 0
        elif "mlp" in name:
            x[:, 3] = 0
        else:
            x[:, :, head] = 0
        return x

    ours = run_with_hooks(model, tokens, [(name, ablate)])
    theirs = tl.run_with_hooks(tokens, fwd_hooks=[(name, ablate)])
    torch.testing.assert_close(ours, theirs, **TOL)
    assert (ours - model(tokens)).abs().max() > 1e-2  # the ablation did something


def test_observing_hooks_leave_the_forward_bit_identical(tokens):
    model = random_model(CONFIGS["llama"])
    reference = model(tokens)
    model.runtime.attn_backend = "eager"
    eager = model(tokens)
    model.runtime.attn_backend = "sdpa"
    seen = []
    observe = lambda x, name: seen.append(name)  # returns None: observe only
    skip = ("hook_pattern", "hook_attn_scores", "hook_result")  # these switch the layer's arithmetic
    assert torch.equal(run_with_hooks(model, tokens, [(lambda n: not n.endswith(skip), observe)]), reference)
    assert seen and not any(n.endswith(skip) for n in seen)
    model.runtime.attn_backend = "eager"  # the explicit softmax of a pattern hook is the eager backend's
    assert torch.equal(run_with_hooks(model, tokens, [(lambda n: n.endswith("hook_pattern"), observe)]), eager)
    model.runtime.attn_backend = "sdpa"


def test_removed_hooks_leave_no_trace(tokens):
    model = random_model(CONFIGS["gpt2"])
    reference, state = model(tokens), {k: v.clone() for k, v in model.state_dict().items()}
    modules = [name for name, _ in model.named_modules()]
    handles = add_hook(model, lambda name: True, lambda x, name: x * 2)  # every point, editing
    assert not torch.equal(model(tokens), reference)
    with hooks(model, [("blocks.0.hook_resid_pre", lambda x, name: x + 1)]):
        pass
    for handle in handles:
        handle.remove()
    assert all("tap" not in vars(m) and m.tap is None for m in model.modules() if hasattr(m, "tap"))
    assert torch.equal(model(tokens), reference)
    assert [name for name, _ in model.named_modules()] == modules
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in after.items())


def test_hooks_come_off_after_an_error(tokens):
    model = random_model(CONFIGS["llama"])

    def fail(x, name):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"), hooks(model, [("blocks.1.hook_resid_mid", fail)]):
        model(tokens)
    assert not any("tap" in vars(m) for m in model.modules())
    kept = add_hook(model, "blocks.0.hook_resid_post", lambda x, name: None)
    with pytest.raises(RuntimeError), hooks(model, [("blocks.1.hook_resid_mid", fail)]):
        model(tokens)
    assert "tap" in vars(model.blocks[0])  # hooks installed before the context stay
    remove_hooks(model)
    assert not kept[0].point.module.__dict__.get("tap")


def test_run_with_cache_stops_after_the_last_requested_point(tokens):
    model = random_model(CONFIGS["llama"])
    exact = lambda name: not name.endswith(("hook_pattern", "hook_attn_scores", "hook_result"))  # same arithmetic
    full = run_with_cache(model, tokens, exact)
    later = []
    add_hook(model, "blocks.2.hook_resid_pre", lambda x, name: later.append(name))
    part = run_with_cache(model, tokens, ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"])
    remove_hooks(model)
    assert list(part) == ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"] and not later
    assert all(torch.equal(part[k], full[k]) for k in part)
    assert not part["blocks.1.attn.hook_z"].requires_grad
    edited = run_with_cache(model, tokens, "blocks.0.hook_resid_post", fwd_hooks=[("blocks.0.hook_resid_post",
                            lambda x, name: torch.zeros_like(x))])  # fmt: skip
    assert edited["blocks.0.hook_resid_post"].abs().sum() == 0  # the cache holds what the hooks returned


def test_hooks_in_cached_decoding():
    """A pattern hook over a KV cache sees (B, H, 1, keys so far) per step, and the decode is unchanged."""
    model = random_model(CONFIGS["llama"])
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    cache, plain = KVCache(16), KVCache(16)
    model(ids[:, :5], cache=cache), model(ids[:, :5], cache=plain)
    name = "blocks.1.attn.hook_pattern"
    seen = []
    with hooks(model, [(name, lambda x, n: seen.append(x))]):
        stepped = model(ids[:, 5:], cache=cache)
    assert seen[0].shape == (1, 4, 1, 6)
    torch.testing.assert_close(stepped, model(ids[:, 5:], cache=plain), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(seen[0][0, :, 0], run_with_cache(model, ids, name)[name][0, :, 5], **TOL)


def test_bad_names_and_hooks_are_errors_naming_them(tokens):
    model = random_model(CONFIGS["gpt2"])
    with pytest.raises(HookError, match=r"unknown hook point 'blocks.0.hook_resid_pr'.*blocks.0.hook_resid_pre"):
        run_with_cache(model, tokens, "blocks.0.hook_resid_pr")
    with pytest.raises(HookError, match=r"unknown hook point 'blocks\.0\.attn\.hook_rot_q'"):  # learned positions
        run_with_cache(model, tokens, "blocks.0.attn.hook_rot_q")
    with pytest.raises(HookError, match="no hook point"):
        add_hook(model, lambda name: "nothing" in name, lambda x, name: None)
    with pytest.raises(HookError, match=r"blocks.1.hook_resid_mid returned \(2, 9\); .* shape \(2, 9, 32\)"):
        run_with_hooks(model, tokens, [("blocks.1.hook_resid_mid", lambda x, name: x.sum(-1))])
    with pytest.raises(HookError, match="lmforge Transformer"):
        hook_names(torch.nn.Linear(2, 2))


def test_variants_have_the_block_points_and_their_sums_hold():
    """MoE and MLA layers expose the block's points (no attn./mlp. internals); Gemma 2's post-norms add theirs.
    Invariant: resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out, bit for bit."""
    from lmforge.config import MLAConfig, ModelConfig, MoEConfig
    from lmforge.model.transformer import Transformer

    base = dict(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=16)
    variants = {
        "moe": ModelConfig(**base, moe=MoEConfig(n_experts=4, top_k=2, d_expert=8)),
        "mla": ModelConfig(**base, mla=MLAConfig(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
                                                 v_head_dim=4)),
        "gemma2": ModelConfig(**base, post_norms=True, norm_unit_offset=True, mlp="geglu", attn_softcap=50.0),
    }  # fmt: skip
    ids = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(0))
    for kind, cfg in variants.items():
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        names = hook_names(model)
        assert ("blocks.1.mlp.hook_post" in names) == (kind != "moe"), kind
        assert ("blocks.1.attn.hook_z" in names) == (kind != "mla"), kind
        assert ("blocks.1.ln2_post.hook_normalized" in names) == (kind == "gemma2"), kind
        c = {n.removeprefix("blocks.1.hook_"): v for n, v in
             run_with_cache(model, ids, lambda n: n.startswith("blocks.1.hook_")).items()}  # fmt: skip
        assert torch.equal(c["resid_mid"], c["resid_pre"] + c["attn_out"]), kind
        assert torch.equal(c["resid_post"], c["resid_mid"] + c["mlp_out"]), kind
        exact = lambda n: not n.endswith(("hook_pattern", "hook_attn_scores", "hook_result"))
        assert torch.equal(run_with_hooks(model, ids, [(exact, lambda x, n: None)]), model(ids)), kind
