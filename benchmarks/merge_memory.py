"""Peak memory of merging three models, against the size of one: lmforge's streaming merge beside mergekit
(`run_merge`, when importable).

Three random Llama-shaped float32 checkpoints (`--hidden`, `--layers`, `--vocab`; the default is ~424 MB each) are
written once to `--work`; each row then runs a TIES merge of them in a fresh process that samples its own
resident memory every 2 ms:

    anon MB     peak private memory (RssAnon, less the imports' own): what the merge allocates. Memory-mapped
                inputs are file pages (RssFile: the kernel's cache, dropped under pressure) and not counted
    x model     that peak over one model's size: ~1 means "one model", 3 would be three models
    peak RSS    the process's VmHWM, file pages and imports included, for reference

lmforge streams every tensor straight into its shard file (the headers are planned up front), so the shard size
does not change its memory; it runs with the default 4 GiB shards and with `--shard-mb` shards to show it.

    python benchmarks/merge_memory.py [--hidden 1024 --layers 8 --vocab 8192] [--shard-mb 32] [--work DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
import torch, yaml, lmforge.merge
try:
    import mergekit.merge, mergekit.config, mergekit.options
except ImportError:
    pass
peak, start, done = [0], status("RssAnon"), threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
kind, config, out, shard = sys.argv[1], yaml.safe_load(open(sys.argv[2])), sys.argv[3], int(sys.argv[4])
if kind == "lmforge":
    lmforge.merge.merge(lmforge.merge.parse_config(config), out, shard_bytes=shard, progress=False)
else:
    options = mergekit.options.MergeOptions(cuda=False, copy_tokenizer=False, write_model_card=False, quiet=True)
    mergekit.merge.run_merge(mergekit.config.MergeConfiguration.model_validate(config), out, options)
done.set()
print(json.dumps({"anon": max(peak[0], status("RssAnon")) - start, "hwm": status("VmHWM")}))
"""


def make_models(work: Path, hidden: int, layers: int, vocab: int) -> int:
    """Write base / ft1 / ft2 (ft = base + noise) under `work`; returns one model's size in bytes."""
    import torch
    import transformers as T
    from safetensors.torch import save_file

    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                        architectures=["LlamaForCausalLM"])
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    kv, inter = cfg.num_key_value_heads * 64, cfg.intermediate_size
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter)}
    base = {k: torch.randn(s) * 0.02 for k, s in shapes.items()}
    for name, noise in (("base", 0.0), ("ft1", 0.002), ("ft2", 0.002)):
        (work / name).mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(work / name)
        save_file({k: v + noise * torch.randn_like(v) for k, v in base.items()}, work / name / "model.safetensors")
    return sum(v.numel() * 4 for v in base.values())


def run(kind: str, config: Path, out: Path, shard: int) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, kind, str(config), str(out), str(shard)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--shard-mb", type=int, default=32)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="merge-memory-"))
    size = make_models(work, args.hidden, args.layers, args.vocab)
    config = work / "ties.yml"
    models = [{"model": str(work / n), "parameters": {"weight": 0.5, "density": 0.5}} for n in ("ft1", "ft2")]
    config.write_text(json.dumps({"merge_method": "ties", "base_model": str(work / "base"), "models": models,
                                  "dtype": "float32"}))  # fmt: skip
    rows = [("lmforge (4 GiB shards)", "lmforge", 4 * 2**30), (f"lmforge ({args.shard_mb} MB shards)", "lmforge",
            args.shard_mb * 2**20)]  # fmt: skip
    if importlib.util.find_spec("mergekit"):
        rows.append(("mergekit run_merge", "mergekit", 0))
    print(f"3 models of {size / 2**20:.0f} MB (float32), TIES density 0.5; work dir {work}")
    print(f"{'':26s} {'anon MB':>9s} {'x model':>8s} {'peak RSS MB':>12s}")
    for label, kind, shard in rows:
        r = run(kind, config, work / f"out-{kind}-{shard}", shard)
        print(f"{label:26s} {r['anon'] / 2**20:9.0f} {r['anon'] / size:8.2f} {r['hwm'] / 2**20:12.0f}")


if __name__ == "__main__":
    main()
