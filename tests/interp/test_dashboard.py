"""interp/dashboard.py: top-activating contexts (by hand and on a tiny model), and the HTML page holding them."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.interp.dashboard import (
    FeatureCard,
    feature_activations,
    feature_cards,
    render_dashboard,
    top_contexts,
    write_dashboard,
)
from lmforge.interp.hooks import run_with_cache
from lmforge.interp.sae import SAEConfig, SAEConfigError, SparseAutoencoder
from lmforge.model.transformer import Transformer

WORDS = ["<s>", "the", " cat", " sat", "<b>&", "\n", " on", " mat"]


def text(i: int) -> str:
    return WORDS[i % len(WORDS)]


def test_top_contexts_rank_windows_by_their_peak() -> None:
    acts = torch.zeros(5, 10)
    acts[0, 3] = 1.0
    acts[1, 7], acts[1, 2] = 4.0, 3.5  # one window, two high tokens: listed once, at its peak
    acts[3, 0] = 2.0
    acts[4, 9] = 2.0  # ties window 3: the earlier window comes first
    ids = torch.arange(50).view(5, 10)
    contexts = top_contexts(acts, ids, text, n_top=4, left=2, right=1)
    ranked = [(c.window, c.position, c.activation) for c in contexts]
    assert ranked == [(1, 7, 4.0), (3, 0, 2.0), (4, 9, 2.0), (0, 3, 1.0)]
    first = contexts[0]
    assert first.start == 5 and first.tokens == [text(15), text(16), text(17), text(18)]
    assert first.acts == [0.0, 0.0, 4.0, 0.0]
    assert contexts[1].start == 0 and len(contexts[1].tokens) == 2  # clipped at the window's start
    assert len(contexts[2].tokens) == 3  # and at its end
    assert len(top_contexts(acts, ids, text, n_top=10)) == 4  # window 2 never fires: not listed


class _Items(HTMLParser):
    """The <li> items of the page: their data attributes and their text."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[dict] = []
        self.sections: list[str] = []
        self.depth = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "li":
            self.items.append({**dict(attrs), "text": ""})
            self.depth = 1
        if tag == "section":
            self.sections.append(dict(attrs)["id"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "li":
            self.depth = 0

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.items[-1]["text"] += data


def test_page_holds_the_top_contexts_in_order_escaped(tmp_path: Path) -> None:
    acts = torch.zeros(4, 6, 2)
    acts[2, 4, 0], acts[0, 1, 0], acts[3, 5, 0] = 3.0, 2.0, 1.0
    acts[1, 2, 1] = 0.5
    ids = torch.arange(24).view(4, 6)
    cards = feature_cards(acts, ids, [11, 7], text, n_top=5, left=3, right=1)
    assert cards[0].frequency == pytest.approx(3 / 24) and cards[1].frequency == pytest.approx(1 / 24)
    page = write_dashboard(tmp_path / "d.html", cards, title="Test <page>").read_text()
    parser = _Items()
    parser.feed(page)
    assert parser.sections == ["feature-11", "feature-7"]
    assert [(int(i["data-window"]), int(i["data-position"])) for i in parser.items] == [(2, 4), (0, 1), (3, 5), (1, 2)]
    # each item: the activation, then the shown tokens' text (newlines drawn as ↵), unescaped by the parser
    expected = "3.000" + "".join(text(i) for i in range(13, 18)).replace("\n", "↵")
    assert parser.items[0]["text"] == expected
    assert "<b>&" not in page and "&lt;b&gt;&amp;" in page and "Test &lt;page&gt;" in page
    assert not re.search(r"<script|https?://|<link", page)  # self-contained
    peak = re.search(r'class="tok peak" style="background: rgba\(255, 140, 0, ([\d.]+)\)"', page)
    assert peak is not None and float(peak[1]) == 1.0  # the highest context's peak is fully highlighted


def test_a_latent_that_never_fires_says_so() -> None:
    page = render_dashboard([FeatureCard(3, 0.0, [])])
    assert "never fires" in page


def test_feature_activations_are_the_sae_on_the_cached_stream() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=16)
    model = Transformer(cfg).eval()
    sae = SparseAutoencoder(SAEConfig(16, 32, "topk", k=4, hook_name="blocks.1.hook_resid_post"))
    ids = torch.randint(0, 40, (5, 8), generator=torch.Generator().manual_seed(1))
    acts = feature_activations(model, sae, ids, [3, 0, 17], batch_size=2, progress=False)
    x = run_with_cache(model, ids, "blocks.1.hook_resid_post")["blocks.1.hook_resid_post"]
    expected = sae.encode(x)[..., [3, 0, 17]]
    expected[:, :1] = 0  # skip_first=1
    torch.testing.assert_close(acts, expected)
    with torch.no_grad():  # token 7's residual stream becomes massive: its activations are left out (zero)
        model.embed.weight[7] *= 1000
    ids[2, 5] = 7
    every = list(range(32))
    unfiltered = feature_activations(model, sae, ids, every, max_norm_ratio=None, progress=False)
    filtered = feature_activations(model, sae, ids, every, progress=False)
    assert (unfiltered[2, 5] != 0).sum() == 4 and (filtered[2, 5] == 0).all()
    filtered[2, 5] = unfiltered[2, 5]
    torch.testing.assert_close(filtered, unfiltered)
    with pytest.raises(SAEConfigError, match=r"features \[32\] are out of range"):
        feature_activations(model, sae, ids, [32])
