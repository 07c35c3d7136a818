"""Runtime options: how a model computes, as opposed to what it computes (its `ModelConfig`).

A checkpoint defines the function (sizes, norms, positions...); these switches choose among equivalent ways
to compute it, or trade memory for time, and can change between calls on the same weights:

    attn_backend              "sdpa" (torch's fused kernels) or "eager" (the equation written out; soft-capping)
    mla_absorb                None: MLA's absorbed form when decoding over a latent cache, the expanded form
                              otherwise; True/False force one form (both compute the same function)
    moe_reference             MoE experts run by the reference loop over experts instead of the grouped path
    activation_checkpointing  training: keep only block inputs, recompute each block in the backward pass

One `RuntimeOptions` object belongs to a `Transformer` (`model.runtime`) and is shared by reference with the
modules that read it, so `model.runtime.attn_backend = "eager"` switches every layer at once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from lmforge.configfile import check_choice

BACKENDS = ("sdpa", "eager")


@dataclass
class RuntimeOptions:
    attn_backend: str = "sdpa"
    mla_absorb: bool | None = None
    moe_reference: bool = False
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_choice("attn_backend", self.attn_backend, BACKENDS)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
