"""The logit lens (nostalgebraist, 2020): read every layer's residual stream as if it were the last one.

With h_0 the embeddings (the residual stream into block 0) and h_l the output of block l (l = 1..L), each is
decoded by the model's own final norm and unembedding:

    lens_l = W_U · norm_final(h_l)    [soft-capped as the model's logits]        (B, T, vocab)
    p_l    = softmax(lens_l)

lens_L is exactly the model's logits. How early the right token rises in p_l, and which tokens a layer ranks
first, shows where a prediction forms. `logit_lens` gives the (L + 1, B, T, vocab) stack, `top_tokens` each
layer's k most probable tokens and `target_probs` the probability of given tokens at every layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmforge.interp.hooks import run_with_cache
from lmforge.model.transformer import Transformer
from lmforge.utils.errors import LmforgeError

Positions = int | Sequence[int] | slice | None


def lens_names(model: Transformer) -> list[str]:
    """The residual stream points the lens reads: the embeddings, then each block's output."""
    return ["blocks.0.hook_resid_pre", *(f"blocks.{i}.hook_resid_post" for i in range(model.config.n_layers))]


def logit_lens(
    model: Transformer,
    input_ids: torch.Tensor,
    *,
    positions: Positions = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (L + 1, B, T', vocab) of the final norm and head applied to each layer's residual stream at
    `positions` (an index, indices or a slice of the T positions; None: all)."""
    index = [positions] if isinstance(positions, int) else slice(None) if positions is None else positions
    cache = run_with_cache(model, input_ids, lens_names(model), attention_mask=attention_mask)
    with torch.no_grad():
        return torch.stack([model.logits(model.norm(h[:, index])) for h in cache.values()])


def top_tokens(lens: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable tokens of each layer and position: (probabilities, token ids), each (..., k)."""
    if not 1 <= k <= lens.shape[-1]:
        raise LmforgeError(f"top_tokens: k must be in 1..{lens.shape[-1]} (the vocabulary), got {k}")
    return _probs(lens).topk(k, dim=-1)


def target_probs(lens: torch.Tensor, targets: int | torch.Tensor) -> torch.Tensor:
    """p_l(target) for every layer: (L + 1, B, T') from `targets`, one token id or ids broadcastable to (B, T')."""
    shape = lens.shape[1:-1]
    ids = torch.as_tensor(targets, device=lens.device)
    try:
        ids = ids.broadcast_to(shape)
    except RuntimeError:
        raise LmforgeError(f"target_probs: targets of shape {tuple(ids.shape)} do not broadcast to the lens' "
                           f"(batch, positions) {tuple(shape)}") from None  # fmt: skip
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= lens.shape[-1]):
        raise LmforgeError(f"target_probs: target ids must be in 0..{lens.shape[-1] - 1}")
    probs = _probs(lens)
    return probs.gather(-1, ids.expand(lens.shape[0], *shape)[..., None]).squeeze(-1)


def _probs(lens: torch.Tensor) -> torch.Tensor:
    """softmax over the vocabulary, in float32 at least."""
    return torch.softmax(lens, dim=-1, dtype=torch.promote_types(lens.dtype, torch.float32))
