"""Prefix tuning (Li & Liang 2021): per layer, n trainable keys and values that every token attends to.

Layer l's attention runs over [K_l^prefix; K] and [V_l^prefix; V], K_l^prefix, V_l^prefix (Hkv, n, D) trained, the
model frozen: the prefix acts like n past tokens whose keys and values are free parameters. As PEFT passes them
to transformers (`past_key_values`), they are the keys as stored in a cache: already rotated (RoPE and QK-norm
are not applied to them), one per key/value head (GQA: Hkv heads, token_dim = Hkv D). They occupy the past
positions 0 .. n-1, so the real tokens get positions n .. n+T-1 (transformers' cache_position starts at the
past length) and a sliding window sees the prefix as it would n past tokens.

The parameters (`PrefixEncoder`, PEFT's layout and names): `embedding` (n, L 2 token_dim) holds the prefix itself,
or, with `projection` (PEFT's prefix_projection, the paper's reparameterisation for stable training),
`embedding` (n, token_dim) -> `transform` = Linear(token_dim, encoder_hidden_size) -> Tanh -> Linear(-> L 2
token_dim). Either way the encoder's output row i, viewed as (2L, Hkv, D), is the prefix token i of layer l's key
(index 2l) and value (2l + 1). `add_prefix_tuning(model, n)` attaches it as `model.prefix_encoder`, so the
model's optimizer, clipping and checkpoints see it; a plain `model(ids)` ignores it.

Running it (the cache seam, model/cache.py). `PrefixCache(key_values, inner)` is a `Cache` around an inner one
(a `KVCache` for generation, or None: a training or plain forward over the new tokens alone). It reports n more
past positions than the inner cache (which holds the real tokens at positions shifted down by n, so it never
knows about the prefix), describes the keys as the n prefix slots (positions 0 .. n-1, always real) followed by
the inner cache's, and its `store` puts layer l's prefix in front of what the inner cache returns. The masks
the model builds from that layout let every query see the prefix (and padding rows, left or right, stay
invisible). `encoder.cache(inner)` builds one; `PrefixEncoder.hidden_states` / `decode_forward` are the hooks
`PromptLearningObjective` and `generate_tuned` (finetune/prompt_tuning.py, also exported here as
`generate_with_prefix`) use. Multi-head latent attention (MLA) stores a latent, not keys and values: refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lmforge.configfile import check_positive
from lmforge.finetune.prompt_tuning import PromptTuningError, check_untuned, generate_tuned
from lmforge.infer.decode import Forward
from lmforge.infer.generate import last_logits
from lmforge.infer.kv_cache import KVCache
from lmforge.model.cache import Cache, KeyLayout

__all__ = [
    "PrefixCache",
    "PrefixEncoder",
    "add_prefix_tuning",
    "generate_with_prefix",
    "remove_prefix_tuning",
    "train_only_prefix",
]

generate_with_prefix = generate_tuned  # one generation path for prompts and prefixes


class PrefixEncoder(nn.Module):
    """The prefix's parameters (module docstring): `forward()` -> (n, num_layers 2 token_dim)."""

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        projection: bool = False,
        encoder_hidden_size: int | None = None,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("num_virtual_tokens", num_virtual_tokens), ("num_layers", num_layers),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):  # fmt: skip
            check_positive(name, value)
        self.n_virtual, self.n_layers = num_virtual_tokens, num_layers
        self.n_kv_heads, self.head_dim = num_kv_heads, head_dim
        token_dim = self.token_dim
        self.encoder_hidden_size = token_dim if encoder_hidden_size is None else encoder_hidden_size
        check_positive("encoder_hidden_size", self.encoder_hidden_size)
        width = num_layers * 2 * token_dim
        self.transform: nn.Sequential | None = None
        if projection:  # PEFT: Embedding(n, token_dim) -> Linear -> Tanh -> Linear; default inits (as PEFT's)
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, self.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(self.encoder_hidden_size, width))  # fmt: skip
            if zero_init:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width)  # N(0, 1), as PEFT's
            if zero_init:
                nn.init.zeros_(self.embedding.weight)

    @property
    def token_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def projection(self) -> bool:
        return self.transform is not None

    def forward(self) -> Tensor:
        """(n, num_layers 2 token_dim): PEFT's `prompt_embeddings` (what its file holds)."""
        x = self.embedding.weight
        return x if self.transform is None else self.transform(x)

    def key_values(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer, (keys, values), each (1, Hkv, n, D)."""
        n, layers = self.n_virtual, 2 * self.n_layers
        kv = self().view(n, layers, self.n_kv_heads, self.head_dim).permute(1, 2, 0, 3)  # (2L, Hkv, n, D)
        return [(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(self.n_layers)]

    def cache(self, inner: Cache | None = None) -> PrefixCache:
        """A `PrefixCache` of this prefix around `inner` (None: a forward over the new tokens alone)."""
        return PrefixCache(self.key_values(), inner)

    def hidden_states(self, model: nn.Module, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The final-normed states (B, T, d) of `ids` (B, T) behind the prefix (no cache kept)."""
        return model.hidden_states(ids, attention_mask, cache=self.cache())

    def decode_forward(self, model: nn.Module, n_tokens: int) -> Forward:
        """The decode loop's forward for sequences of up to `n_tokens` real tokens: a `PrefixCache` around a
        fresh `KVCache(n_tokens)`, the prefix computed once (inference mode)."""
        with torch.inference_mode():
            cache = self.cache(KVCache(n_tokens))
        return lambda ids, mask, _first: last_logits(model, ids, cache, mask)

    def extra_repr(self) -> str:
        return (f"n={self.n_virtual}, layers={self.n_layers}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"projection={self.projection}")  # fmt: skip


class PrefixCache(Cache):
    """The cache seam with a prefix: layer l's `key_values[l]` (keys, values), each (1 or B, Hkv, n, D), in front of
    what `inner` stores (module docstring); `inner` None: the forward's new tokens alone (nothing is kept).
    Position ids given to the model count the prefix: the first real token is at n (PEFT offsets them so)."""

    def __init__(self, key_values: Sequence[tuple[Tensor, Tensor]], inner: Cache | None = None) -> None:
        self.key_values = list(key_values)
        self.n = self.key_values[0][0].shape[-2]
        self.inner = inner
        self._batch = 1

    def next_positions(self, batch: int, device: torch.device) -> Tensor:
        if self.inner is None:
            return torch.full((batch,), self.n, dtype=torch.long, device=device)
        return self.inner.next_positions(batch, device) + self.n

    def prepare(self, valid: Tensor | None, positions: Tensor) -> KeyLayout:
        b, n = positions.shape[0], self.n
        self._batch = b
        if self.inner is None:
            keys = KeyLayout(positions, valid, 0 if valid is None else None)
        else:
            keys = self.inner.prepare(valid, positions - n)
            keys = KeyLayout(keys.positions + n, keys.valid, keys.past)
        prefix = torch.arange(n, device=positions.device).expand(keys.positions.shape[0], n)
        key_valid = None
        if keys.valid is not None:
            key_valid = torch.cat((keys.valid.new_ones(b, n), keys.valid), dim=1)
        return KeyLayout(torch.cat((prefix, keys.positions), dim=1), key_valid,
                         None if keys.past is None else keys.past + n)  # fmt: skip

    def store(self, layer: int, new: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if len(new) != 2:
            raise PromptTuningError(f"prefix tuning needs attention that stores keys and values (layer {layer} "
                                    f"stores {len(new)} tensors)")  # fmt: skip
        k, v = new if self.inner is None else self.inner.store(layer, new)
        pk, pv = self.key_values[layer]
        shape = (k.shape[0], *pk.shape[1:])
        return (torch.cat((pk.to(k.dtype).expand(shape), k), dim=-2),
                torch.cat((pv.to(v.dtype).expand(shape), v), dim=-2))  # fmt: skip

    def commit(self) -> None:
        if self.inner is not None:
            self.inner.commit()

    # the rows of the inner cache (`infer.kv_cache.Rows`), for callers that add and remove sequences
    @property
    def batch(self) -> int:
        return self._rows().batch

    def add_rows(self, n: int = 1, device: torch.device | str | None = None) -> list[int]:
        return self._rows().add_rows(n, device)

    def remove_rows(self, rows: Sequence[int]) -> None:
        self._rows().remove_rows(rows)

    def reset(self) -> None:
        self._rows().reset()

    def _rows(self):
        if not hasattr(self.inner, "add_rows"):
            raise PromptTuningError("this PrefixCache has no inner cache of rows (give it inner=KVCache(...))")
        return self.inner


def add_prefix_tuning(
    model: nn.Module,
    num_virtual_tokens: int,
    *,
    projection: bool = False,
    encoder_hidden_size: int | None = None,
    zero_init: bool = False,
) -> PrefixEncoder:
    """Attach a trainable prefix of `num_virtual_tokens` tokens per layer as `model.prefix_encoder` (module
    docstring; on the model's device and dtype); returns it. `encoder_hidden_size` (default token_dim) is the
    projection's width; `zero_init` is PEFT's init_weights="zero"."""
    cfg = model.config
    if cfg.mla is not None:
        raise PromptTuningError(f"prefix tuning of a {cfg.arch} model with multi-head latent attention (MLA) is not "
                                "supported: its cache holds a latent, not keys and values")  # fmt: skip
    check_untuned(model)
    encoder = PrefixEncoder(num_virtual_tokens, cfg.n_layers, cfg.kv_heads, cfg.dim_head, projection=projection,
                            encoder_hidden_size=encoder_hidden_size, zero_init=zero_init)  # fmt: skip
    weight = next(model.parameters())
    model.prefix_encoder = encoder.to(weight.device, weight.dtype).train(model.training)
    return model.prefix_encoder


def remove_prefix_tuning(model: nn.Module) -> PrefixEncoder:
    """Detach and return `model.prefix_encoder`."""
    encoder = getattr(model, "prefix_encoder", None)
    if not isinstance(encoder, PrefixEncoder):
        raise PromptTuningError("the model has no prefix (model.prefix_encoder)")
    del model.prefix_encoder
    return encoder


def train_only_prefix(model: nn.Module) -> int:
    """Freeze everything but `model.prefix_encoder`; returns its parameter count."""
    encoder = getattr(model, "prefix_encoder", None)
    if not isinstance(encoder, PrefixEncoder):
        raise PromptTuningError("the model has no prefix (model.prefix_encoder)")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in encoder.parameters():
        p.requires_grad_(True)
    return sum(p.numel() for p in encoder.parameters())
