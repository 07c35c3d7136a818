"""DARE's random drop against mergekit (same seed, same masks), the rescale rules, and LoRA adapters as task vectors
against mergekit's "MODEL+LORA" references (which merge the adapter with PEFT)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.merge import dare, dare_linear, dare_ties, lora_task_vector, merge, parse_config
from merge_reference import mergekit_merge, read_weights


def _tensors() -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(48, 32, generator=g)
    return base, [base + 0.1 * torch.randn(48, 32, generator=g) for _ in range(2)]


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_equals_mergekit_given_the_same_seed(method: str, rescale: bool) -> None:
    from mergekit.merge_methods.api import merge_tensors

    base, fts = _tensors()
    params = {"weight": [0.6, 0.8], "density": [0.3, 0.7], "rescale": rescale}
    torch.manual_seed(123)  # mergekit draws from torch's global generator, one mask per model in input order
    theirs = merge_tensors([base, *fts], method, parameters=params, base_index=0)
    fn = dare_ties if method == "dare_ties" else dare_linear
    ours = fn(base, fts, [0.6, 0.8], [0.3, 0.7], rescale="l1" if rescale else None,
              generator=torch.Generator().manual_seed(123))  # fmt: skip
    assert ours.equal(theirs)
    other = fn(base, fts, [0.6, 0.8], [0.3, 0.7], generator=torch.Generator().manual_seed(124))
    assert not other.equal(ours)  # the mask is random: another seed drops other entries


def test_dare_rules_with_a_given_mask() -> None:
    base, (ft, _) = _tensors()
    delta = ft - base
    mask = (torch.arange(delta.numel()).reshape(delta.shape) % 3 == 0).float()  # keep 1 in 3: density 1/3
    assert dare(delta, 1 / 3, "paper", mask=mask).equal(delta * mask / (1 / 3))  # the paper's 1 / (1 - p)
    l1 = dare(delta, 1 / 3, "l1", mask=mask)  # mergekit's: the L1 norm of the task vector is kept
    torch.testing.assert_close(l1.abs().sum(), delta.abs().sum())
    assert l1.equal(delta * mask * (delta.abs().sum() / (delta * mask).abs().sum()))
    assert dare(delta, 1 / 3, None, mask=mask).equal(delta * mask)
    assert dare(delta, 1.0).equal(delta)


def test_dare_paper_rescale_is_unbiased() -> None:
    delta = torch.ones(200_000)
    kept = dare(delta, 0.25, "paper", generator=torch.Generator().manual_seed(0))
    assert set(kept.unique().tolist()) == {0.0, 4.0}
    assert abs(kept.mean().item() - 1.0) < 0.02  # E[m / density] = 1
    assert abs((kept != 0).float().mean().item() - 0.25) < 0.005  # p = 1 - density dropped


def test_dare_model_merge_is_reproducible(models: dict[str, Path], tmp_path: Path) -> None:
    config = parse_config({"merge_method": "dare_ties", "base_model": str(models["base"]), "models": [
        {"model": str(models["ft1"]), "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": str(models["ft2"]), "parameters": {"weight": 0.5, "density": 0.5}}]})  # fmt: skip
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        merge(config, tmp_path / name, seed=seed, progress=False)
        runs[name] = read_weights(tmp_path / name)
    q = "model.layers.1.mlp.up_proj.weight"
    assert runs["a"][q].equal(runs["b"][q]) and not runs["a"][q].equal(runs["c"][q])


def _adapter(models: dict[str, Path], out: Path) -> Path:
    import peft
    import transformers as T

    torch.manual_seed(5)
    model = T.LlamaForCausalLM.from_pretrained(models["ft1"])
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft.get_peft_model(model, cfg).save_pretrained(out)
    return out


def test_lora_task_vector_is_peft_merge(models: dict[str, Path], tmp_path: Path) -> None:
    import peft
    import transformers as T

    adapter = _adapter(models, tmp_path / "adapter")
    deltas = lora_task_vector(adapter)
    merged = peft.PeftModel.from_pretrained(T.LlamaForCausalLM.from_pretrained(models["ft1"]), adapter)
    merged = merged.merge_and_unload().state_dict()
    base = read_weights(models["ft1"])
    assert len(deltas) == 2 * 3  # q, v and down of both layers
    for name, w in merged.items():
        expected = base[name] + deltas[name] if name in deltas else base[name]
        assert expected.equal(w), name


def test_lora_reference_equals_mergekit(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = _adapter(models, tmp_path / "adapter")
    config = {"merge_method": "task_arithmetic", "base_model": str(models["base"]), "models": [
        {"model": f"{models['ft1']}+{adapter}", "parameters": {"weight": 0.8}},
        {"model": str(models["ft2"]), "parameters": {"weight": 0.4}}]}  # fmt: skip
    theirs = mergekit_merge(config, tmp_path / "mergekit", lora_merge_cache=str(tmp_path / "cache"))
    merge(parse_config(config), tmp_path / "ours", progress=False)
    ours = read_weights(tmp_path / "ours")
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].equal(t), name


def test_dare_paper_rescale_through_the_yaml(models: dict[str, Path], tmp_path: Path) -> None:
    """The driver seeds each tensor's generator with crc32("SEED/NAME") and passes `rescale: paper` through."""
    import zlib

    config = {"merge_method": "dare_linear", "base_model": str(models["base"]), "parameters": {"rescale": "paper"},
              "models": [{"model": str(models["ft1"]), "parameters": {"weight": 0.5, "density": 0.3}}]}  # fmt: skip
    merge(parse_config(config), tmp_path / "out", seed=3, progress=False)
    name = "model.layers.0.mlp.down_proj.weight"
    base, ft = read_weights(models["base"])[name], read_weights(models["ft1"])[name]
    expected = dare_linear(base, [ft], [0.5], [0.3], rescale="paper",
                           generator=torch.Generator().manual_seed(zlib.crc32(f"3/{name}".encode())))  # fmt: skip
    assert read_weights(tmp_path / "out")[name].equal(expected)
