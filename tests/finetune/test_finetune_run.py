"""`lmforge finetune` (finetune/run.py, cli/finetune.py) on a tiny model with a ChatML tokenizer.

Oracles: the loss goes down on a task the model cannot do before (answering with a fixed colour per name); an
interrupted run resumed from its checkpoint ends with the same adapter bit for bit as one run straight; the
written adapter, merged directory and GGUF give the adapted model's logits; checkpoints of adapter runs hold
the adapter alone; bad data and changed settings end with one error line naming the file:line or the setting.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lmforge
from lmforge.cli import app
from lmforge.config import ModelConfig
from lmforge.finetune.lora import merge_and_unload
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_bpe

runner = CliRunner()
NAMES = ["Ada", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal"]
COLOURS = ["red", "blue", "green", "gold"]


def conversations(names: list[str]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What colour does {n} like?"},
                          {"role": "assistant", "content": f"{n} likes {COLOURS[i % 4]}."}]}
            for i, n in enumerate(names)]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    text = " ".join(json.dumps(c) for c in conversations(NAMES)) * 20
    tok = train_bpe(texts=[text], vocab_size=320, special_tokens=["<|im_start|>", "<|im_end|>"], progress=False)
    tok.eos_token = "<|im_end|>"
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                                    max_seq_len=128))  # fmt: skip
    lmforge.save(model, root / "base", tokenizer=tok)
    for name, rows in (("train.jsonl", conversations(NAMES) * 4), ("val.jsonl", conversations(NAMES[:4]))):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def args(setup, out, *extra: str) -> list[str]:
    return ["finetune", str(setup / "base"), "--data", str(setup / "train.jsonl"), "--val", str(setup / "val.jsonl"),
            "--out", str(out), "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--alpha", "32",
            "--eval-every", "4", "--dropout", "0", *extra]  # fmt: skip


def val_losses(out) -> list[float]:
    return [json.loads(line)["val_loss"] for line in (out / "log.jsonl").read_text().splitlines()
            if "val_loss" in line]  # fmt: skip


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_an_adapter_run_learns_and_writes_peft_files_the_loaders_apply(setup, tmp_path, method):
    out = tmp_path / "run"
    result = runner.invoke(app, args(setup, out, "--method", method, "--max-steps", "12", "--merge", "--gguf"))
    assert result.exit_code == 0, result.output
    losses = val_losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.1, losses  # LoRA on a random base: slow, but steady
    assert "32 examples" in result.stderr and "trainable parameters" in result.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] == (method == "dora") and config["base_model_name_or_path"] == str(setup / "base")
    adapted, tok = lmforge.load(setup / "base", adapter=out)
    ids = torch.tensor([tok.apply_chat_template(conversations(["Ada"])[0]["messages"])])
    with torch.no_grad():
        want = adapted(ids)
        assert (want - lmforge.load(setup / "base")[0](ids)).abs().max() > 0.1
        torch.testing.assert_close(lmforge.load(out / "merged")[0](ids), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(lmforge.load(out / "model.gguf")[0](ids), want, rtol=0, atol=0.05)  # F16
        torch.testing.assert_close(merge_and_unload(adapted)(ids), want, rtol=0, atol=1e-5)
    [checkpoint] = (out / "checkpoints").iterdir()
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["partial"] and all(".adapters.default." in k for k in saved["model"])
    assert set(load_file(out / "adapter_model.safetensors")) == {
        f"base_model.model.model.layers.{i}.{m}.{t}" for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        for t in ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if method == "dora" else ())
    }  # fmt: skip


def test_a_resumed_run_ends_with_the_same_adapter_bit_for_bit(setup, tmp_path):
    extra = ("--max-steps", "8", "--target", "blocks.*.attn.*_proj")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert runner.invoke(app, args(setup, straight, *extra)).exit_code == 0
    first = runner.invoke(app, [*args(setup, interrupted, *extra), "--checkpoint-every", "4"])
    assert first.exit_code == 0, first.output
    (interrupted / "checkpoints" / "step_00000008.pt").unlink()  # as if killed after step 4's checkpoint
    again = runner.invoke(app, [*args(setup, interrupted, *extra), "--checkpoint-every", "4"])
    assert again.exit_code == 0, again.output
    a, b = (load_file(d / "adapter_model.safetensors") for d in (straight, interrupted))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = runner.invoke(app, [*args(setup, interrupted, *extra), "--rank", "4"])
    assert changed.exit_code == 1 and "other settings (rank: 8, now 4)" in changed.output


def test_full_fine_tuning_writes_a_model(setup, tmp_path):
    out = tmp_path / "full"
    result = runner.invoke(app, args(setup, out, "--method", "full", "--max-steps", "8"))
    assert result.exit_code == 0, result.output
    losses = val_losses(out)
    assert losses[-1] < losses[0] - 0.5, losses
    _, tok = lmforge.load(out / "hf")
    assert tok is not None and not (out / "adapter_config.json").exists()


def test_bad_data_names_the_file_and_line_or_is_skipped_and_counted(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [json.dumps(r) for r in conversations(NAMES)]
    rows.insert(2, json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    bad.write_text("\n".join(rows) + "\n")
    base = ["finetune", str(setup / "base"), "--data", str(bad), "--out", str(tmp_path / "out"), "--max-steps", "1",
            "--seq-len", "64", "--batch-size", "2"]  # fmt: skip
    result = runner.invoke(app, base)
    assert result.exit_code == 1 and f"{bad}:3:" in result.output and "assistant" in result.output
    skipped = runner.invoke(app, [*base, "--skip-invalid"])
    assert skipped.exit_code == 0, skipped.output
    assert "8 examples, 1 skipped" in skipped.stderr
    wrong = runner.invoke(app, [*base, "--method", "qlora-ish"])
    assert wrong.exit_code == 1 and "method" in wrong.output


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_and_prefix_tuning_learn_and_write_peft_files_generate_applies(setup, tmp_path, method):
    from lmforge.finetune.prompt_tuning import find_tuning, generate_tuned
    from lmforge.infer.sampling import SamplingParams

    out = tmp_path / method
    extra = ("--method", method, "--num-virtual-tokens", "8", "--max-steps", "12", "--lr", "1.0")
    result = runner.invoke(app, args(setup, out, *extra))  # (a later --lr wins)
    assert result.exit_code == 0, result.output
    losses = val_losses(out)  # a random model is hard to steer by virtual tokens alone: a small but steady gain
    assert len(losses) == 3 and losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.001, losses
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == f"{method.upper()}_TUNING" and config["num_virtual_tokens"] == 8
    tuned, tok = lmforge.load(setup / "base", adapter=out)
    assert find_tuning(tuned).n_virtual == 8
    want = "".join(e.text for e in generate_tuned(tuned, tok, "What colour", SamplingParams(temperature=0,
                                                                                           max_tokens=6)))  # fmt: skip
    gen = runner.invoke(app, ["generate", str(setup / "base"), "--adapter", str(out), "--prompt", "What colour",
                              "--max-tokens", "6"])  # fmt: skip
    assert gen.exit_code == 0 and gen.stdout.startswith(want), gen.output
    merged = runner.invoke(app, [*args(setup, tmp_path / "m"), *extra, "--merge"])
    assert merged.exit_code == 1 and "not weights to merge" in merged.output
