"""Train a sparse autoencoder (interp/sae.py) on activations streamed from an lmforge model at a hook point.

    token ids (N,) ─ windows ─▶ (B, T) ─ model forward, cached at `hook_name` ─▶ (B·(T − skip_first), d)
        ─ mixing buffer ─▶ shuffled (batch_size, d) ─▶ SAETrainer.step ─▶ checkpoints (SAELens' files)

Windows: the token stream cut into non-overlapping windows of `context` tokens, visited in a fresh random order
each epoch. Activations: `run_with_cache(model, ids, hook_name)` (interp/hooks.py), flattened over batch and
position; positions before `skip_first` are dropped (the first token of a window is an attention sink whose
residual norm is many times the others', and would dominate the MSE), and so are the rare other rows whose norm
exceeds `max_norm_ratio` times the batch's median row norm (the "massive activations" of Sun et al. 2024, which
some tokens get mid-window too: one such row in a batch outweighs all the others in the MSE).

Mixing buffer (SAELens' `mixing_buffer`): consecutive activations come from the same text, so they are mixed
before training: new activations are appended to a store; once it holds `buffer_size` rows it is shuffled, all
but buffer_size · 1/2 rows are served as batches, and the kept half mixes with the next activations.

Metrics on held-out activations X (SAELens' definitions):

    L0                  = mean_rows #{i : f_i(x) ≠ 0}
    explained variance  = 1 − Σ_rows ||x − x̂||² / Σ_rows ||x − mean_rows(x)||²
    dead fraction       = #{i : steps_since_fired_i > dead_feature_window} / d_sae   (the trainer's counters)

Resampling (`resample_every`): every that many steps, `SAETrainer.resample_dead` on the next batch (sae.py).
Checkpoints (`checkpoint_every`, and the last step): `out_dir/step_{n}/`, cfg.json + sae_weights.safetensors,
each directory written atomically, with the step, L0 and dead count of the last batch in the cfg's metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lmforge.interp.hooks import run_with_cache, select_names
from lmforge.interp.sae import SAEConfigError, SAETrainer, SparseAutoencoder
from lmforge.interp.sae_files import save_sae
from lmforge.model.transformer import Transformer

ActivationFn = Callable[[Tensor], Tensor]  # ids (B, T) -> activations (B·T', d)


@dataclass(frozen=True)
class SAETrainConfig:
    """How long and how an SAE trains; lr, betas and the dead window default to SAELens'."""

    steps: int
    batch_size: int = 4096  # activation rows per step
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    dead_feature_window: int = 1000
    resample_every: int = 0  # 0: never resample
    checkpoint_every: int = 0  # 0: only the last step (when out_dir is set)
    out_dir: str | Path | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise SAEConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("resample_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise SAEConfigError(f"{name} must be >= 0 (0 = never), got {getattr(self, name)!r}")


def token_windows(ids: Tensor, context: int, windows_per_batch: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless batches (windows_per_batch, context) of non-overlapping windows of `ids` (N,), reshuffled each epoch
    (an epoch's last n mod windows_per_batch windows in its order are skipped; the next order differs)."""
    n = ids.numel() // context
    if n < windows_per_batch:
        raise SAEConfigError(f"{ids.numel()} tokens make {n} windows of {context}; a batch needs {windows_per_batch}")
    windows = ids[: n * context].view(n, context)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - windows_per_batch + 1, windows_per_batch):
            yield windows[order[start : start + windows_per_batch]]


def typical_rows(x: Tensor, max_norm_ratio: float | None) -> Tensor:
    """(…,) bool: the rows of x (…, d) whose norm is at most max_norm_ratio × the median row norm (None: all)."""
    norms = x.norm(dim=-1)
    if max_norm_ratio is None:
        return torch.ones_like(norms, dtype=torch.bool)
    return norms <= max_norm_ratio * norms.median()


def model_activations(
    model: Transformer, hook_name: str, skip_first: int = 1, max_norm_ratio: float | None = 10.0
) -> ActivationFn:
    """ids (B, T) -> the activations at `hook_name` (rows, d), computed without gradients (the forward stops at the
    hook point): positions from `skip_first` on, without the rows above `max_norm_ratio` × the median norm."""
    select_names(model, hook_name)  # an unknown name fails here, naming the point

    @torch.no_grad()
    def activations(ids: Tensor) -> Tensor:
        act = run_with_cache(model, ids, hook_name)[hook_name]
        rows = act[:, skip_first:].reshape(-1, act.shape[-1])
        return rows[typical_rows(rows, max_norm_ratio)]

    return activations


def mixing_buffer(
    chunks: Iterator[Tensor], buffer_size: int, batch_size: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """Batches (batch_size, d) of the rows of `chunks`, shuffled through a buffer (module docstring)."""
    if buffer_size < 2 * batch_size:
        raise SAEConfigError(f"buffer_size ({buffer_size}) must be at least twice batch_size ({batch_size})")
    store: Tensor | None = None
    for chunk in chunks:
        store = chunk if store is None else torch.cat([store, chunk])
        if store.shape[0] < buffer_size:
            continue
        store = store[torch.randperm(store.shape[0], generator=generator)]
        serve = (store.shape[0] - buffer_size // 2) // batch_size * batch_size
        yield from store[:serve].split(batch_size)
        store = store[serve:]
    if store is not None:
        yield from store[: store.shape[0] // batch_size * batch_size].split(batch_size)


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, x: Tensor) -> dict[str, float]:
    """L0, explained variance and MSE (per row, summed over features) of `sae` on activations x (rows, d_in)."""
    x = x.to(sae.W_enc.dtype)
    f = sae.encode(x)
    err = (sae.decode(f) - x).pow(2).sum(-1)
    total = (x - x.mean(0)).pow(2).sum(-1)
    return {
        "l0": (f != 0).sum(-1).float().mean().item(),
        "explained_variance": (1 - err.mean() / total.mean()).item(),
        "mse": err.mean().item(),
    }


def train_sae(
    sae: SparseAutoencoder, batches: Iterator[Tensor], cfg: SAETrainConfig, progress: bool = True
) -> SAETrainer:
    """Train `sae` for `cfg.steps` steps on `batches` of activations (rows, d_in); returns the trainer (its
    counters say which latents died). Checkpoints go to `cfg.out_dir` (module docstring)."""
    trainer = SAETrainer(sae, lr=cfg.lr, betas=cfg.betas, dead_feature_window=cfg.dead_feature_window)
    bar = tqdm(range(cfg.steps), desc="SAE", disable=not progress)
    for step in bar:
        x = next(batches, None)
        if x is None:
            raise SAEConfigError(f"the activations ran out after {step} of {cfg.steps} steps")
        if cfg.resample_every and step > 0 and step % cfg.resample_every == 0:
            trainer.resample_dead(x)
        out = trainer.step(x)
        done = step + 1
        if step % 20 == 0 or done == cfg.steps:
            l0 = (out.feature_acts != 0).sum(-1).float().mean().item()
            bar.set_postfix(mse=f"{out.mse_loss.item():.4g}", l0=f"{l0:.1f}", dead=int(trainer.dead.sum()))
        last = done == cfg.steps
        if cfg.out_dir is not None and (last or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
            l0 = (out.feature_acts != 0).sum(-1).float().mean().item()
            meta = {"n_training_steps": done, "l0": l0, "num_dead_features": int(trainer.dead.sum())}
            save_sae(sae, Path(cfg.out_dir) / f"step_{done}", metadata=meta)
    return trainer
