"""Tiny random-weight Hugging Face models: the independent reference for parity tests."""

from __future__ import annotations

import torch

import lmforge

VOCAB = 96


def hf_config(arch: str):
    import transformers as T

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager",
    )  # fmt: skip
    if arch == "gpt2":
        return T.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, attn_implementation="eager",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
    if arch == "llama":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}  # fmt: skip
        return T.LlamaConfig(**common, rope_parameters={"rope_theta": 500000.0, **scaling})
    if arch == "mistral":
        return T.MistralConfig(**common, sliding_window=5, head_dim=16)
    if arch == "qwen2":
        return T.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return T.Qwen3Config(**common, head_dim=24)
    if arch == "gemma2":
        return T.Gemma2Config(
            **{**common, "num_hidden_layers": 3}, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        )  # fmt: skip
    if arch == "mixtral":
        return T.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(
            **{**common, "num_hidden_layers": 3}, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
            norm_topk_prob=True, mlp_only_layers=[1],
        )  # fmt: skip
    mla = dict(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    if arch == "deepseek_v2":
        return T.DeepseekV2Config(
            **{**common, "num_key_value_heads": 4}, **{**mla, "q_lora_rank": None}, n_routed_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
            routed_scaling_factor=1.5, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        )  # fmt: skip
    if arch == "deepseek_v3":
        return T.DeepseekV3Config(
            **{**common, "num_hidden_layers": 3, "num_key_value_heads": 4}, **mla, n_routed_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
            routed_scaling_factor=2.5, n_group=4, topk_group=2,
            rope_parameters={"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0, "mscale": 1.0,
                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 32},
        )  # fmt: skip
    raise ValueError(arch)


def hf_model(arch: str, seed: int = 0):
    """A random-weight transformers causal LM (eval mode, fp32) with every weight non-trivial."""
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(hf_config(arch)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:  # random norm weights catch a missing (1 + w) or a wrong norm
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if arch == "gemma2" else 1.0))
            elif p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1)
            else:
                p.copy_(torch.randn_like(p) * 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand_like(b) * 0.5)
    return model


def hf_beam_search(hf, ids: list[int], num_beams: int, max_new_tokens: int, length_penalty: float,
                   early_stopping: bool | str, num_return_sequences: int,
                   eos: tuple[int, ...]) -> list[tuple[list[int], float]]:  # fmt: skip
    """transformers' `generate(num_beams=...)` hypotheses, best first: the generated tokens (cut at each one's own
    length) and the score (`sequences_scores`)."""
    out = hf.generate(
        torch.tensor([ids]), do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
        length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=num_return_sequences,
        eos_token_id=list(eos) or None, pad_token_id=eos[0] if eos else 0, return_dict_in_generate=True,
        output_scores=True,
    )  # fmt: skip
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    n = len(ids)
    return [(out.sequences[i, n : n + m].tolist(), float(out.sequences_scores[i])) for i, m in enumerate(lengths)]


def hf_and_lmforge(arch: str, directory):
    """A transformers model of `arch` with random weights, and lmforge's load of it saved in `directory`."""
    hf = hf_model(arch)
    hf.save_pretrained(directory)
    return hf, lmforge.load(directory)[0]
