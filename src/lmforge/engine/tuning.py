"""The engine's view of a prompt- or prefix-tuned model (finetune/prompt_tuning.py, finetune/prefix_tuning.py).

Both put n virtual tokens in front of every prompt, so every sequence's tokens start with n lead ids that take n
places of the context (as in `generate_tuned`); the real tokens sit at positions n, n+1, ..., and the lead is
never part of an output:

    prompt tuning   the lead is the virtual ids V .. V+n-1, which the model's `PromptEmbedding` embeds as the
                    prompt's rows: nothing else changes (the paged cache holds their keys like any token's)
    prefix tuning   the lead is n placeholder ids (0) and the cache is a `PrefixBlockTableCache`: whatever keys
                    and values layer l computes at positions 0 .. n-1, it stores the prefix's K_l, V_l there
                    instead (the encoder's output, computed once), so every later token attends over the prefix
                    at positions 0 .. n-1, as `PrefixCache` gives it in generation

Every request shares the lead, so prefix caching shares its blocks as it would a system prompt's. The
placeholders' own queries compute outputs nobody reads (n wasted positions of a prompt's prefill).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.finetune.prefix_tuning import PrefixEncoder
from lmforge.finetune.prompt_tuning import PromptEmbedding
from lmforge.infer.paged_cache import BlockTableCache
from lmforge.model.cache import KeyLayout


def lead_ids(model: nn.Module) -> list[int]:
    """The ids every sequence of `model` starts with (module docstring): [] for a model with no prompt or prefix."""
    embed, prefix = getattr(model, "embed", None), getattr(model, "prefix_encoder", None)
    if isinstance(embed, PromptEmbedding):
        return embed.virtual_ids().flatten().tolist()
    if isinstance(prefix, PrefixEncoder):
        return [0] * prefix.n_virtual
    return []


def block_cache(model: nn.Module, num_blocks: int, block_size: int) -> BlockTableCache:
    """The runner's cache for `model`: a `PrefixBlockTableCache` for a prefix-tuned model, else a plain one."""
    prefix = getattr(model, "prefix_encoder", None)
    if isinstance(prefix, PrefixEncoder):
        with torch.inference_mode():
            key_values = [(k[0].clone(), v[0].clone()) for k, v in prefix.key_values()]
        return PrefixBlockTableCache(num_blocks, block_size, key_values)
    return BlockTableCache(num_blocks, block_size)


class PrefixBlockTableCache(BlockTableCache):
    """A `BlockTableCache` whose layer l stores `key_values[l]` (keys, values), each (Hkv, n, D), at positions
    0 .. n-1 in place of what the layer computed there (module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(num_blocks, block_size)
        self.key_values = key_values
        self.n = key_values[0][0].shape[-2]
        self._positions: torch.Tensor | None = None  # (B, T) the new tokens' positions (padding: 0)

    def prepare(self, valid: torch.Tensor | None, positions: torch.Tensor) -> KeyLayout:
        self._positions = positions if valid is None else positions.where(valid, 0)
        return super().prepare(valid, positions)

    def store(self, layer: int, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        inside = (self._positions < self.n)[:, None, :, None]  # (B, 1, T, 1)
        at = self._positions.clamp(max=self.n - 1)
        prefixed = tuple(torch.where(inside, p[:, at].movedim(0, 1).to(t.dtype), t)  # p[:, at]: (Hkv, B, T, D)
                         for p, t in zip(self.key_values[layer], new, strict=True))  # fmt: skip
        return super().store(layer, prefixed)

    def commit(self) -> None:
        super().commit()
        self._positions = None
