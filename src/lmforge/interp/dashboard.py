"""A feature dashboard: the contexts that activate chosen SAE latents most, as one static HTML page.

For latent i over N token windows of T tokens, with a[n, t] = f_i(x[n, t]) its activation on token t of window n
(x the model's activation at the SAE's hook point):

    score(n)      = max_t a[n, t],    t*(n) = argmax_t a[n, t]   (the first one on ties)
    top contexts  = the n_top windows of highest score (ties: the earlier window), each shown as its tokens
                    t*−left .. t*+right with every token's background opacity a[n, t] / max_n score(n)
    frequency     = #{(n, t) : a[n, t] > 0} / (N · T)            the share of tokens on which the latent fires

One context per window, so a latent that fires on a repeated phrase does not fill the list with one passage. The
first `skip_first` positions of each window, and tokens whose activation norm exceeds `max_norm_ratio` × the
median, are left out (zero): the SAE was trained without them (interp/sae_train.py). The page is self-contained
(inline CSS, no scripts or external assets); every token's text goes through `html.escape`, and it is written
atomically.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lmforge.interp.sae import SAEConfigError, SparseAutoencoder
from lmforge.interp.sae_train import model_activations, typical_rows
from lmforge.model.transformer import Transformer
from lmforge.utils.atomic import atomic_write


@dataclass(frozen=True)
class Context:
    """One top-activating window of a latent: where it peaks, and the tokens shown around the peak."""

    window: int
    position: int  # t*, within the window
    activation: float  # score: the peak activation
    start: int  # the first shown token's position
    tokens: list[str]
    acts: list[float]


@dataclass(frozen=True)
class FeatureCard:
    feature: int
    frequency: float
    contexts: list[Context]


@torch.no_grad()
def feature_activations(
    model: Transformer,
    sae: SparseAutoencoder,
    ids: Tensor,
    features: Sequence[int],
    *,
    batch_size: int = 8,
    skip_first: int = 1,
    max_norm_ratio: float | None = 10.0,
    progress: bool = True,
) -> Tensor:
    """a[n, t, j] = f_{features[j]} at token t of window n of `ids` (N, T), at the SAE's hook point: (N, T, F);
    0 where the SAE was not trained (module docstring)."""
    if sae.cfg.hook_name is None:
        raise SAEConfigError("the SAE has no hook_name: which activations it reads is unknown")
    bad = [f for f in features if not 0 <= f < sae.cfg.d_sae]
    if bad:
        raise SAEConfigError(f"features {bad} are out of range for d_sae={sae.cfg.d_sae}")
    activations = model_activations(model, sae.cfg.hook_name, skip_first=0, max_norm_ratio=None)
    index = torch.tensor(list(features), dtype=torch.long)
    out = []
    for chunk in tqdm(ids.split(batch_size), desc="feature activations", disable=not progress):
        x = activations(chunk).view(*chunk.shape, -1)
        keep = typical_rows(x, max_norm_ratio)
        keep[:, :skip_first] = False
        out.append(sae.encode(x)[..., index] * keep[..., None])
    return torch.cat(out)


def top_contexts(
    acts: Tensor, ids: Tensor, token_text: Callable[[int], str], n_top: int = 10, left: int = 12, right: int = 4
) -> list[Context]:
    """The `n_top` windows where activations `acts` (N, T) of one latent peak highest (module docstring); `ids`
    (N, T) are the windows' tokens, `token_text(id)` a token's text. Windows where it never fires are left out."""
    if acts.shape != ids.shape:
        raise SAEConfigError(f"acts {tuple(acts.shape)} and ids {tuple(ids.shape)} must have the same shape")
    scores, peaks = acts.max(dim=1).values, acts.argmax(dim=1)  # argmax: the first peak on ties
    order = torch.sort(scores, descending=True, stable=True).indices  # stable: ties keep the earlier window first
    contexts = []
    for n in order[:n_top].tolist():
        if scores[n] <= 0:
            break
        t = int(peaks[n])
        lo, hi = max(0, t - left), min(ids.shape[1], t + right + 1)
        tokens = [token_text(int(i)) for i in ids[n, lo:hi]]
        contexts.append(Context(n, t, scores[n].item(), lo, tokens, acts[n, lo:hi].tolist()))
    return contexts


def feature_cards(
    acts: Tensor, ids: Tensor, features: Sequence[int], token_text: Callable[[int], str], **kwargs: int
) -> list[FeatureCard]:
    """A card per latent from `feature_activations`' (N, T, F) output; `kwargs` go to `top_contexts`."""
    return [
        FeatureCard(f, (acts[..., j] > 0).float().mean().item(), top_contexts(acts[..., j], ids, token_text, **kwargs))
        for j, f in enumerate(features)
    ]


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
section { border-top: 1px solid #ccc; padding: 0.5em 0 1em; }
ol { padding-left: 2.5em; }
li { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 0.25em 0; }
.tok { border-radius: 2px; }
.peak { outline: 1px solid #c60; }
.act { color: #777; font-family: system-ui, sans-serif; font-size: 0.85em; margin-right: 0.75em; }
"""


def _token_html(text: str, act: float, top: float, peak: bool) -> str:
    alpha = max(0.0, act) / top if top > 0 else 0.0
    shown = html.escape(text.replace("\n", "↵"))
    cls = "tok peak" if peak else "tok"
    return (f'<span class="{cls}" style="background: rgba(255, 140, 0, {alpha:.3f})" '
            f'title="{act:.3f}">{shown}</span>')  # fmt: skip


def render_dashboard(cards: Sequence[FeatureCard], title: str = "SAE features", note: str = "") -> str:
    """One self-contained HTML page for `cards` (module docstring); `note` is a line of text under the title."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]  # fmt: skip
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")
    for card in cards:
        top = max((c.activation for c in card.contexts), default=0.0)
        parts.append(f'<section id="feature-{card.feature}"><h2>Feature {card.feature}</h2>')
        parts.append(f"<p>fires on {100 * card.frequency:.3g}% of tokens; max activation {top:.3g}</p><ol>")
        for c in card.contexts:
            spans = "".join(_token_html(text, a, top, c.start + k == c.position)
                            for k, (text, a) in enumerate(zip(c.tokens, c.acts, strict=True)))  # fmt: skip
            parts.append(f'<li data-window="{c.window}" data-position="{c.position}">'
                         f'<span class="act">{c.activation:.3f}</span>{spans}</li>')  # fmt: skip
        parts.append("</ol></section>" if card.contexts else "</ol><p>(never fires on these windows)</p></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_dashboard(
    path: str | Path, cards: Sequence[FeatureCard], title: str = "SAE features", note: str = ""
) -> Path:
    """Write `render_dashboard(cards, title, note)` to `path` atomically; returns the path."""
    atomic_write(path, render_dashboard(cards, title, note))
    return Path(path)
