"""Parity with transformers on random weights: logits, KV-cache decoding, padding, gradients, save."""

from __future__ import annotations

import pytest
import torch

import lmforge
from hf_reference import VOCAB, hf_model
from lmforge.infer.kv_cache import KVCache

ARCHES = [
    "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "mixtral", "qwen3_moe", "deepseek_v2", "deepseek_v3",
]  # fmt: skip
TOL = 1e-4


@pytest.fixture(scope="module", params=ARCHES)
def pair(request, tmp_path_factory):
    """(arch, transformers model, lmforge model loaded from the transformers checkpoint, checkpoint dir)."""
    arch = request.param
    ref = hf_model(arch)
    path = tmp_path_factory.mktemp(arch)
    ref.save_pretrained(path)
    model, tokenizer = lmforge.load(path)
    assert tokenizer is None
    return arch, ref, model, path


def ids(batch: int = 2, t: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_logits_match(pair, backend):
    _, ref, model, _ = pair
    x = ids()
    model.runtime.attn_backend = backend  # runtime switch on the loaded model
    try:
        with torch.no_grad():
            got, want = model(x), ref(x).logits
    finally:
        model.runtime.attn_backend = "sdpa"
    assert got.shape == (2, 16, VOCAB)
    assert (got - want).abs().max() <= TOL


def test_kv_cache_decoding_equals_full_forward(pair):
    _, _, model, _ = pair
    x = ids()
    with torch.no_grad():
        full = model(x)
        cache = KVCache(max_len=16)
        steps = [model(x[:, :8], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(8, 16)]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= TOL


def test_left_padded_batch_equals_unpadded_runs(pair):
    _, _, model, _ = pair
    a, b = ids(1, 12, seed=2)[0], ids(1, 7, seed=3)[0]
    padded = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])
    mask = torch.stack([torch.ones(12), torch.cat([torch.zeros(5), torch.ones(7)])]).long()
    with torch.no_grad():
        out = model(padded, attention_mask=mask)
        alone_a, alone_b = model(a[None])[0], model(b[None])[0]
        # and through the cache: padded prefill, then a decode step with no mask passed
        cache = KVCache(max_len=14)
        model(padded, attention_mask=mask, cache=cache)
        nxt = torch.tensor([[3], [4]])
        step = model(nxt, cache=cache)
        want_b = model(torch.cat([b, nxt[1]])[None])[0, -1]
    assert (out[0] - alone_a).abs().max() <= TOL
    assert (out[1, 5:] - alone_b).abs().max() <= TOL
    assert (step[1, -1] - want_b).abs().max() <= TOL


def test_gradients_match(pair):
    arch, ref, model, _ = pair
    x = ids(2, 12)
    model.train()
    try:
        loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
    finally:
        model.eval()
    ref_loss = ref(x, labels=x).loss
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= TOL
    params = model.state_dict(keep_vars=True)  # by checkpoint name (MoE experts' matrices sit one module down)
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items() if p.requires_grad}
    ours = hf_state_dict_from(model, grads)
    theirs = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert theirs and set(theirs) - {"lm_head.weight"} <= set(ours)
    for name, g in theirs.items():
        if name in ours:
            rel = (ours[name] - g).norm() / g.norm().clamp_min(1e-12)
            assert rel <= TOL, f"{arch}: gradient of {name} differs (relative error {rel:.2e})"
    model.zero_grad()
    ref.zero_grad()


def hf_state_dict_from(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from lmforge.io.hf_arch import tensor_maps

    out = {}
    for m in tensor_maps(model.config, list(tensors)):
        for name, t in zip(m.theirs, m.save([tensors[n] for n in m.ours]), strict=True):
            out[name] = t
    return _fuse_experts(out)


EXPERT = r"(.*)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"


def _fuse_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers v5 keeps routed experts fused in memory: gate_up_proj (E, 2F, d) and down_proj (E, d, F)."""
    import re

    out, groups = {}, {}
    for name, t in sd.items():
        m = re.match(EXPERT, name)
        if not m:
            out[name] = t
            continue
        groups.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
    for prefix, parts in groups.items():
        kind = {k: [parts[k][e] for e in sorted(parts[k])] for k in parts}
        gate, up, down = (kind["w1"], kind["w3"], kind["w2"]) if "w1" in kind else (
            kind["gate_proj"], kind["up_proj"], kind["down_proj"])  # fmt: skip
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack(down)
    return {n.replace(".block_sparse_moe.gate.", ".mlp.gate."): t for n, t in out.items()}


def test_save_round_trip_loads_in_transformers(pair, tmp_path):
    import transformers

    _, _, model, _ = pair
    lmforge.save(model, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = ids()
    with torch.no_grad():
        assert (back(x).logits - model(x)).abs().max() <= TOL
    again, _ = lmforge.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
