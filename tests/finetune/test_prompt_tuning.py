"""Prompt tuning (finetune/prompt_tuning.py) and its PEFT files (finetune/prompt_files.py).

Oracles: the `peft` library on the transformers model with the same weights (PROMPT_TUNING: PEFT's files loaded
by lmforge and lmforge's loaded by PEFT give the same logits on the real positions, 1e-4; TEXT init gives the same
prompt), PEFT's own forward recomputed at every step (greedy generation through lmforge's KV cache), a hand
computation of the cross entropy (the objective), and invariants (removing the prompt restores the model, the
state-dict names and the same weight Parameter; gradients reach only the prompt).
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import lmforge
from hf_reference import hf_and_lmforge
from lmforge import ModelConfig, Transformer
from lmforge.configfile import ConfigError
from lmforge.data.sft import SFTLoader
from lmforge.finetune.prompt_files import PromptFileError, load_prompt, save_prompt
from lmforge.finetune.prompt_tuning import (
    PromptEmbedding,
    PromptLearningObjective,
    PromptTuningError,
    add_prompt_tuning,
    generate_tuned,
    remove_prompt_tuning,
    text_init_ids,
    train_only_prompt,
)
from lmforge.tokenizer import train_bpe

N = 4
IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 2]])


def peft_logits(theirs, ids=IDS, **kw) -> torch.Tensor:
    """PEFT returns n + T positions; the last T are the real tokens'."""
    with torch.no_grad():
        return theirs(ids, **kw).logits[:, -ids.shape[1] :]


def our_logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model.embed.hidden_states(model, ids))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])  # GQA; tied embeddings; Gemma's embedding scale
def test_peft_prompt_files_load_in_lmforge_with_the_same_logits(arch, tmp_path):
    hf, ours = hf_and_lmforge(arch, tmp_path / "base")
    torch.manual_seed(1)
    theirs = peft.get_peft_model(hf, peft.PromptTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM")).eval()
    expected = peft_logits(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    tuning = load_prompt(ours, tmp_path / "peft")
    assert tuning is ours.embed and tuning.n_virtual == N and ours.head_weight.shape[0] == 96  # head: V real rows
    assert torch.allclose(our_logits(ours), expected, atol=1e-4)
    with torch.no_grad():  # the same through plain virtual ids
        assert torch.allclose(ours(tuning.prepend(IDS)[0])[:, N:], expected, atol=1e-4)


def test_lmforge_prompt_files_load_in_peft_with_the_same_logits(tmp_path):
    hf, ours = hf_and_lmforge("llama", tmp_path / "base")
    add_prompt_tuning(ours, N, generator=torch.Generator().manual_seed(3))
    save_prompt(ours, tmp_path / "prompt", base_model="tiny-llama")
    config = json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == N
    assert config["token_dim"] == 64 and config["num_transformer_submodules"] == 1
    assert config["base_model_name_or_path"] == "tiny-llama"
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "prompt").eval()
    assert torch.equal(theirs.prompt_encoder["default"].embedding.weight, ours.embed.prompt)
    assert torch.allclose(our_logits(ours), peft_logits(theirs), atol=1e-4)
    # a right-padded batch: the real positions of each row, as PEFT with its attention mask
    ids = torch.tensor([[5, 17, 3, 88, 41, 9], [7, 11, 13, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        ours_padded = ours.logits(ours.embed.hidden_states(ours, ids, mask))
    theirs_padded = peft_logits(theirs, ids, attention_mask=mask)
    assert torch.allclose(ours_padded[0], theirs_padded[0], atol=1e-4)
    assert torch.allclose(ours_padded[1, :3], theirs_padded[1, :3], atol=1e-4)


def test_removing_the_prompt_restores_the_model():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64,
                                    tie_embeddings=True)).eval()  # fmt: skip
    before, names, weight = model(IDS), set(model.state_dict()), model.embed.weight
    tuning = add_prompt_tuning(model, N)
    assert isinstance(model.embed, PromptEmbedding) and model.embed.weight is weight and model.head_weight is weight
    assert set(model.state_dict()) == names | {"embed.prompt"}
    with torch.no_grad():
        assert torch.allclose(model(IDS), before)  # no virtual ids: the model as before
        full = model(tuning.prepend(IDS)[0])
        assert full.shape == (1, N + IDS.shape[1], 96) and (full[:, N:] - before).abs().max() > 1e-3
    prompt = remove_prompt_tuning(model)
    assert prompt.shape == (N, 32) and type(model.embed) is nn.Embedding and model.embed.weight is weight
    assert set(model.state_dict()) == names and torch.equal(model(IDS), before)
    with pytest.raises(PromptTuningError, match="no prompt"):
        remove_prompt_tuning(model)


def test_init_kinds_and_refusals():
    assert text_init_ids([1, 2, 3], 7) == [1, 2, 3, 1, 2, 3, 1] and text_init_ids([1, 2, 3], 2) == [1, 2]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=96, d_model=32, n_layers=1, n_heads=4, d_ff=48, max_seq_len=64))
    tuning = add_prompt_tuning(model, 5, init="text", init_ids=[7, 9])
    assert torch.equal(tuning.prompt, model.embed.weight[[7, 9, 7, 9, 7]])
    with pytest.raises(PromptTuningError, match="already"):
        add_prompt_tuning(model, 2)
    remove_prompt_tuning(model)
    sampled = add_prompt_tuning(model, 3, init="sample_vocab", generator=torch.Generator().manual_seed(0))
    rows = (sampled.prompt[:, None] == model.embed.weight[None]).all(-1)  # each row is some token's embedding
    assert rows.any(-1).all()
    remove_prompt_tuning(model)
    with pytest.raises(ConfigError, match="init"):
        add_prompt_tuning(model, 2, init="vocab")
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        add_prompt_tuning(model, 0)
    with pytest.raises(PromptTuningError, match="outside the model's vocabulary"):
        add_prompt_tuning(model, 2, init="text", init_ids=[96])


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """(lmforge llama, the same weights in transformers, the tokenizer as lmforge and PEFT load it, its dir)."""
    texts = ["the quick brown fox jumps over the lazy dog. " * 3, "to be or not to be, that is the question"]
    tok = train_bpe(texts=texts, vocab_size=300, special_tokens=["<|endoftext|>"], progress=False)
    tok.eos_token = "<|endoftext|>"
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                      max_seq_len=48)  # fmt: skip
    model = Transformer(cfg).eval()
    with torch.no_grad():  # peaked next-token distributions: greedy choices far from ties
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("llama-tok")
    lmforge.save(model, path, tok)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, ref, lmforge.load_tokenizer(path), path


@pytest.mark.parametrize("n", [7, 3], ids=["repeated", "cut"])
def test_text_init_equals_peft(with_tokenizer, n):
    model, ref, tok, path = with_tokenizer
    text = "to be or not to be"
    config = peft.PromptTuningConfig(num_virtual_tokens=n, task_type="CAUSAL_LM", prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text=text, tokenizer_name_or_path=str(path))  # fmt: skip
    theirs = peft.get_peft_model(ref, config)
    try:
        tuning = add_prompt_tuning(model, n, init="text", text=text, tokenizer=tok)
        assert len(tok.encode(text)) not in (0, n)  # the rule is exercised: repeated or cut
        assert torch.equal(tuning.prompt, theirs.prompt_encoder["default"].embedding.weight)
    finally:
        remove_prompt_tuning(model)


def test_greedy_generation_with_the_kv_cache_equals_peft_recomputed_each_step(with_tokenizer):
    model, ref, tok, _ = with_tokenizer
    torch.manual_seed(2)
    theirs = peft.get_peft_model(ref, peft.PromptTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM")).eval()
    try:
        with torch.no_grad():
            model.embed = PromptEmbedding(model.embed, theirs.prompt_encoder["default"].embedding.weight.clone())
        prompt = tok.encode("to be or not")
        events = list(generate_tuned(model, tok, prompt, max_tokens=12, temperature=0.0, ignore_eos=True))
        ids, expected = list(prompt), []
        for _ in range(12):  # PEFT's forward over the whole sequence each step (its generate disagrees with it)
            expected.append(int(peft_logits(theirs, torch.tensor([ids]))[0, -1, : tok.vocab_size].argmax()))
            ids.append(expected[-1])
        assert [e.token_id for e in events] == expected and len(set(expected)) > 1
        assert events[-1].finish_reason == "length"
        # the virtual tokens take room in the context: 48 - 4 - prompt tokens at most
        long = list(generate_tuned(model, tok, prompt, max_tokens=100, temperature=0.0, ignore_eos=True))
        assert len(long) == 48 - N - len(prompt)
    finally:
        remove_prompt_tuning(model)


def test_the_objective_is_ce_on_the_real_targets_and_only_the_prompt_trains():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                                    max_seq_len=64))  # fmt: skip
    tuning = add_prompt_tuning(model, N)
    assert train_only_prompt(model) == N * 32
    examples = [([5, 17, 3, 88, 41, 9], [0, 0, 1, 1, 1, 1]), ([7, 11, 13, 2], [0, 1, 1, 1])]
    batch = SFTLoader(examples, 2, 8, packing=False, shuffle=False).batch(0)
    objective = PromptLearningObjective(model)
    out = objective(batch)
    logits = model(tuning.prepend(batch["input_ids"])[0])[:, N:]  # by hand: the virtual ids, then the rows
    expected = F.cross_entropy(logits.reshape(-1, 96), batch["targets"].reshape(-1), ignore_index=-100, reduction="sum")
    assert int(out.tokens) == int(objective.count(batch)) == 7
    assert torch.allclose(out.loss, expected, atol=1e-5)
    chunked = PromptLearningObjective(model, chunked=True)(batch)
    assert torch.allclose(chunked.loss, expected, atol=1e-4)
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"embed.prompt"} and tuning.prompt.grad.abs().sum() > 0
    with pytest.raises(PromptTuningError, match="packing=False"):
        objective(SFTLoader(examples, 1, 12, packing=True, shuffle=False).batch(0))


def test_bad_prompt_files_are_refused_naming_the_field(tmp_path):
    hf, ours = hf_and_lmforge("llama", tmp_path / "base")
    theirs = peft.get_peft_model(hf, peft.PromptTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM"))
    theirs.save_pretrained(tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    good = json.loads(config_path.read_text())
    for field, value, match in [("token_dim", 32, "token_dim=32"), ("num_transformer_submodules", 2,
                                "num_transformer_submodules=2"), ("peft_type", "LORA", "load_adapter"),
                                ("task_type", "SEQ_2_SEQ_LM", "task_type"), ("num_virtual_tokens", 5, "shape"),
                                ("modules_to_save", ["lm_head"], "modules_to_save")]:  # fmt: skip
        config_path.write_text(json.dumps(good | {field: value}))
        with pytest.raises(PromptFileError, match=match) as error:
            load_prompt(ours, tmp_path / "peft")
        assert "adapter_" in str(error.value)  # names the file
        assert type(ours.embed) is nn.Embedding  # nothing was added
    with pytest.raises(PromptTuningError, match="no prompt or prefix"):
        save_prompt(hf_and_lmforge("llama", tmp_path / "b2")[1], tmp_path / "out")
