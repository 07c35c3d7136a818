"""Tokenizer speed: lmforge vs `tokenizers` (training) and vs tiktoken / `tokenizers` (encoding).

One run, side by side, on the whole Shakespeare corpus (about 5 MB), all three with the same
vocabulary (the one lmforge trains, exported to each tool). Prints times, MB/s and ratios.

    python benchmarks/tokenizer.py [--data DIR] [--vocab-size 8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"
EOT = "<|endoftext|>"


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def train_tokenizers(files: list[Path], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train([str(f) for f in files], trainer)
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="directory of .txt files")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    args = parser.parse_args()

    import tiktoken
    import tokenizers

    from lmforge.tokenizer import train_bpe
    from lmforge.tokenizer.formats import save_tokenizer

    files = sorted(args.data.glob("*.txt"))
    docs = [f.read_text() for f in files]
    text = "".join(docs)
    mb = len(text.encode()) / 1e6
    cores = os.cpu_count() or 1
    print(f"corpus: {len(files)} files, {mb:.2f} MB; vocab {args.vocab_size}; {cores} cores")
    print(f"tiktoken {tiktoken.__version__}, tokenizers {tokenizers.__version__}\n")

    def ours_train():
        return train_bpe(files=files, vocab_size=args.vocab_size, special_tokens=[EOT], progress=False)

    t_ours, tok = timed(ours_train, 1)
    t_hf, _ = timed(lambda: train_tokenizers(files, args.vocab_size), 1)

    ranks = {tok.vocab[i]: i for i in tok.vocab}
    enc = tiktoken.Encoding("lmforge", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens=tok.special_tokens)
    with tempfile.TemporaryDirectory() as d:
        save_tokenizer(tok, d)
        hf = tokenizers.Tokenizer.from_file(str(Path(d) / "tokenizer.json"))
    want = enc.encode_ordinary(text)
    assert tok.encode_ordinary(text) == want, "lmforge and tiktoken disagree"
    assert hf.encode(text, add_special_tokens=False).ids == want, "tokenizers and tiktoken disagree"

    rows = []
    cold, _ = timed(lambda: type(tok)(tok.vocab, tok.merges, tok.pattern, tok.special_tokens).encode_ordinary(text), 1)
    single = {
        "lmforge (cold cache)": cold,
        "lmforge": timed(lambda: tok.encode_ordinary(text), args.repeats)[0],
        "tiktoken": timed(lambda: enc.encode_ordinary(text), args.repeats)[0],
        "tokenizers": timed(lambda: hf.encode(text, add_special_tokens=False), args.repeats)[0],
    }
    parallel = {
        "lmforge": timed(lambda: tok.encode_batch(docs), args.repeats)[0],
        "tiktoken": timed(lambda: enc.encode_ordinary_batch(docs, num_threads=cores), args.repeats)[0],
        "tokenizers": timed(lambda: hf.encode_batch(docs, add_special_tokens=False), args.repeats)[0],
    }
    print(f"{'task':50} {'lmforge':>9} {'reference':>10} {'ratio':>7}")
    print("-" * 80)
    rows.append((f"train vocab {args.vocab_size} (s) vs tokenizers", t_ours, t_hf, t_hf / t_ours))
    for name, times in (("1 thread", single), (f"{cores} processes", parallel)):
        for ref in ("tiktoken", "tokenizers"):
            for ours in [k for k in times if k.startswith("lmforge")]:
                cache = "cold cache" if "cold" in ours else "warm cache" if name == "1 thread" else "forked"
                label = f"encode MB/s, {name}, {cache} vs {ref}"
                rows.append((label, mb / times[ours], mb / times[ref], times[ref] / times[ours]))
    for label, a, b, ratio in rows:
        print(f"{label:50} {a:9.2f} {b:10.2f} {ratio:6.2f}x")
    print("\nratio > 1 means lmforge is faster. Targets: training >= 0.33x, single-thread encode >= 0.3x tiktoken.")


if __name__ == "__main__":
    main()
