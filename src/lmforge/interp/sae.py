"""Sparse autoencoders (SAEs) on a model's activations: the ReLU + L1 SAE and the TopK SAE with AuxK, as SAELens 6.

An SAE rewrites an activation x ∈ R^d_in as a sparse, non-negative combination of d_sae learned directions
(the rows of W_dec), so each latent can be read as one "feature" of the model:

    x' = x − b_dec                                  (the pre-encoder bias; `apply_b_dec_to_input`)
    h  = x' W_enc + b_enc                            hidden_pre, (…, d_sae); W_enc (d_in, d_sae)
    f  = ReLU(h)                                     standard: every positive latent fires
    x̂  = f W_dec + b_dec                             W_dec (d_sae, d_in), one direction per row

Standard (`architecture="standard"`, SAELens' `StandardTrainingSAE`; Anthropic's April 2024 update): no norm
constraint on W_dec; the L1 penalty weighs each latent by its decoder row norm, so shrinking a row cannot buy
sparsity:

    L = mean_batch ||x − x̂||²  +  mean_batch λ_t · || f ⊙ ||W_dec||_row ||_p        (p = `lp_norm`, 1 by default)
    λ_t = λ · min(1, t / l1_warm_up_steps)    at training step t (from 0); λ when there is no warm-up

TopK (`architecture="topk"`, SAELens' `TopKTrainingSAE`; Gao et al. 2024, "Scaling and evaluating sparse
autoencoders"): exactly k latents fire. With `rescale_acts_by_decoder_norm` (SAELens' training default) the
selection sees each latent's output size, and the decoder acts as if its rows were unit vectors:

    h ← h ⊙ ||W_dec||_row                      (rescale only)
    f = scatter(TopK_k(h), ReLU)               the k largest pre-activations, ReLU'd; all else 0
    x̂ = (f ⊙ 1/||W_dec||_row) W_dec + b_dec    (rescale only; else f W_dec + b_dec)

AuxK (Gao et al., appendix A.2): the dead latents (not fired for more than `dead_feature_window` steps) are
asked to reconstruct what the live ones missed, so they receive gradient again:

    e    = stopgrad(x − x̂)                      the residual
    k_a  = min(aux_k, n_dead),  aux_k = d_in // 2 (the paper's heuristic) unless given
    z    = scatter(TopK_{k_a}(h restricted to dead latents))    (no ReLU: SAELens keeps the raw values)
    ê    = (z ⊙ 1/||W_dec||_row) W_dec          no bias: b_dec is already in e
    L    = mean_batch ||x − x̂||²  +  α · min(1, n_dead / aux_k) · mean_batch ||ê − e||²

One training step is SAELens' `SAETrainer._train_step`: the loss above, backward, the gradients clipped to global
2-norm 1, one Adam step (lr 3e-4, betas (0.9, 0.999), eps 1e-8: SAELens' defaults), and the dead-latent
counters updated from the batch's activations (computed before the update): steps_since_fired += 1, and 0 for
every latent nonzero on some row of the batch. A latent is dead when steps_since_fired > dead_feature_window.

Initialisation (SAELens' `TrainingSAE`): W_dec ~ kaiming_uniform (d_sae, d_in), each row rescaled to norm
`decoder_init_norm` (0.1), W_enc = W_decᵀ, b_enc = b_dec = 0. Under the same seed it draws the same numbers.

Resampling (Anthropic, "Towards Monosemanticity" (2023), "neuron resampling"; an option of ours, SAELens 6 has
none): for a batch X, each row's loss is ℓ_j = ||x_j − x̂_j||²; for each dead latent i draw a row j with
probability ∝ ℓ_j² and, with v = x_j − b_dec (what the encoder sees),

    W_dec[i] ← v/||v|| · mean_{alive} ||W_dec row||      Anthropic's unit vector, scaled to the live rows' norms
    W_enc[:, i] ← v/||v|| · 0.2 · mean_{alive} ||W_enc column||        b_enc[i] ← 0

the Adam moments of those rows/columns are zeroed, and the latents count as just fired.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.configfile import is_int
from lmforge.train.clip import clip_grad_norm
from lmforge.train.optim.adam import Adam
from lmforge.utils.errors import LmforgeError

ARCHITECTURES = ("standard", "topk")


class SAEConfigError(LmforgeError):
    """An SAE setting (architecture, sizes, k, coefficients) that cannot work; the message names the field."""


@dataclass(frozen=True)
class SAEConfig:
    """What an SAE is and how its loss is weighed; field names are SAELens' (cfg.json keys)."""

    d_in: int
    d_sae: int
    architecture: str = "standard"
    k: int = 100  # topk: latents that fire per input
    l1_coefficient: float = 1.0  # standard: λ
    lp_norm: float = 1.0  # standard: p of the sparsity norm
    l1_warm_up_steps: int = 0  # standard: λ ramps up linearly over these steps
    aux_loss_coefficient: float = 1.0  # topk: α
    aux_k: int | None = None  # topk: dead latents in the AuxK loss; None = d_in // 2
    rescale_acts_by_decoder_norm: bool = True  # topk: select and decode as if W_dec rows were unit vectors
    apply_b_dec_to_input: bool = True
    decoder_init_norm: float | None = 0.1
    hook_name: str | None = None  # where the activations come from, e.g. "blocks.6.hook_resid_post"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEConfigError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        for name in ("d_in", "d_sae", "k", "aux_k"):
            value = getattr(self, name)
            if not (name == "aux_k" and value is None) and not (is_int(value) and value > 0):
                raise SAEConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.architecture == "topk" and self.k > self.d_sae:
            raise SAEConfigError(f"k must be at most d_sae ({self.d_sae}), got {self.k}")
        for name in ("l1_coefficient", "aux_loss_coefficient", "l1_warm_up_steps"):
            if getattr(self, name) < 0:
                raise SAEConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.lp_norm <= 0:
            raise SAEConfigError(f"lp_norm must be > 0, got {self.lp_norm!r}")
        if self.decoder_init_norm is not None and self.decoder_init_norm <= 0:
            raise SAEConfigError(f"decoder_init_norm must be > 0 or None, got {self.decoder_init_norm!r}")

    @property
    def rescales(self) -> bool:
        """Whether encode/decode rescale by the decoder row norms (TopK with `rescale_acts_by_decoder_norm`)."""
        return self.architecture == "topk" and self.rescale_acts_by_decoder_norm


class SparseAutoencoder(nn.Module):
    """x ↦ x̂ through d_sae sparse latents (module docstring); parameters W_enc, b_enc, W_dec, b_dec as SAELens'."""

    def __init__(self, cfg: SAEConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg = cfg
        # created in SAELens' order (b_dec, W_dec, then W_enc from it), so a seed draws the same weights
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, dtype=dtype, device=device))
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.W_dec)
        if self.cfg.decoder_init_norm is not None:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True)).mul_(self.cfg.decoder_init_norm)
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def hidden_pre(self, x: Tensor) -> Tensor:
        """Pre-activations h (…, d_sae) of inputs x (…, d_in), rescaled by the decoder norms for TopK."""
        if x.shape[-1] != self.cfg.d_in:
            raise SAEConfigError(f"SAE input has {x.shape[-1]} features (last dim); expected d_in={self.cfg.d_in}")
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        h = x @ self.W_enc + self.b_enc
        return h * self.W_dec.norm(dim=-1) if self.cfg.rescales else h

    def activate(self, h: Tensor) -> Tensor:
        """Latent activations f from pre-activations h: ReLU, or the top k ReLU'd with the rest zero."""
        if self.cfg.architecture == "standard":
            return torch.relu(h)
        values, indices = torch.topk(h, self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(h).scatter_(-1, indices, values.relu())

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations f (…, d_sae) of inputs x (…, d_in)."""
        return self.activate(self.hidden_pre(x))

    def decode_directions(self, f: Tensor) -> Tensor:
        """f W_dec (…, d_in) without b_dec, the decoder norms divided out for a rescaling TopK SAE."""
        if self.cfg.rescales:
            f = f * (1 / self.W_dec.norm(dim=-1))
        return f @ self.W_dec

    def decode(self, f: Tensor) -> Tensor:
        """Reconstructions x̂ (…, d_in) of latent activations f (…, d_sae)."""
        return self.decode_directions(f) + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


@dataclass
class SAEOutput:
    """One training forward pass: the loss to minimise, its parts, and the tensors they came from."""

    loss: Tensor
    mse_loss: Tensor
    sparsity_loss: Tensor  # standard: the weighted L1 term; topk: the AuxK term (0 with no dead latent)
    feature_acts: Tensor
    hidden_pre: Tensor
    sae_out: Tensor


def topk_aux_loss(sae: SparseAutoencoder, x: Tensor, sae_out: Tensor, hidden_pre: Tensor, dead: Tensor) -> Tensor:
    """α · min(1, n_dead / aux_k) · mean ||ê − e||², the dead latents' reconstruction of the residual (docstring)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return sae_out.new_zeros(())
    residual = (x - sae_out).detach()
    aux_k = sae.cfg.aux_k if sae.cfg.aux_k is not None else x.shape[-1] // 2
    scale = min(n_dead / aux_k, 1.0)
    values, indices = torch.where(dead, hidden_pre, -torch.inf).topk(min(aux_k, n_dead), sorted=False)
    z = torch.zeros_like(hidden_pre).scatter_(-1, indices, values)
    error = sae.decode_directions(z) - residual
    return sae.cfg.aux_loss_coefficient * scale * error.pow(2).sum(-1).mean()


def sae_losses(
    sae: SparseAutoencoder, x: Tensor, *, dead: Tensor | None = None, l1_coefficient: float | None = None
) -> SAEOutput:
    """The training loss of `sae` on a batch x (B, d_in) (module docstring).

    `dead`: (d_sae,) bool, the latents counted dead (TopK's AuxK term; None = none). `l1_coefficient`: λ_t for
    this step (standard; None = `cfg.l1_coefficient`)."""
    x = x.to(sae.W_enc.dtype)
    hidden_pre = sae.hidden_pre(x)
    feature_acts = sae.activate(hidden_pre)
    sae_out = sae.decode(feature_acts)
    mse = (sae_out - x).pow(2).sum(-1).mean()
    if sae.cfg.architecture == "standard":
        lam = sae.cfg.l1_coefficient if l1_coefficient is None else l1_coefficient
        weighted = feature_acts * sae.W_dec.norm(dim=1)
        sparsity = (lam * weighted.norm(p=sae.cfg.lp_norm, dim=-1)).mean()
    elif dead is None:
        sparsity = mse.new_zeros(())
    else:
        sparsity = topk_aux_loss(sae, x, sae_out, hidden_pre, dead)
    return SAEOutput(mse + sparsity, mse, sparsity, feature_acts, hidden_pre, sae_out)


class SAETrainer:
    """SAELens' training step around an SAE: Adam, gradient clipping, the λ warm-up and dead-latent counters."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        *,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        dead_feature_window: int = 1000,
        max_grad_norm: float = 1.0,
    ) -> None:
        if dead_feature_window < 0:
            raise SAEConfigError(f"dead_feature_window must be >= 0, got {dead_feature_window!r}")
        self.sae = sae
        self.optimizer = Adam(sae.parameters(), lr=lr, betas=betas)
        self.dead_feature_window = dead_feature_window
        self.max_grad_norm = max_grad_norm
        self.steps = 0
        self.steps_since_fired = torch.zeros(sae.cfg.d_sae, device=sae.W_enc.device)

    @property
    def dead(self) -> Tensor:
        """(d_sae,) bool: the latents that have not fired for more than `dead_feature_window` steps."""
        return self.steps_since_fired > self.dead_feature_window

    def l1_coefficient(self) -> float:
        """λ_t at the current step: the linear warm-up of `l1_coefficient` over `l1_warm_up_steps`."""
        cfg = self.sae.cfg
        if cfg.l1_warm_up_steps == 0:
            return cfg.l1_coefficient
        return cfg.l1_coefficient * min(1.0, self.steps / cfg.l1_warm_up_steps)

    def step(self, x: Tensor) -> SAEOutput:
        """One training step on the activation batch x (B, d_in); returns that step's forward pass."""
        self.sae.train()
        out = sae_losses(self.sae, x, dead=self.dead, l1_coefficient=self.l1_coefficient())
        with torch.no_grad():
            self.steps_since_fired += 1
            self.steps_since_fired[(out.feature_acts != 0).any(0)] = 0
        out.loss.backward()
        clip_grad_norm(self.sae.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.steps += 1
        return out

    @torch.no_grad()
    def resample_dead(self, x: Tensor, generator: torch.Generator | None = None) -> int:
        """Re-initialise the dead latents toward high-loss rows of x (B, d_in) (module docstring); returns how many."""
        sae, dead = self.sae, self.dead
        n_dead = int(dead.sum())
        if n_dead == 0 or n_dead == sae.cfg.d_sae:  # no latent to fix, or no live latent to take a scale from
            return 0
        x = x.to(sae.W_enc.dtype)
        loss = (sae(x) - x).pow(2).sum(-1)
        weights = loss.square()
        if not torch.isfinite(weights).all() or weights.sum() <= 0:
            return 0
        rows = torch.multinomial(weights, n_dead, replacement=True, generator=generator)
        v = x[rows] - sae.b_dec if sae.cfg.apply_b_dec_to_input else x[rows]
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        alive = ~dead
        sae.W_dec[dead] = v * sae.W_dec[alive].norm(dim=-1).mean()
        sae.W_enc[:, dead] = (v * 0.2 * sae.W_enc[:, alive].norm(dim=0).mean()).T
        sae.b_enc[dead] = 0
        for param, index in ((sae.W_dec, dead), (sae.W_enc, (slice(None), dead)), (sae.b_enc, dead)):
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in self.optimizer.state[param]:
                    self.optimizer.state[param][moment][index] = 0
        self.steps_since_fired[dead] = 0
        return n_dead
