"""`lmforge generate` and `lmforge chat` on a tiny model directory with a tokenizer."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import lmforge
from lmforge.cli import app
from lmforge.infer.generate import generate_text
from lmforge.infer.sampling import SamplingParams

runner = CliRunner()


def test_generate_streams_text_and_reports_speed(model_dir):
    result = runner.invoke(app, ["generate", str(model_dir), "--prompt", "To be", "--max-tokens", "12"])
    assert result.exit_code == 0, result.output
    model, tok = lmforge.load(model_dir)
    want = generate_text(model, tok, "To be", SamplingParams(temperature=0, max_tokens=12))
    assert result.stdout.startswith(want)
    assert "tok/s decode" in result.stderr and "tok/s prefill" in result.stderr


@pytest.mark.slow
def test_generate_with_compile_prints_the_same_text(model_dir):
    args = ["generate", str(model_dir), "--prompt", "To be", "--max-tokens", "12"]
    plain, fast = runner.invoke(app, args), runner.invoke(app, [*args, "--compile"])
    assert fast.exit_code == 0, fast.output
    assert fast.stdout == plain.stdout and "tok/s decode" in fast.stderr
    assert "--compile: the first step compiles the decoder" in fast.stderr
    assert "(compilation, not in the rate)" in fast.stderr and "compil" not in plain.stderr


def test_chat_keeps_history_and_resets(model_dir):
    script = "hello\n/reset\nhi there\n/exit\n"
    args = ["chat", str(model_dir), "--max-tokens", "5", "--temperature", "0"]
    result = runner.invoke(app, args, input=script)
    assert result.exit_code == 0, result.output
    assert "conversation reset" in result.stderr
    prompts = result.stdout.split("> ")
    assert len(prompts) == 5  # before hello, after hello, after /reset, after "hi there", after /exit
    fresh = runner.invoke(app, args, input="hi there\n/exit\n")
    assert prompts[3] == fresh.stdout.split("> ")[1]  # after /reset the model sees only the new turn
    kept = runner.invoke(app, args, input="hello\nhi there\n/exit\n")
    assert kept.stdout.split("> ")[1] == prompts[1]


def test_errors_are_clear(tmp_path, model_dir):
    result = runner.invoke(app, ["generate", str(tmp_path / "none"), "--prompt", "x"])
    assert result.exit_code == 1 and "no such file" in " ".join(result.stderr.split())
    result = runner.invoke(app, ["generate", str(model_dir), "--prompt", "x", "--top-p", "2"])
    assert result.exit_code == 1 and result.stderr.startswith("error: --top-p=2.0: must be in [0, 1]")


def test_generate_with_an_adapter_prints_the_adapted_models_text(model_dir, tmp_path):
    from lmforge.finetune.adapter_files import save_adapter
    from lmforge.finetune.lora import LoraConfig, add_adapter

    model, tok = lmforge.load(model_dir)
    add_adapter(model, LoraConfig(r=4, alpha=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    save_adapter(model, tmp_path / "adapter")
    params = SamplingParams(temperature=0, max_tokens=12)
    want = generate_text(model, tok, "To be", params)
    assert want != generate_text(lmforge.load(model_dir)[0], tok, "To be", params)
    assert generate_text(lmforge.load(model_dir, adapter=tmp_path / "adapter")[0], tok, "To be", params) == want
    args = ["generate", str(model_dir), "--prompt", "To be", "--max-tokens", "12", "--adapter"]
    args.append(str(tmp_path / "adapter"))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(want)
    bad = runner.invoke(app, [*args[:-1], str(tmp_path)])
    assert bad.exit_code != 0 and "adapter_config.json: not found" in bad.output


def test_generate_quantized_keeps_a_gguf_files_weights_quantized(model_dir, tmp_path):
    """--quantized: the Q4_0 file's weights stay quantized, on the int4 kernel; the text is generate's on that
    model. A file that is not GGUF is refused."""
    from lmforge.quant.weight_only import QuantLinear, use_kernel

    model, tok = lmforge.load(model_dir)
    path = tmp_path / "m.gguf"
    lmforge.save(model, path, tokenizer=tok, qtype="q4_0")
    kept, file_tok = lmforge.load(path, quantized=True)  # the file's tokenizer: rows past the vocab are [PAD] ids
    layers = [m for m in kept.modules() if isinstance(m, QuantLinear)]
    assert use_kernel(kept) == sum(m.out_features % 16 == 0 for m in layers) > 0  # the 300-row head: exact path
    want = generate_text(kept, file_tok, "To be", SamplingParams(temperature=0, max_tokens=12))
    result = runner.invoke(app, ["generate", str(path), "--prompt", "To be", "--max-tokens", "12", "--quantized"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(want)
    bad = runner.invoke(app, ["generate", str(model_dir), "--prompt", "x", "--quantized"])
    assert bad.exit_code == 1 and "is not a GGUF file" in " ".join(bad.stderr.split())
