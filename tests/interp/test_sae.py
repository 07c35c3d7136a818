"""interp/sae.py against SAELens 6 (the reference): initialisation, forward, losses and training steps on tiny SAEs."""

from __future__ import annotations

import pytest
import torch
from sae_lens import (
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer as TheirTrainer

from lmforge.interp.sae import SAEConfig, SAEConfigError, SAETrainer, SparseAutoencoder, sae_losses, topk_aux_loss

D_IN, D_SAE, BATCH = 16, 48, 32
TOL = dict(atol=1e-6, rtol=1e-6)


def their_sae(cfg: SAEConfig):
    if cfg.architecture == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(
            d_in=cfg.d_in, d_sae=cfg.d_sae, l1_coefficient=cfg.l1_coefficient, lp_norm=cfg.lp_norm,
            l1_warm_up_steps=cfg.l1_warm_up_steps, decoder_init_norm=cfg.decoder_init_norm,
            apply_b_dec_to_input=cfg.apply_b_dec_to_input))  # fmt: skip
    return TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=cfg.d_in, d_sae=cfg.d_sae, k=cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient,
        rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm, decoder_init_norm=cfg.decoder_init_norm,
        apply_b_dec_to_input=cfg.apply_b_dec_to_input))  # fmt: skip


def pair(cfg: SAEConfig, seed: int = 0):
    """Our SAE and SAELens' built from the same seed, then given the same non-trivial biases and norms."""
    torch.manual_seed(seed)
    theirs = their_sae(cfg)
    torch.manual_seed(seed)
    ours = SparseAutoencoder(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        shifts = {
            "b_enc": 0.05 * torch.randn(cfg.d_sae, generator=g),
            "b_dec": 0.3 * torch.randn(cfg.d_in, generator=g),
            "W_dec": 0.5 + torch.rand(cfg.d_sae, 1, generator=g),  # rows of differing norms
        }
        for sae in (ours, theirs):
            sae.b_enc.add_(shifts["b_enc"])
            sae.b_dec.add_(shifts["b_dec"])
            sae.W_dec.mul_(shifts["W_dec"])
    return ours, theirs


def batch(seed: int = 2, n: int = BATCH) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) * 2 + torch.randn(D_IN, generator=g)


CONFIGS = {
    "standard": SAEConfig(D_IN, D_SAE, "standard", l1_coefficient=2.5),
    "standard-l2": SAEConfig(D_IN, D_SAE, "standard", l1_coefficient=0.7, lp_norm=2.0),
    "standard-nobdec": SAEConfig(D_IN, D_SAE, "standard", apply_b_dec_to_input=False),
    "topk": SAEConfig(D_IN, D_SAE, "topk", k=5, aux_loss_coefficient=0.5),
    "topk-norescale": SAEConfig(D_IN, D_SAE, "topk", k=5, rescale_acts_by_decoder_norm=False),
}


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_init_draws_saelens_weights(arch: str) -> None:
    cfg = SAEConfig(D_IN, D_SAE, arch, k=4)
    torch.manual_seed(7)
    theirs = their_sae(cfg)
    torch.manual_seed(7)
    ours = SparseAutoencoder(cfg)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert torch.allclose(ours.W_dec.norm(dim=-1), torch.full((D_SAE,), 0.1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_decode_forward_match_saelens(name: str) -> None:
    ours, theirs = pair(CONFIGS[name])
    x = batch()
    f = ours.encode(x)
    torch.testing.assert_close(f, theirs.encode(x), **TOL)
    torch.testing.assert_close(ours.decode(f), theirs.decode(f), **TOL)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    if ours.cfg.architecture == "topk":
        assert ((f != 0).sum(-1) <= ours.cfg.k).all() and ((f > 0).sum(-1) == ours.cfg.k).any()
    else:
        assert 0 < (f > 0).float().mean() < 1  # a real mix of active and silent latents


def their_step_input(x: torch.Tensor, dead: torch.Tensor | None, l1: float) -> TrainStepInput:
    return TrainStepInput(sae_in=x, coefficients={"l1": l1}, dead_neuron_mask=dead, n_training_steps=0,
                          is_logging_step=False)  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n_dead", [0, 3, 30])  # none; fewer than aux_k = d_in // 2 = 8 (scaled); more
def test_losses_match_saelens(name: str, n_dead: int) -> None:
    ours, theirs = pair(CONFIGS[name])
    x = batch()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(3))[:n_dead]] = True
    lam = 1.3
    mine = sae_losses(ours, x, dead=dead, l1_coefficient=lam)
    ref = theirs.training_forward_pass(their_step_input(x, dead, lam))
    torch.testing.assert_close(mine.loss, ref.loss, **TOL)
    torch.testing.assert_close(mine.mse_loss, ref.losses["mse_loss"], **TOL)
    other = "l1_loss" if ours.cfg.architecture == "standard" else "auxiliary_reconstruction_loss"
    torch.testing.assert_close(mine.sparsity_loss, ref.losses[other], **TOL)
    if ours.cfg.architecture == "topk":
        assert (mine.sparsity_loss > 0) == (n_dead > 0)
    mine.loss.backward()
    ref.loss.backward()
    for p in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(ours, p).grad, getattr(theirs, p).grad, **TOL)


def test_aux_k_caps_the_dead_latents_used() -> None:
    """aux_k (ours; SAELens fixes d_in // 2): with aux_k = 1 only the single largest dead pre-activation counts."""
    ours, _ = pair(SAEConfig(D_IN, D_SAE, "topk", k=5, aux_k=1))
    x = batch()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:10] = True
    out = sae_losses(ours, x, dead=dead)
    h = out.hidden_pre.detach()
    best = torch.where(dead, h, -torch.inf).argmax(-1)
    z = torch.zeros_like(h).scatter_(-1, best[:, None], h.gather(-1, best[:, None]))
    e = (x - out.sae_out).detach()
    expected = 1.0 * min(10 / 1, 1.0) * (ours.decode_directions(z) - e).pow(2).sum(-1).mean()
    torch.testing.assert_close(topk_aux_loss(ours, x, out.sae_out, out.hidden_pre, dead), expected)


def trainers(cfg: SAEConfig, window: int, lr: float = 1e-2):
    ours, theirs = pair(cfg)
    mine = SAETrainer(ours, lr=lr, dead_feature_window=window)
    theirs_trainer = TheirTrainer(
        SAETrainerConfig(total_training_samples=100 * BATCH, train_batch_size_samples=BATCH, lr=lr,
                         lr_end=lr, dead_feature_window=window),
        theirs, data_provider=iter(()))  # fmt: skip
    return mine, theirs_trainer


@pytest.mark.parametrize("name", ["standard", "standard-l2", "topk", "topk-norescale"])
def test_one_training_step_matches_saelens(name: str) -> None:
    mine, theirs = trainers(CONFIGS[name], window=5)
    since = torch.arange(D_SAE, dtype=torch.float32) % 9  # latents with counts 6..8 are dead before the step
    mine.steps_since_fired.copy_(since)
    theirs.n_forward_passes_since_fired.copy_(since)
    assert mine.dead.any() and torch.equal(mine.dead, theirs.dead_neurons)
    x = batch()
    out = mine.step(x)
    ref = theirs.step(x)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    for p in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(mine.sae, p), getattr(theirs.sae, p), **TOL)
    assert torch.equal(mine.steps_since_fired, theirs.n_forward_passes_since_fired)
    assert not torch.equal(mine.steps_since_fired, since + 1)  # some latents fired and were reset to 0


@pytest.mark.parametrize("name", ["standard", "topk"])
def test_training_steps_with_warm_up_and_dying_latents_match_saelens(name: str) -> None:
    """Six steps: the λ warm-up schedule (standard) and latents dying mid-run into AuxK (topk, window 1)."""
    cfg = SAEConfig(D_IN, D_SAE, name, k=3, l1_coefficient=3.0, l1_warm_up_steps=4)
    mine, theirs = trainers(cfg, window=1)
    saw_dead, sparsity = False, []
    for step in range(6):
        x = batch(seed=10 + step)
        out, ref = mine.step(x), theirs.step(x)
        torch.testing.assert_close(out.loss, ref.loss, **TOL)
        torch.testing.assert_close(out.sparsity_loss, ref.losses[next(k for k in ref.losses if k != "mse_loss")], **TOL)
        assert torch.equal(mine.dead, theirs.dead_neurons)
        saw_dead |= bool(mine.dead.any())
        sparsity.append(out.sparsity_loss.item())
    for p in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(mine.sae, p), getattr(theirs.sae, p), **TOL)
    if name == "topk":
        assert saw_dead
    else:
        assert sparsity[0] == 0 and all(s > 0 for s in sparsity[1:])  # λ_0 = 0 under the warm-up


def test_l1_warm_up_is_linear_from_zero() -> None:
    trainer = SAETrainer(SparseAutoencoder(SAEConfig(4, 8, l1_coefficient=2.0, l1_warm_up_steps=4)))
    values = []
    for _ in range(6):
        values.append(trainer.l1_coefficient())
        trainer.steps += 1
    assert values == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]


def test_resampling_points_dead_latents_at_high_loss_inputs() -> None:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(D_IN, D_SAE, "standard"))
    trainer = SAETrainer(sae, dead_feature_window=3)
    x = batch()
    trainer.step(x)  # Adam moments exist
    trainer.steps_since_fired[:5] = 10
    dead = trainer.dead.clone()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    # one input far worse reconstructed than the rest: with probabilities ∝ loss², every draw picks it
    x_res = batch(seed=5) * 0.01
    x_res[7] = 50 * torch.ones(D_IN)
    assert trainer.resample_dead(x_res, generator=torch.Generator().manual_seed(0)) == 5
    v = x_res[7] - sae.b_dec
    v = v / v.norm()
    alive_dec = before["W_dec"][~dead].norm(dim=-1).mean()
    alive_enc = before["W_enc"][:, ~dead].norm(dim=0).mean()
    torch.testing.assert_close(sae.W_dec[dead], (v * alive_dec).expand(5, -1))
    torch.testing.assert_close(sae.W_enc[:, dead].T, (v * 0.2 * alive_enc).expand(5, -1))
    assert (sae.b_enc[dead] == 0).all()
    for name in ("W_dec", "b_enc"):
        assert torch.equal(getattr(sae, name)[~dead], before[name][~dead])
        assert (trainer.optimizer.state[getattr(sae, name)]["exp_avg"][dead] == 0).all()
        assert (trainer.optimizer.state[getattr(sae, name)]["exp_avg"][~dead] != 0).any()
    assert (trainer.optimizer.state[sae.W_enc]["exp_avg_sq"][:, dead] == 0).all()
    assert not trainer.dead.any()
    assert (sae.encode(x_res[7:8])[0, dead] > 0).all()  # the new latents fire on the input they were drawn from


def test_resampling_without_dead_latents_changes_nothing() -> None:
    sae = SparseAutoencoder(SAEConfig(D_IN, D_SAE))
    trainer = SAETrainer(sae)
    before = sae.W_dec.detach().clone()
    assert trainer.resample_dead(batch()) == 0
    assert torch.equal(sae.W_dec, before)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"architecture": "jumprelu"}, "architecture"),
        ({"d_sae": 0}, "d_sae"),
        ({"architecture": "topk", "k": 99}, "k must be at most d_sae"),
        ({"l1_coefficient": -1.0}, "l1_coefficient"),
        ({"aux_k": 0}, "aux_k must be a positive integer"),
        ({"lp_norm": 0.0}, "lp_norm"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SAEConfigError, match=field):
        SAEConfig(**{"d_in": 4, "d_sae": 8, **kwargs})


def test_wrong_input_width_is_named() -> None:
    with pytest.raises(SAEConfigError, match="d_in=4"):
        SparseAutoencoder(SAEConfig(4, 8)).encode(torch.zeros(2, 5))
