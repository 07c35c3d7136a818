"""BitNet b1.58 against full precision: the same small model trained twice from scratch on the speedrun's corpus,
once with float linear layers and once with BitLinear layers (quant/bitnet.py: ternary absmean weights, int8
per-token activations, straight-through gradients), with validation bits per byte of both at the same steps.

The data is the speedrun's (train/speedrun.py): `--stories` stories of the grammar of data/stories.py (whose exact
entropy in bits per byte, the floor, is printed), a byte-level BPE of the preset's vocabulary trained on them, and
token shards. The model and hyper-parameters are the speedrun's "cpu" preset (d 192, 4 layers, 6 heads / 2 kv
heads, d_ff 512, seq 128, batch 16, AdamW lr 3e-3, wd 0.1, betas 0.9/0.95) unless flags change them, trained
step-driven (cosine, 5% warmup) with the shared Trainer (`train.run.build_trainer`): both runs start from the
same initial weights (train.seed), see the same batches and evaluate on the same validation windows. The BitNet
run sets `[quant] method = "bitnet"`, which swaps every linear layer under blocks.* (not the embedding or the LM
head, as in the paper) before training (train/run.py).

    python benchmarks/bitnet.py [--steps 200] [--eval-every 50] [--stories 5000] [--d-model 192] [--layers 4]
                                [--heads 6] [--kv-heads 2] [--d-ff 512] [--lr 3e-3] [--bitnet-lr LR] [--out DIR]

Output: a table of validation bits/byte per evaluated step for both runs and their ratio (ternary / float), the
entropy floor, the training time of each run, and the parameters held ternary. At these sizes the ternary model
is expected to trail the float one (the paper matches full precision from ~3B parameters); the ratio says by how
much at equal steps. Timings are only indicative (PLATFORM.md: other jobs on the machine slow them).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lmforge import Transformer
from lmforge.data.shards import text_files, write_shards
from lmforge.data.stories import write_corpus
from lmforge.quant.bitnet import BitLinear
from lmforge.tokenizer import train_bpe
from lmforge.train.config import from_dict
from lmforge.train.run import build_trainer
from lmforge.train.speedrun import PRESETS, SPECIAL_TOKENS

CPU = PRESETS["cpu"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each run (default 200)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validations (default 50)")
    p.add_argument("--eval-steps", type=int, default=8, help="validation batches per evaluation (default 8)")
    p.add_argument("--stories", type=int, default=5000, help="stories in the corpus (default 5000)")
    p.add_argument("--vocab", type=int, default=CPU["vocab"], help=f"BPE vocabulary (default {CPU['vocab']})")
    p.add_argument("--d-model", type=int, default=CPU["model"]["d_model"])
    p.add_argument("--layers", type=int, default=CPU["model"]["n_layers"])
    p.add_argument("--heads", type=int, default=CPU["model"]["n_heads"])
    p.add_argument("--kv-heads", type=int, default=CPU["model"]["n_kv_heads"])
    p.add_argument("--d-ff", type=int, default=CPU["model"]["d_ff"])
    p.add_argument("--seq-len", type=int, default=CPU["seq_len"])
    p.add_argument("--batch-size", type=int, default=CPU["batch_size"])
    p.add_argument("--lr", type=float, default=CPU["lr"], help=f"peak learning rate (default {CPU['lr']})")
    p.add_argument("--bitnet-lr", type=float, default=None, help="the BitNet run's peak rate (default: --lr)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, default=None, help="working directory (default: a temporary one)")
    return p.parse_args()


def prepare_data(out: Path, n_stories: int, vocab: int):
    """The speedrun's corpus, tokenizer and shards under `out`: (tokenizer, model vocab size, entropy floor)."""
    stats = write_corpus(out / "corpus", n_stories, seed=0)
    files = text_files([out / "corpus"])
    tok = train_bpe(files=files, vocab_size=vocab, special_tokens=SPECIAL_TOKENS, progress=False)
    tok.eos_token, tok.eot_token = "<|endoftext|>", "<|im_end|>"
    write_shards(tok, files, out / "shards", progress=False)
    return tok, 64 * -(-tok.vocab_size // 64), stats["bits_per_byte"]


def config(args: argparse.Namespace, out: Path, vocab: int, lr: float, ternary: bool):
    model = {"d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads, "n_kv_heads": args.kv_heads,
             "d_ff": args.d_ff}  # fmt: skip
    return from_dict({
        "model": {"preset": "tiny", "vocab_size": vocab, "max_seq_len": args.seq_len, **model},
        "data": {"shards": str(out.parent / "shards"), "seq_len": args.seq_len, "batch_size": args.batch_size,
                 "val_fraction": 0.05},
        "optim": {"name": "adamw", "lr": lr, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "schedule": {"kind": "cosine", "total_steps": args.steps, "warmup_steps": max(1, args.steps // 20),
                     "min_lr_ratio": 0.1},
        "train": {"max_steps": args.steps, "eval_every": args.eval_every, "eval_steps": args.eval_steps,
                  "log_every": 10, "checkpoint_every": 0, "keep_last": 1, "out_dir": str(out), "seed": args.seed},
        "quant": {"method": "bitnet" if ternary else "none"},
    })  # fmt: skip


def train(args: argparse.Namespace, out: Path, tok, vocab: int, ternary: bool) -> tuple[dict[int, float], float, int]:
    """One run: ({step: validation bits/byte}, training seconds, parameters held ternary)."""
    lr = args.bitnet_lr if ternary and args.bitnet_lr is not None else args.lr
    cfg = config(args, out, vocab, lr, ternary)
    trainer = build_trainer(cfg, tok, progress=False)  # train.seed: the same initial weights for both runs
    n_ternary = sum(m.weight.numel() for m in trainer.model.modules() if isinstance(m, BitLinear))
    start = time.perf_counter()
    trainer.fit(resume=False)
    seconds = time.perf_counter() - start
    return {r["step"]: r["val_bpb"] for r in trainer.history if "val_bpb" in r}, seconds, n_ternary


def main() -> None:
    args = parse()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        t = time.perf_counter()
        tok, vocab, floor = prepare_data(root, args.stories, args.vocab)
        print(f"data: {args.stories} stories, BPE vocab {tok.vocab_size}, {time.perf_counter() - t:.1f} s; "
              f"entropy floor {floor:.4f} bits/byte")  # fmt: skip
        fp, fp_s, _ = train(args, root / "fp", tok, vocab, ternary=False)
        tern, tern_s, n_ternary = train(args, root / "bitnet", tok, vocab, ternary=True)
    n_params = sum(p.numel() for p in Transformer(config(args, root / "fp", vocab, args.lr, False).model).parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {n_ternary / 1e6:.2f}M of them ternary in the BitNet run "
          f"({n_ternary / n_params:.0%}; the rest: embedding, LM head, norms)")  # fmt: skip
    print(f"steps {args.steps}, batch {args.batch_size} x {args.seq_len}, lr {args.lr}"
          + (f" (BitNet {args.bitnet_lr})" if args.bitnet_lr is not None else ""))  # fmt: skip
    print(f"\n{'step':>6}  {'fp32 bpb':>9}  {'b1.58 bpb':>9}  {'ratio':>6}")
    for step in sorted(fp.keys() & tern.keys()):
        print(f"{step:>6}  {fp[step]:9.4f}  {tern[step]:9.4f}  {tern[step] / fp[step]:6.3f}")
    last = max(fp.keys() & tern.keys())
    print(f"\nfinal (step {last}): fp32 {fp[last]:.4f}, BitNet b1.58 {tern[last]:.4f} bits/byte, ratio "
          f"{tern[last] / fp[last]:.3f}; above the floor {floor:.4f}: fp32 +{fp[last] - floor:.4f}, "
          f"BitNet +{tern[last] - floor:.4f}")  # fmt: skip
    print(f"training time: fp32 {fp_s:.0f} s, BitNet {tern_s:.0f} s ({tern_s / fp_s:.2f}x)")


if __name__ == "__main__":
    main()
