"""Prefix tuning (finetune/prefix_tuning.py: PrefixEncoder, PrefixCache) and its PEFT files (finetune/prompt_files.py).

Oracles: the `peft` library on the transformers model with the same weights (PREFIX_TUNING, with and without
prefix_projection, on llama with GQA (2 key/value heads for 4 query heads), mistral's sliding window and gemma2's
alternating windows: PEFT's files loaded by lmforge and lmforge's loaded by PEFT give the same logits on the real
tokens, 1e-4; PEFT's training-mode encoder with lmforge's weights gives the objective's logits), PEFT's forward
recomputed at every step (greedy generation through lmforge's KV cache), each row alone (a left-padded batch
through the prefix cache), and invariants (gradients reach only the prefix; bad files and MLA are refused).
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers

import lmforge
from hf_reference import hf_and_lmforge
from lmforge import ModelConfig, Transformer
from lmforge.config import MLAConfig
from lmforge.data.sft import SFTLoader
from lmforge.finetune.prefix_tuning import (
    PrefixCache,
    PrefixEncoder,
    add_prefix_tuning,
    generate_with_prefix,
    remove_prefix_tuning,
    train_only_prefix,
)
from lmforge.finetune.prompt_files import PromptFileError, load_prompt, save_prompt
from lmforge.finetune.prompt_tuning import PromptLearningObjective, PromptTuningError, add_prompt_tuning
from lmforge.infer.kv_cache import KVCache
from lmforge.tokenizer import train_bpe

N = 4
IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 2]])


def config(projection: bool = False, **kw) -> peft.PrefixTuningConfig:
    hidden = {"encoder_hidden_size": 24} if projection else {}
    return peft.PrefixTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM", prefix_projection=projection,
                                   **hidden, **kw)  # fmt: skip


def peft_logits(theirs, ids=IDS, **kw) -> torch.Tensor:
    with torch.no_grad():
        return theirs(ids, **kw).logits


def our_logits(model, ids=IDS, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model.prefix_encoder.hidden_states(model, ids, mask))


@pytest.mark.parametrize(("arch", "projection"), [("llama", False), ("llama", True), ("mistral", False),
                                                  ("gemma2", False)])  # fmt: skip
def test_peft_prefix_files_load_in_lmforge_with_the_same_logits(arch, projection, tmp_path):
    hf, ours = hf_and_lmforge(arch, tmp_path / "base")
    torch.manual_seed(1)
    theirs = peft.get_peft_model(hf, config(projection)).eval()
    expected = peft_logits(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    encoder = load_prompt(ours, tmp_path / "peft")
    assert encoder is ours.prefix_encoder and not encoder.projection  # PEFT's file holds the projected prefix
    assert (encoder.n_kv_heads, encoder.token_dim) == (ours.config.kv_heads, ours.config.kv_heads * 16)
    assert torch.allclose(our_logits(ours), expected, atol=1e-4)
    if arch == "llama" and not projection:  # a right-padded batch with its mask: each row's real tokens
        ids = torch.tensor([[5, 17, 3, 88, 41, 9], [7, 11, 13, 0, 0, 0]])
        mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
        ours_padded, theirs_padded = our_logits(ours, ids, mask), peft_logits(theirs, ids, attention_mask=mask)
        assert torch.allclose(ours_padded[0], theirs_padded[0], atol=1e-4)
        assert torch.allclose(ours_padded[1, :3], theirs_padded[1, :3], atol=1e-4)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_lmforge_prefix_files_load_in_peft_with_the_same_logits(projection, tmp_path):
    hf, ours = hf_and_lmforge("llama", tmp_path / "base")
    torch.manual_seed(3)
    encoder = add_prefix_tuning(ours, N, projection=projection, encoder_hidden_size=24 if projection else None)
    save_prompt(ours, tmp_path / "prefix")
    written = json.loads((tmp_path / "prefix" / "adapter_config.json").read_text())
    assert written["peft_type"] == "PREFIX_TUNING" and written["prefix_projection"] == projection
    assert (written["token_dim"], written["num_attention_heads"], written["num_layers"]) == (32, 2, 2)  # GQA
    assert written["encoder_hidden_size"] == (24 if projection else 32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "prefix").eval()
    with torch.no_grad():
        assert torch.allclose(theirs.prompt_encoder["default"].embedding.weight, encoder())
    assert torch.allclose(our_logits(ours), peft_logits(theirs), atol=1e-4)
    remove_prefix_tuning(ours)
    assert not hasattr(ours, "prefix_encoder")


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """(lmforge llama, the same weights in transformers, a tokenizer of its vocabulary)."""
    texts = ["the quick brown fox jumps over the lazy dog. " * 3, "to be or not to be, that is the question"]
    tok = train_bpe(texts=texts, vocab_size=300, special_tokens=["<|endoftext|>"], progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                      max_seq_len=48)  # fmt: skip
    model = Transformer(cfg).eval()
    with torch.no_grad():  # peaked next-token distributions: greedy choices far from ties
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("llama-tok")
    lmforge.save(model, path)
    return model, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_greedy_generation_with_the_kv_cache_equals_peft_recomputed_each_step(with_tokenizer, projection):
    model, ref, tok = with_tokenizer
    torch.manual_seed(2)
    encoder = add_prefix_tuning(model, N, projection=projection, encoder_hidden_size=24 if projection else None)
    theirs = peft.get_peft_model(ref, config(projection)).eval()
    theirs.prompt_encoder["default"].load_state_dict(encoder.state_dict())  # PEFT's names: the same weights
    try:
        prompt = tok.encode("to be or not")
        events = list(generate_with_prefix(model, tok, prompt, max_tokens=12, temperature=0.0, ignore_eos=True))
        ids, expected = list(prompt), []
        for _ in range(12):
            expected.append(int(peft_logits(theirs, torch.tensor([ids]))[0, -1, : tok.vocab_size].argmax()))
            ids.append(expected[-1])
        assert [e.token_id for e in events] == expected and len(set(expected)) > 1
        long = list(generate_with_prefix(model, tok, prompt, max_tokens=100, temperature=0.0, ignore_eos=True))
        assert len(long) == 48 - N - len(prompt)  # the prefix takes n places of the context
    finally:
        remove_prefix_tuning(model)


def test_a_left_padded_batch_through_the_prefix_cache_equals_each_row_alone():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                                    max_seq_len=64, sliding_window=6)).eval()  # fmt: skip
    encoder = add_prefix_tuning(model, N)
    rows = [[5, 17, 3, 88, 41], [7, 11]]
    ids = torch.tensor([[5, 17, 3, 88, 41], [0, 0, 0, 7, 11]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    steps = torch.tensor([[9, 60], [33, 71], [2, 4]])  # three decode steps, one token per row
    with torch.no_grad():
        cache = encoder.cache(KVCache(16))
        got = [model(ids, attention_mask=mask, cache=cache)[:, -1]]
        for step in steps:
            got.append(model(step[:, None], cache=cache)[:, -1])
        for r, row in enumerate(rows):
            for k, step_logits in enumerate(got):
                alone = torch.tensor([row + steps[:k, r].tolist()])
                assert torch.allclose(step_logits[r], our_logits(model, alone)[0, -1], atol=1e-5), (r, k)
    assert isinstance(cache, PrefixCache) and cache.batch == 2 and cache.inner.lengths == [8, 5]


def test_the_objective_matches_peft_and_only_the_prefix_trains(tmp_path):
    hf, ours = hf_and_lmforge("llama", tmp_path)
    torch.manual_seed(4)
    encoder = add_prefix_tuning(ours, N, projection=True, encoder_hidden_size=24)
    count = N * 32 + (32 * 24 + 24) + (24 * 128 + 128)  # embedding, Linear(32 -> 24), Linear(24 -> 2 L 32)
    assert train_only_prefix(ours) == sum(p.numel() for p in encoder.parameters()) == count
    theirs = peft.get_peft_model(hf, config(projection=True)).eval()  # training mode's encoder: MLP, no file
    theirs.prompt_encoder["default"].load_state_dict(encoder.state_dict())
    examples = [([5, 17, 3, 88, 41, 9], [0, 0, 1, 1, 1, 1]), ([7, 11, 13, 2], [0, 1, 1, 1])]
    batch = SFTLoader(examples, 2, 8, packing=False, shuffle=False).batch(0)
    out = PromptLearningObjective(ours)(batch)
    logits = peft_logits(theirs, batch["input_ids"])  # PEFT's forward, the CE by hand
    expected = F.cross_entropy(logits.reshape(-1, 96), batch["targets"].reshape(-1), ignore_index=-100, reduction="sum")
    assert int(out.tokens) == 7 and torch.allclose(out.loss, expected, atol=1e-4)
    out.loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert set(grads) == {f"prefix_encoder.{n}" for n, _ in encoder.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_bad_files_and_models_are_refused(tmp_path):
    hf, ours = hf_and_lmforge("llama", tmp_path / "base")
    peft.get_peft_model(hf, config()).save_pretrained(tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    good = json.loads(config_path.read_text())
    for field, value, match in [("num_attention_heads", 4, "num_attention_heads=4"), ("token_dim", 64, "token_dim"),
                                ("num_layers", 3, "num_layers=3"), ("num_virtual_tokens", 5, "shape"),
                                ("num_transformer_submodules", 2, "num_transformer_submodules")]:  # fmt: skip
        config_path.write_text(json.dumps(good | {field: value}))
        with pytest.raises(PromptFileError, match=match) as error:
            load_prompt(ours, tmp_path / "peft")
        assert "adapter_" in str(error.value) and not hasattr(ours, "prefix_encoder")
    config_path.write_text(json.dumps(good))
    add_prompt_tuning(ours, 2)
    with pytest.raises(PromptTuningError, match="already"):
        load_prompt(ours, tmp_path / "peft")
    mla = Transformer(ModelConfig(vocab_size=96, d_model=32, n_layers=1, n_heads=4, d_ff=48, max_seq_len=64,
                                  mla=MLAConfig(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                                v_head_dim=8)))  # fmt: skip
    with pytest.raises(PromptTuningError, match="MLA"):
        add_prefix_tuning(mla, N)
    with pytest.raises(PromptTuningError, match="inner cache"):
        PrefixEncoder(N, 1, 2, 4).cache().add_rows(1)
