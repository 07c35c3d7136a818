"""LoRA, rsLoRA and DoRA (finetune/lora.py) and their PEFT files (finetune/adapter_files.py, io/peft.py).

Oracles: the model's own outputs (an adapter at init changes nothing; merged == unmerged; unmerging restores the
weights), closed forms (W' = W + s B A; DoRA's m (W + s B A) / ||W + s B A||), and the `peft` library on the
transformers model with the same weights: lmforge's adapter files loaded by PEFT, and PEFT's files loaded by
lmforge, give the same logits (1e-4).
"""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch

from hf_reference import hf_and_lmforge
from lmforge import ModelConfig, Transformer
from lmforge.configfile import ConfigError
from lmforge.finetune.adapter_files import load_adapter, save_adapter
from lmforge.finetune.lora import (
    LoraConfig,
    LoRAError,
    LoRALayer,
    adapter_names,
    adapter_state_dict,
    add_adapter,
    merge_adapter,
    merge_and_unload,
    set_adapter,
    train_only_adapter,
    unmerge_adapter,
)
from lmforge.io.peft import PeftFormatError
from lmforge.quant.nf4 import NF4Linear, quantize_model_nf4

IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 2, 33, 71]])


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
    return Transformer(ModelConfig(**cfg | overrides)).eval()


def moe_model() -> Transformer:
    from lmforge.config import MoEConfig

    return tiny(moe=MoEConfig(n_experts=4, top_k=2, d_expert=24))


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Nonzero adapters (B starts at zero) and magnitudes off their init, so every term of the forward shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


KINDS = [{}, {"rslora": True}, {"dora": True}, {"dora": True, "rslora": True}]


@pytest.mark.parametrize("kind", KINDS, ids=["lora", "rslora", "dora", "dora-rslora"])
@pytest.mark.parametrize("make", [tiny, moe_model], ids=["dense", "moe"])
def test_an_adapter_at_init_changes_nothing_and_merging_changes_no_output(make, kind):
    model = make()
    before = logits(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = add_adapter(model, LoraConfig(r=4, alpha=8, **kind))
    assert "blocks.0.attn.q_proj" in adapted and "blocks.1.mlp.down_proj" in adapted
    assert torch.equal(logits(model), before)
    randomize(model)
    adapted_logits = logits(model)
    assert (adapted_logits - before).abs().max() > 1e-3
    merge_adapter(model)
    assert torch.allclose(logits(model), adapted_logits, atol=1e-5)
    unmerge_adapter(model)
    assert torch.allclose(logits(model), adapted_logits, atol=1e-5)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoRALayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(weights)
    assert torch.allclose(logits(plain), adapted_logits, atol=1e-5)


def test_the_adapted_weight_is_the_closed_form():
    model = tiny()
    add_adapter(model, LoraConfig(r=4, alpha=8, target="blocks.0.attn.q_proj"))
    randomize(model)
    layer = model.blocks[0].attn.q_proj
    a, b, w = layer.adapters["default"].lora_A, layer.adapters["default"].lora_B, layer.base.weight
    assert torch.allclose(layer.weight, w + 2.0 * b @ a)
    x = torch.randn(3, 32)
    assert torch.allclose(layer(x), x @ (w + 2.0 * b @ a).T, atol=1e-6)

    dora = tiny()
    add_adapter(dora, LoraConfig(r=4, alpha=8, rslora=True, dora=True, target="blocks.0.attn.q_proj"))
    randomize(dora)
    layer = dora.blocks[0].attn.q_proj
    adapter, w = layer.adapters["default"], layer.base.weight
    direction = w + 8 / math.sqrt(4) * adapter.lora_B @ adapter.lora_A
    expected = adapter.magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)
    assert torch.allclose(layer.weight, expected, atol=1e-6)
    assert torch.allclose(layer(x), x @ expected.T, atol=1e-5)


def test_gradients_reach_only_the_adapter_and_doras_norm_is_detached():
    model = tiny()
    add_adapter(model, LoraConfig(r=2, alpha=4, dora=True))
    count = train_only_adapter(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    randomize(model)
    model(IDS).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    # the magnitude's gradient is that of m / n with n constant: d(out)/dm = (W + sBA) x / n
    layer = model.blocks[0].attn.q_proj
    adapter = layer.adapters["default"]
    x = torch.randn(5, 32)
    adapter.magnitude.grad = None
    layer(x).sum().backward()
    direction = (layer.base.weight + adapter.delta()).detach()
    expected = (x @ direction.T).sum(0) / direction.norm(dim=1)
    assert torch.allclose(adapter.magnitude.grad, expected, atol=1e-5)


def test_dropout_applies_to_the_adapters_input_only_in_training():
    model = tiny()
    add_adapter(model, LoraConfig(r=4, alpha=8, dropout=0.5, dora=True))
    randomize(model)
    evaluated = logits(model)
    model.train()
    torch.manual_seed(0)
    trained = model(IDS).detach()
    model.eval()
    assert torch.allclose(logits(model), evaluated) and not torch.allclose(trained, evaluated, atol=1e-4)


def test_several_adapters_switch_by_name():
    model = tiny()
    base = logits(model)
    add_adapter(model, LoraConfig(r=4, target="blocks.*.attn.*_proj"), "attn")
    randomize(model, seed=1)
    with_attn = logits(model)
    add_adapter(model, LoraConfig(r=2, dora=True, target="blocks.*.mlp.*_proj"), "mlp")
    randomize(model, seed=2)  # also moves "attn" again
    with_mlp = logits(model)
    assert adapter_names(model) == ["attn", "mlp"]
    set_adapter(model, "attn")
    with_attn = logits(model)
    set_adapter(model, None)
    assert torch.equal(logits(model), base)
    assert not torch.allclose(with_attn, with_mlp, atol=1e-4)
    set_adapter(model, "mlp")
    assert torch.allclose(logits(model), with_mlp)
    assert set(adapter_state_dict(model, "attn")) == {
        f"blocks.{i}.attn.{p}_proj.lora_{ab}" for i in range(2) for p in "qkvo" for ab in "AB"}  # fmt: skip
    with pytest.raises(LoRAError, match="no adapter named 'nope'"):
        set_adapter(model, "nope")
    with pytest.raises(LoRAError, match="already"):
        add_adapter(model, LoraConfig(), "mlp")
    merge_adapter(model)
    with pytest.raises(LoRAError, match="unmerge"):
        set_adapter(model, "attn")


def test_qlora_trains_float_adapters_on_a_4_bit_base_to_a_lower_loss():
    model = tiny()
    quantize_model_nf4(model)
    add_adapter(model, LoraConfig(r=8, alpha=16))
    train_only_adapter(model)
    layer = model.blocks[0].attn.q_proj
    assert isinstance(layer.base, NF4Linear) and layer.adapters["default"].lora_A.dtype == torch.float32
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(IDS[:, :-1])[0], IDS[0, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.5, losses
    with pytest.raises(LoRAError, match="4-bit"):
        merge_adapter(model)


def test_bad_configs_name_the_field():
    for kwargs, field in (({"r": 0}, "r"), ({"dropout": 1.0}, "dropout"), ({"alpha": math.inf}, "alpha"),
                          ({"target": []}, "target")):  # fmt: skip
        with pytest.raises(ConfigError, match=field):
            LoraConfig(**kwargs)
    with pytest.raises(Exception, match="selects no module"):
        add_adapter(tiny(), LoraConfig(target="blocks.*.attn.qq_proj"))


# -- PEFT files, both ways ---------------------------------------------------------------------------------------

PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return hf_and_lmforge("llama", tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("kind", KINDS[:3], ids=["lora", "rslora", "dora"])
def test_lmforge_adapter_files_load_in_peft_with_the_same_logits(llama, tmp_path, kind):
    hf, _ = llama
    _, ours = hf_and_lmforge("llama", tmp_path / "base")
    add_adapter(ours, LoraConfig(r=4, alpha=8, target=["blocks.*.attn.[qv]_proj", "blocks.1.mlp.*"], **kind))
    randomize(ours)
    save_adapter(ours, tmp_path / "adapter", base_model="tiny-llama")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_dora"] == kind.get("dora", False)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = theirs(IDS).logits
    assert torch.allclose(logits(ours), expected, atol=1e-4)
    theirs.unload()


@pytest.mark.parametrize("kind", KINDS[:3], ids=["lora", "rslora", "dora"])
def test_peft_adapter_files_load_in_lmforge_with_the_same_logits(llama, tmp_path, kind):
    hf, _ = llama
    _, ours = hf_and_lmforge("llama", tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, use_rslora=kind.get("rslora", False),
                             use_dora=kind.get("dora", False), init_lora_weights=False)  # fmt: skip
    theirs = peft.get_peft_model(hf, config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * torch.randn_like(p))
        expected = theirs(IDS).logits
    theirs.save_pretrained(tmp_path / "peft")
    theirs.unload()
    adapted = load_adapter(ours, tmp_path / "peft")
    assert len(adapted) == 2 * len(PEFT_TARGETS)
    assert torch.allclose(logits(ours), expected, atol=1e-4)


def test_peft_files_lmforge_cannot_honour_are_refused(llama, tmp_path):
    hf, _ = llama
    _, ours = hf_and_lmforge("llama", tmp_path / "base")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2}))
    theirs.save_pretrained(tmp_path / "peft")
    theirs.unload()
    with pytest.raises(PeftFormatError, match="rank_pattern"):
        load_adapter(ours, tmp_path / "peft")
    with pytest.raises(PeftFormatError, match=r"adapter_config\.json: not found"):
        load_adapter(ours, tmp_path)
