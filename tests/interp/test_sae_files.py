"""interp/sae_files.py: SAELens loads the SAE files lmforge writes (same outputs), and lmforge loads SAELens' files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE
from sae_lens import TopKTrainingSAEConfig as TopKCfg
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import save_file

from lmforge.interp.sae import SAEConfig, SparseAutoencoder
from lmforge.interp.sae_files import SAEFileError, load_sae, save_sae

HOOK = "blocks.1.hook_resid_post"


def trained_like(cfg: SAEConfig) -> SparseAutoencoder:
    """An SAE whose biases are nonzero and decoder rows of differing norms, as after training."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.3)
        sae.W_dec.mul_(0.5 + torch.rand(cfg.d_sae, 1))
    return sae


def inputs(d: int) -> torch.Tensor:
    return torch.randn(20, d, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_saelens_loads_our_files_with_the_same_outputs(tmp_path: Path, arch: str) -> None:
    ours = trained_like(SAEConfig(8, 24, arch, k=3, l1_coefficient=4.0, hook_name=HOOK))
    save_sae(ours, tmp_path / "sae", metadata={"model_name": "tiny"})
    theirs = SAE.load_from_disk(tmp_path / "sae")
    assert theirs.cfg.architecture() == arch and theirs.cfg.d_in == 8 and theirs.cfg.d_sae == 24
    assert theirs.cfg.metadata.hook_name == HOOK and theirs.cfg.metadata.model_name == "tiny"
    x = inputs(8)
    torch.testing.assert_close(theirs.encode(x), ours.encode(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(theirs(x), ours(x), atol=1e-6, rtol=1e-6)
    if arch == "topk":
        assert theirs.cfg.k == 3 and theirs.cfg.rescale_acts_by_decoder_norm
    # the training class reads the training fields too
    training = (StandardTrainingSAE if arch == "standard" else TopKTrainingSAE).load_from_disk(tmp_path / "sae")
    if arch == "standard":
        assert training.cfg.l1_coefficient == 4.0


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_we_load_saelens_files(tmp_path: Path, arch: str, inference: bool) -> None:
    torch.manual_seed(3)
    meta = SAEMetadata(hook_name=HOOK)
    if arch == "standard":
        theirs = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=8, d_sae=24, l1_coefficient=2.0, lp_norm=2.0,
                                                               metadata=meta))  # fmt: skip
    else:
        theirs = TopKTrainingSAE(TopKCfg(d_in=8, d_sae=24, k=4, aux_loss_coefficient=0.25, metadata=meta))
    with torch.no_grad():
        theirs.b_enc.normal_(0, 0.05)
        theirs.b_dec.normal_(0, 0.3)
        theirs.W_dec.mul_(0.5 + torch.rand(24, 1))
    (theirs.save_inference_model if inference else theirs.save_model)(tmp_path / "sae")
    ours = load_sae(tmp_path / "sae")
    assert ours.cfg.architecture == arch and ours.cfg.hook_name == HOOK
    if arch == "topk":
        assert ours.cfg.k == 4
        if not inference:
            assert ours.cfg.aux_loss_coefficient == 0.25
    elif not inference:
        assert ours.cfg.l1_coefficient == 2.0 and ours.cfg.lp_norm == 2.0
    x = inputs(8)
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


def test_round_trip_keeps_config_and_weights(tmp_path: Path) -> None:
    sae = trained_like(SAEConfig(8, 24, "topk", k=5, aux_k=3, aux_loss_coefficient=0.1, hook_name=HOOK))
    save_sae(sae, tmp_path / "sae")
    back = load_sae(tmp_path / "sae")
    assert back.cfg == sae.cfg
    for name, p in sae.named_parameters():
        assert torch.equal(getattr(back, name), p), name
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_saving_over_a_directory_replaces_the_files_and_keeps_others(tmp_path: Path) -> None:
    target = tmp_path / "sae"
    save_sae(trained_like(SAEConfig(8, 24)), target)
    (target / "notes.txt").write_text("kept")
    second = trained_like(SAEConfig(8, 16))
    save_sae(second, target)
    assert load_sae(target).cfg.d_sae == 16 and (target / "notes.txt").read_text() == "kept"


def write_dir(path: Path, cfg: dict, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps(cfg))
    shapes = {"W_enc": (4, 8), "b_enc": (8,), "W_dec": (8, 4), "b_dec": (4,)}
    save_file(tensors if tensors is not None else {k: torch.zeros(s) for k, s in shapes.items()},
              path / "sae_weights.safetensors")  # fmt: skip
    return path


GOOD = {"architecture": "standard", "d_in": 4, "d_sae": 8, "metadata": {"sae_lens_version": "6.0.0"}}


@pytest.mark.parametrize(
    ("cfg", "tensors", "message"),
    [
        ({**GOOD, "architecture": "jumprelu"}, None, "architecture 'jumprelu' is not supported"),
        ({**GOOD, "d_sae": "8"}, None, "d_sae must be a positive integer"),
        ({**GOOD, "normalize_activations": "layer_norm"}, None, "normalize_activations='layer_norm'"),
        ({**GOOD, "architecture": "topk", "k": 9}, None, "k must be at most d_sae"),
        (GOOD, {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4)}, "'b_dec' is missing"),
        (GOOD, {"W_enc": torch.zeros(8, 4), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4),
                "b_dec": torch.zeros(4)}, r"'W_enc' has shape \(8, 4\)"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, cfg: dict, tensors: dict | None, message: str) -> None:
    path = write_dir(tmp_path / "sae", cfg, tensors)
    with pytest.raises(SAEFileError, match=message) as e:
        load_sae(path)
    assert str(path) in str(e.value)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(SAEFileError, match=r"cfg\.json: not found"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFileError, match="not valid JSON"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(GOOD))
    with pytest.raises(SAEFileError, match=r"sae_weights\.safetensors: not found"):
        load_sae(tmp_path)
