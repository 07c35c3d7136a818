"""Hook points: read or edit any named activation of a `Transformer` during its forward pass.

A hook is a function of an activation and its point's name,

    hook(activation, name) -> replacement activation, or None to leave it as it is,

run when the forward reaches that point; what it returns flows on through the rest of the network. Caching a
point is the hook that stores `activation`; ablating head h of layer l is the hook on `blocks.{l}.attn.hook_z`
that zeroes `activation[:, :, h]`.

Names follow TransformerLens wherever the concept matches, so its recipes carry over (B batch, T positions,
H heads, Hkv key/value heads, D head size, d the model width, f the MLP width):

    hook_embed, hook_pos_embed               (B, T, d)   token embeddings; learned or sinusoidal positions
    blocks.{i}.hook_resid_pre                (B, T, d)   the residual stream into block i
    blocks.{i}.ln1.hook_normalized           (B, T, d)   its attention norm's x_hat, before the affine weights
    blocks.{i}.attn.hook_q                   (B, T, H, D)       hook_k, hook_v (B, T, Hkv, D)
    blocks.{i}.attn.hook_rot_q, hook_rot_k   q and k after RoPE (RoPE models)
    blocks.{i}.attn.hook_attn_scores         (B, H, T, Tk)  s q.k [+ bias], -inf where masked
    blocks.{i}.attn.hook_pattern             (B, H, T, Tk)  softmax of the scores
    blocks.{i}.attn.hook_z                   (B, T, H, D)   pattern @ v per head, before the output projection
    blocks.{i}.attn.hook_result              (B, T, H, d)   each head's output, z_h W_O,h (sum over h + b_O)
    blocks.{i}.ln1_post.hook_normalized      Gemma 2's post-attention norm
    blocks.{i}.hook_attn_out                 (B, T, d)   what attention adds to the residual stream
    blocks.{i}.hook_resid_mid                (B, T, d)   resid_pre + attn_out
    blocks.{i}.ln2.hook_normalized           (B, T, d)
    blocks.{i}.mlp.hook_pre, hook_pre_linear (B, T, f)   pre-activation (the gate's, when gated); gated: W_up x
    blocks.{i}.mlp.hook_post                 (B, T, f)   the hidden layer W_down reads
    blocks.{i}.ln2_post.hook_normalized      Gemma 2's post-MLP norm
    blocks.{i}.hook_mlp_out                  (B, T, d)
    blocks.{i}.hook_resid_post               (B, T, d)   resid_mid + mlp_out, block i's output
    ln_final.hook_normalized                 (B, T, d)   the final norm's x_hat

A mixture-of-experts layer has only the block's points (hook_mlp_out), MLA only the block's and the norms'.
The model pays nothing while no hook is installed (model/hookpoints.py): `hooks` installs a tap on each module
that has a hooked point and removes it on exit; a hook on the scores or pattern makes that one layer compute its
softmax explicitly instead of through SDPA.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.model.attention import Attention
from lmforge.model.mlp import MLP
from lmforge.model.norm import LayerNorm, RMSNorm
from lmforge.model.transformer import Transformer
from lmforge.utils.errors import LmforgeError

Hook = Callable[[torch.Tensor, str], torch.Tensor | None]
NameFilter = str | Sequence[str] | Callable[[str], bool] | None


class HookError(LmforgeError):
    """A hook point name or filter matches nothing, or a hook returned the wrong kind of tensor."""


@dataclass(frozen=True)
class HookPoint:
    """Where a named point lives: the module whose forward taps it, under its local name."""

    module: nn.Module
    local: str


def hook_points(model: Transformer) -> dict[str, HookPoint]:
    """Every hook point of `model`, by full name, in the order a forward pass reaches them."""
    if not isinstance(model, Transformer):
        raise HookError(f"hook points need a lmforge Transformer, got {type(model).__name__}")
    points: dict[str, HookPoint] = {}

    def add(module: nn.Module | None, prefix: str, *locals_: str) -> None:
        if module is not None:
            points.update({prefix + local: HookPoint(module, local) for local in locals_})

    add(model, "", "hook_embed")
    if model.config.position in ("learned", "sinusoidal"):
        add(model, "", "hook_pos_embed")
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        add(block, p, "hook_resid_pre")
        add(_norm(block.attn_norm), p + "ln1.", "hook_normalized")
        if isinstance(block.attn, Attention):
            rope = ("hook_rot_q", "hook_rot_k") if model.config.position == "rope" else ()
            add(block.attn, p + "attn.", "hook_q", "hook_k", "hook_v", *rope, "hook_attn_scores", "hook_pattern",
                "hook_z", "hook_result")  # fmt: skip
        add(_norm(block.post_attn_norm), p + "ln1_post.", "hook_normalized")
        add(block, p, "hook_attn_out", "hook_resid_mid")
        add(_norm(block.mlp_norm), p + "ln2.", "hook_normalized")
        if isinstance(block.mlp, MLP):
            gated = ("hook_pre_linear",) if block.mlp.gate_proj is not None else ()
            add(block.mlp, p + "mlp.", "hook_pre", *gated, "hook_post")
        add(_norm(block.post_mlp_norm), p + "ln2_post.", "hook_normalized")
        add(block, p, "hook_mlp_out", "hook_resid_post")
    add(_norm(model.norm), "ln_final.", "hook_normalized")
    return points


def _norm(module: nn.Module | None) -> nn.Module | None:
    return module if isinstance(module, RMSNorm | LayerNorm) else None


def hook_names(model: Transformer) -> list[str]:
    """The names of `model`'s hook points, in forward order."""
    return list(hook_points(model))


def select_names(model: Transformer, names: NameFilter) -> list[str]:
    """The hook point names `names` picks, in forward order: None (all), one name, a list of names, or a
    predicate on the name. An unknown name, or a filter that matches nothing, is a `HookError`."""
    known = hook_names(model)
    if names is None:
        return known
    if callable(names):
        picked = [n for n in known if names(n)]
        if not picked:
            raise HookError(f"no hook point of this model matches the filter {names!r}")
        return picked
    wanted = [names] if isinstance(names, str) else list(names)
    for name in wanted:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; lmforge.interp.hook_names(model) lists them"
            raise HookError(f"unknown hook point {name!r}{hint}")
    return [n for n in known if n in wanted]


class _Tap:
    """A module's `tap` (model/hookpoints.py): the hooks on its points, run in the order they were added."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.hooks: dict[str, list[Hook]] = {}

    def __contains__(self, local: str) -> bool:
        return local in self.hooks

    def __call__(self, local: str, x: torch.Tensor) -> torch.Tensor:
        for fn in self.hooks.get(local, ()):
            out = fn(x, self.prefix + local)
            if out is not None:
                if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise HookError(f"hook {getattr(fn, '__name__', fn)!r} on {self.prefix + local} returned "
                                    f"{got}; the activation is a tensor of shape {tuple(x.shape)}")  # fmt: skip
                x = out
        return x


@dataclass
class HookHandle:
    """One installed hook; `remove()` takes it off (and the module's tap with its last hook)."""

    point: HookPoint
    fn: Hook

    def remove(self) -> None:
        module, local = self.point.module, self.point.local
        tap = module.__dict__.get("tap")
        if tap is None or self.fn not in tap.hooks.get(local, []):
            return
        tap.hooks[local].remove(self.fn)
        if not tap.hooks[local]:
            del tap.hooks[local]
        if not tap.hooks:
            del module.tap  # the class default, None, shows again: the plain forward


def add_hook(model: Transformer, name: NameFilter, fn: Hook) -> list[HookHandle]:
    """Install `fn` on every point `name` selects (see `select_names`) until the handles are removed."""
    points = hook_points(model)
    handles = []
    for full in select_names(model, name):
        point = points[full]
        tap = point.module.__dict__.get("tap")
        if tap is None:
            tap = _Tap(full.removesuffix(point.local))
            point.module.tap = tap
        tap.hooks.setdefault(point.local, []).append(fn)
        handles.append(HookHandle(point, fn))
    return handles


def remove_hooks(model: Transformer) -> None:
    """Take every hook off `model`."""
    for module in model.modules():
        if "tap" in module.__dict__:
            del module.tap


@contextmanager
def hooks(model: Transformer, fwd_hooks: Sequence[tuple[NameFilter, Hook]]) -> Iterator[Transformer]:
    """Run `model` with `fwd_hooks` [(name or filter, hook), ...] installed; they come off on exit, even after an
    error (hooks installed before stay)."""
    handles: list[HookHandle] = []
    try:
        for name, fn in fwd_hooks:
            handles += add_hook(model, name, fn)
        yield model
    finally:
        for handle in reversed(handles):
            handle.remove()


def run_with_hooks(
    model: Transformer, input_ids: torch.Tensor, fwd_hooks: Sequence[tuple[NameFilter, Hook]], **forward_kwargs
) -> torch.Tensor:
    """The logits of `model(input_ids, **forward_kwargs)` with `fwd_hooks` installed for this one call."""
    with hooks(model, fwd_hooks):
        return model(input_ids, **forward_kwargs)


class _Done(Exception):
    """Every requested activation is cached: the rest of the forward is not needed."""


def run_with_cache(
    model: Transformer,
    input_ids: torch.Tensor,
    names_filter: NameFilter = None,
    *,
    fwd_hooks: Sequence[tuple[NameFilter, Hook]] = (),
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    detach: bool = True,
) -> dict[str, torch.Tensor]:
    """The activations at the points `names_filter` selects (see `select_names`; None: all), name -> tensor in
    forward order, from one forward pass over `input_ids` (B, T).

    `fwd_hooks` run first on their points (the cache holds what they returned). The forward stops as soon as the
    last requested point is reached (caching layer 3 of 30 runs 4 blocks). With `detach` (the default) it runs
    without autograd and the tensors are detached; `detach=False` keeps them in the graph."""
    names = select_names(model, names_filter)
    cache: dict[str, torch.Tensor] = {}

    def save(x: torch.Tensor, name: str) -> None:
        cache[name] = x.detach() if detach else x
        if len(cache) == len(names):
            raise _Done

    grad = torch.is_grad_enabled() and not detach
    with torch.set_grad_enabled(grad), hooks(model, [*fwd_hooks, (names, save)]), suppress(_Done):
        model.hidden_states(input_ids, attention_mask, position_ids)
    return {name: cache[name] for name in names}
