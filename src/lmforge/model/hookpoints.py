"""The model's side of hook points (interpretability): a module's optional `tap`.

A module that has named activations (a `Block`'s residual stream, an `Attention`'s pattern and per-head
outputs, an `MLP`'s hidden layer, a norm's normalized input) carries a class attribute `tap = None`. Its forward
reads it once; while it is None the forward is the plain computation, so hook points cost one attribute check
each when no hook is installed (and nothing in a compiled graph). `lmforge.interp.hooks` installs a `Tap` on a
module, as an instance attribute, to observe or edit its activations, and deletes it again:

    x = tap("hook_resid_pre", x)     the hooks on that point run, each may return a replacement
    "hook_pattern" in tap            whether any hook is on a point (Attention computes the softmax
                                     explicitly only when its pattern or scores are hooked)
"""

from __future__ import annotations

from typing import Protocol

import torch


class Tap(Protocol):
    """The hooks on one module's points, keyed by the point's local name (e.g. "hook_z")."""

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor: ...

    def __contains__(self, name: str) -> bool: ...
