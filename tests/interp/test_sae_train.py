"""interp/sae_train.py: token windows, the activation source at a hook point, the mixing buffer, and training."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.interp.hooks import HookError
from lmforge.interp.sae import SAEConfig, SAEConfigError, SparseAutoencoder
from lmforge.interp.sae_files import load_sae
from lmforge.interp.sae_train import (
    SAETrainConfig,
    mixing_buffer,
    model_activations,
    reconstruction_metrics,
    token_windows,
    train_sae,
    typical_rows,
)
from lmforge.model.transformer import Transformer


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, d_model=24, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=40, max_seq_len=32)
    return Transformer(cfg).eval()


def test_windows_cover_the_stream_once_per_epoch_in_a_new_order() -> None:
    ids = torch.arange(103)
    it = token_windows(ids, context=10, windows_per_batch=5, generator=torch.Generator().manual_seed(0))
    epoch1, epoch2 = torch.cat([next(it), next(it)]), torch.cat([next(it), next(it)])
    for epoch in (epoch1, epoch2):
        assert epoch.shape == (10, 10)
        assert sorted(epoch[:, 0].tolist()) == list(range(0, 100, 10))  # every window once, the tail dropped
        assert torch.equal(epoch - epoch[:, :1], torch.arange(10).expand(10, -1))  # each a contiguous run
    assert not torch.equal(epoch1, epoch2)
    with pytest.raises(SAEConfigError, match="103 tokens make 2 windows of 50"):
        next(token_windows(ids, 50, 4, torch.Generator()))


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_activations_are_the_residual_stream_after_the_block(layer: int) -> None:
    """Oracle: the plain forward of the model cut after block `layer` ends in norm(resid_post of that block)."""
    model = tiny_model()
    ids = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(1))
    acts = model_activations(model, f"blocks.{layer}.hook_resid_post", skip_first=0, max_norm_ratio=None)(ids)
    cut = copy.deepcopy(model)
    cut.blocks = cut.blocks[: layer + 1]
    expected = cut.hidden_states(ids).reshape(-1, 24)
    torch.testing.assert_close(cut.norm(acts), expected, atol=1e-6, rtol=1e-6)
    dropped = model_activations(model, f"blocks.{layer}.hook_resid_post", skip_first=1, max_norm_ratio=None)(ids)
    torch.testing.assert_close(dropped, acts.view(3, 9, 24)[:, 1:].reshape(-1, 24))
    assert not acts.requires_grad


def test_massive_activations_are_left_out() -> None:
    """A token whose embedding is 1000x the others' keeps a residual norm far above the median: its rows go."""
    model = tiny_model()
    with torch.no_grad():
        model.embed.weight[5] *= 1000
    ids = torch.randint(6, 61, (2, 8), generator=torch.Generator().manual_seed(2))
    ids[0, 3] = ids[1, 6] = 5
    everything = model_activations(model, "blocks.1.hook_resid_post", skip_first=0, max_norm_ratio=None)(ids)
    typical = model_activations(model, "blocks.1.hook_resid_post", skip_first=0)(ids)
    keep = torch.ones(16, dtype=torch.bool)
    keep[[3, 14]] = False
    torch.testing.assert_close(typical, everything[keep])
    norms = everything.norm(dim=-1)
    assert torch.equal(typical_rows(everything, 10.0), norms <= 10 * norms.median())
    assert typical_rows(everything, None).all()


def test_unknown_hook_point_is_named() -> None:
    with pytest.raises(HookError, match=r"blocks\.7\.hook_resid_post"):
        model_activations(tiny_model(), "blocks.7.hook_resid_post")


def test_mixing_buffer_serves_every_row_once_and_mixes_chunks() -> None:
    chunks = [torch.full((30, 1), float(i)) + torch.arange(30.0)[:, None] / 100 for i in range(10)]
    out = list(mixing_buffer(iter(chunks), buffer_size=64, batch_size=16, generator=torch.Generator().manual_seed(0)))
    assert all(b.shape == (16, 1) for b in out)
    served = torch.cat(out).flatten()
    everything = torch.cat(chunks).flatten()
    assert len(served) == len(everything) // 16 * 16  # only the last partial batch is left
    assert len(set(served.tolist())) == len(served) and set(served.tolist()) <= set(everything.tolist())
    assert any(len(set(b.floor().flatten().tolist())) > 1 for b in out[:4])  # batches mix rows of several chunks
    with pytest.raises(SAEConfigError, match="at least twice batch_size"):
        next(mixing_buffer(iter(chunks), 20, 16, torch.Generator()))


def test_metrics_match_their_definitions() -> None:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(8, 32, "topk", k=3))
    x = torch.randn(50, 8) + 2
    m = reconstruction_metrics(sae, x)
    err = ((sae(x) - x) ** 2).sum(-1)
    assert m["l0"] == pytest.approx(3.0)  # topk: exactly k nonzero (random pre-activations are never 0)
    total = ((x - x.mean(0)) ** 2).sum(-1)
    assert m["explained_variance"] == pytest.approx(1 - err.mean().item() / total.mean().item())
    assert m["mse"] == pytest.approx(err.mean().item())


TRUE_FEATURES = torch.nn.functional.normalize(torch.randn(24, 32, generator=torch.Generator().manual_seed(0)), dim=-1)


def sparse_data(n_steps: int, batch: int, seed: int = 0):
    """Batches of sparse sums of 24 fixed unit directions in R^32 (the ground truth an SAE should find)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        on = torch.rand(batch, 24, generator=g) < 0.08
        yield (on * (0.5 + torch.rand(batch, 24, generator=g))) @ TRUE_FEATURES


def test_training_learns_sparse_data_and_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(32, 48, "topk", k=4, hook_name="blocks.0.hook_resid_post"))
    held_out = torch.cat(list(sparse_data(2, 256, seed=9)))
    before = reconstruction_metrics(sae, held_out)["explained_variance"]
    cfg = SAETrainConfig(steps=150, batch_size=128, lr=5e-3, checkpoint_every=50, out_dir=tmp_path)
    trainer = train_sae(sae, sparse_data(150, 128), cfg, progress=False)
    after = reconstruction_metrics(sae, held_out)
    assert before < 0.1 and after["explained_variance"] > 0.9 and after["l0"] <= 4
    assert trainer.steps == 150
    cosines = TRUE_FEATURES @ torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1).T
    assert (cosines.max(-1).values > 0.9).sum() >= 20  # the SAE found (most of) the true directions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_100", "step_150", "step_50"]
    final = load_sae(tmp_path / "step_150")
    torch.testing.assert_close(final(held_out), sae(held_out))
    assert not torch.equal(load_sae(tmp_path / "step_50").W_dec, final.W_dec)


def test_resampling_revives_latents_during_training() -> None:
    def run(resample_every: int) -> torch.Tensor:
        torch.manual_seed(0)
        sae = SparseAutoencoder(SAEConfig(32, 96, "topk", k=1, aux_loss_coefficient=0.0))  # no AuxK revival
        cfg = SAETrainConfig(steps=60, batch_size=32, lr=1e-3, dead_feature_window=5, resample_every=resample_every)
        return train_sae(sae, sparse_data(60, 32), cfg, progress=False).steps_since_fired

    # without resampling some latents never fire; with it every latent dead at step 40 was reset then (the others
    # had fired within 5 steps), so none can have gone more than 20 + 5 steps without firing
    assert run(0).max() == 60
    assert run(20).max() <= 25


def test_running_out_of_activations_is_an_error() -> None:
    sae = SparseAutoencoder(SAEConfig(32, 24))
    with pytest.raises(SAEConfigError, match="ran out after 3 of 10 steps"):
        train_sae(sae, sparse_data(3, 8), SAETrainConfig(steps=10, batch_size=8), progress=False)
