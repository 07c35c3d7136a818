"""Interpretability: hook points on the one model, activation caches, logit lens, attention maps, patching, and
sparse autoencoders trained on a hook point's activations (with SAELens' files and a feature dashboard)."""

from lmforge.interp.dashboard import feature_activations, feature_cards, render_dashboard, top_contexts, write_dashboard
from lmforge.interp.hooks import (
    Hook,
    HookError,
    HookHandle,
    add_hook,
    hook_names,
    hook_points,
    hooks,
    remove_hooks,
    run_with_cache,
    run_with_hooks,
    select_names,
)
from lmforge.interp.sae import (
    SAEConfig,
    SAEConfigError,
    SAEOutput,
    SAETrainer,
    SparseAutoencoder,
    sae_losses,
    topk_aux_loss,
)
from lmforge.interp.sae_files import SAEFileError, load_sae, read_sae_config, save_sae
from lmforge.interp.sae_train import (
    SAETrainConfig,
    mixing_buffer,
    model_activations,
    reconstruction_metrics,
    token_windows,
    train_sae,
    typical_rows,
)

__all__ = [
    "Hook",
    "HookError",
    "HookHandle",
    "SAEConfig",
    "SAEConfigError",
    "SAEFileError",
    "SAEOutput",
    "SAETrainConfig",
    "SAETrainer",
    "SparseAutoencoder",
    "add_hook",
    "feature_activations",
    "feature_cards",
    "hook_names",
    "hook_points",
    "hooks",
    "load_sae",
    "mixing_buffer",
    "model_activations",
    "read_sae_config",
    "reconstruction_metrics",
    "remove_hooks",
    "render_dashboard",
    "run_with_cache",
    "run_with_hooks",
    "sae_losses",
    "save_sae",
    "select_names",
    "token_windows",
    "top_contexts",
    "topk_aux_loss",
    "train_sae",
    "typical_rows",
    "write_dashboard",
]
