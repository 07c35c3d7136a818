"""The cache seam: how one forward pass meets whatever holds the keys and values of earlier tokens.

One forward of `Transformer.hidden_states` over new tokens `input_ids` (B, T), with a cache:

1. The caller gives the batch layout: padded rows, `attention_mask` (B, T) marking the real tokens (padding may
   sit anywhere: left-padded prompts, or a row that decodes one token while another prefills a chunk of T), and
   optionally `position_ids` (B, T); by default a token's position is its row's next position (`next_positions`)
   plus the count of real tokens before it in this call. Packed rows (`doc_ids` (B, T), no cache) instead say
   which document each token belongs to: a token attends only to earlier tokens of its own document.
2. `keys = cache.prepare(valid, positions)` makes room for each row's real new tokens (`CacheFullError` when there
   is none) and returns the `KeyLayout` of the keys every layer will attend over once they are stored: their
   positions (B or 1, S), which slots hold real tokens (B, S), and `past` when the layout is the plain one.
3. The model builds, once per forward and shared by every layer, the `AttentionInputs`: masks per layer type from
   the query and key positions (causal, sliding window, real keys, same document), RoPE tables, ALiBi biases.
4. Each layer calls `inputs.attend(layer, kind, q, new, fn)`, which lets the cache run the attention:
   `cache.attend(layer, q, new, mask, fn)` stores `new` (the layer's tensors, sequence on dim -2: k (B, Hkv, T, D)
   and v for standard attention; MLA's latent c_kv (B, T, c) and shared rope key k_pe (B, T, r)) and returns
   `fn(q, *stored, mask)` with `stored` laid out as `keys` says (B, ..., S, d). The default does exactly that; a
   paged cache can call a block-table kernel instead, or gather its blocks and call `fn` (the reference).
5. `cache.commit()` after the last layer: the new tokens now count as stored (a failed forward stores nothing).

Rows join and leave between forwards (`add_rows`, `remove_rows` of the implementations: a finished sequence frees
its room, a new one starts empty and is prefilled in the same forward as the others' decode steps); the batch of
a forward must match the cache's rows, and a fresh cache takes the batch of its first forward. Implementations:
`infer.kv_cache.KVCache` (contiguous, per-row lengths), `infer.static_cache.StaticKVCache` (preallocated,
compile-friendly), `infer.paged_cache.PagedKVCache` (blocks in a pool, per-row block tables).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

AttendFn = Callable[..., torch.Tensor]  # fn(q, *stored, mask) -> the layer's attention output


class CacheFullError(RuntimeError):
    """A cache has no room for the new tokens."""


@dataclass
class KeyLayout:
    """The keys a layer attends over after the new tokens are stored.

    positions: (B or 1, S) position id of each key slot.
    valid: (B, S) bool, the slot holds a real token; None: every slot at or before a query's position does.
    past: the keys are `past` stored slots followed by the T new tokens in every row, all real (the model may
        then skip building masks); None otherwise.
    """

    positions: torch.Tensor
    valid: torch.Tensor | None = None
    past: int | None = None


@dataclass
class AttentionInputs:
    """Everything a layer's attention needs besides its input, built by the caller once per forward."""

    positions: torch.Tensor | None = None  # (B, T) position ids of the new tokens
    valid: torch.Tensor | None = None  # (B, T) bool: real new tokens; None: all are
    doc_ids: torch.Tensor | None = None  # (B, T) packed rows: the document of each token
    keys: KeyLayout | None = None  # what the layers attend over (None: the new tokens, causal)
    masks: dict[str, torch.Tensor | None] = field(default_factory=dict)  # per layer type; None: plain causal
    cos: torch.Tensor | None = None  # RoPE tables (B, 1, T, rot/2)
    sin: torch.Tensor | None = None
    alibi: torch.Tensor | None = None  # (B or 1, H, T, S) additive bias
    cache: Cache | None = None

    def attend(
        self, layer: int, kind: str, q: torch.Tensor, new: tuple[torch.Tensor, ...], fn: AttendFn
    ) -> torch.Tensor:
        """Layer `layer` (of type `kind`) attends with queries `q` over `new` and, with a cache, what it stored."""
        mask = self.masks.get(kind)
        if self.cache is None:
            return fn(q, *new, mask)
        return self.cache.attend(layer, q, new, mask, fn)


class Cache(ABC):
    """What the model asks of a cache (see the module docstring for the order of the calls)."""

    @abstractmethod
    def next_positions(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) long: the position id each row's next token gets by default."""

    @abstractmethod
    def prepare(self, valid: torch.Tensor | None, positions: torch.Tensor) -> KeyLayout:
        """Make room for the real new tokens (`valid` (B, T) bool, None: all) at `positions` (B, T); describe the
        keys the layers will see."""

    @abstractmethod
    def store(self, layer: int, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Write layer `layer`'s new tensors (sequence on dim -2); return everything stored, laid out as `prepare`
        said."""

    def attend(
        self, layer: int, q: torch.Tensor, new: tuple[torch.Tensor, ...], mask: torch.Tensor | None, fn: AttendFn
    ) -> torch.Tensor:
        """Store the new tensors, then attend over everything stored."""
        return fn(q, *self.store(layer, new), mask)

    @abstractmethod
    def commit(self) -> None:
        """The forward is done: the tokens `prepare` made room for count as stored."""
