"""Three tiny random Llama checkpoints (hidden 64, 2 layers) saved by transformers, and mergekit as the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _llama(path: Path, seed: int, base: dict[str, torch.Tensor] | None, scale: float = 1.0) -> dict:
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if base is None:
                p.add_(0.1 * torch.randn_like(p))  # norms too: no tensor identical across models
            else:  # a fine-tune: the base plus a small random change, the norm weights a colinear multiple
                p.copy_(base[name] * scale if p.dim() == 1 else base[name] + 0.02 * torch.randn_like(p))
    model.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-models")
    base = _llama(root / "base", 0, None)
    _llama(root / "ft1", 1, base, scale=1.5)
    _llama(root / "ft2", 2, base, scale=0.5)
    return {"base": root / "base", "ft1": root / "ft1", "ft2": root / "ft2"}
