"""The engine serving adapters: several LoRA adapters at once (`finetune.multi_lora`), one per request, and prompt-
and prefix-tuned models (`engine.tuning`), each against the one-at-a-time oracle of its kind: `generate` on the
model with that adapter active (set_adapter), and `generate_tuned` for prompts and prefixes. Greedy and seeded, in
mixed batches, eager and with the compiled decode step; prefix caching never shares blocks across adapters."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.engine import LLM, SamplingParams
from lmforge.finetune.lora import LoraConfig, LoRAError, add_adapter, merge_adapter, set_adapter
from lmforge.finetune.multi_lora import StackedLoRALinear, served_adapters, stack_adapters
from lmforge.finetune.prefix_tuning import add_prefix_tuning
from lmforge.finetune.prompt_tuning import add_prompt_tuning, generate_tuned
from lmforge.infer.generate import generate
from lmforge.infer.sampling import GenerationInputError
from lmforge.tokenizer import train_bpe

TEXTS = ["the quick brown fox jumps over the lazy dog. " * 3, "to be or not to be, that is the question"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_k=40, max_tokens=8, seed=3, ignore_eos=True)
ADAPTERS = {"plain": LoraConfig(r=4, alpha=8), "wide": LoraConfig(r=8, alpha=4, rslora=True),
            "dora": LoraConfig(r=2, alpha=4, dora=True, target=("blocks.*.attn.*_proj",))}  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    t = train_bpe(texts=TEXTS, vocab_size=300, special_tokens=["<|endoftext|>"], progress=False)
    t.eos_token = "<|endoftext|>"
    return t


def base_model(tok) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                      max_seq_len=96)  # fmt: skip
    m = Transformer(cfg).eval()
    with torch.no_grad():  # peaked next-token distributions (far from ties)
        for name, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def adapted(tok):
    """The base with three adapters whose B is not zero (each changes the outputs), DoRA magnitudes perturbed."""
    m = base_model(tok)
    torch.manual_seed(1)
    for name, config in ADAPTERS.items():
        add_adapter(m, config, name)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".adapters." in n:
                p.add_(0.3 * torch.randn_like(p)) if "magnitude" not in n else p.mul_(1 + 0.2 * torch.rand_like(p))
    set_adapter(m, None)
    return m


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (9,), generator=g)]


def oracle(model, tok, prompts, adapters, params):
    """Each prompt alone through `generate`, on the model with its adapter active."""
    out = []
    for p, a in zip(prompts, adapters, strict=True):
        set_adapter(model, a)
        out.append([e.token_id for e in generate(model, tok, p, params)])
    set_adapter(model, None)
    return out


def stacked(model):
    m = copy.deepcopy(model)
    assert stack_adapters(m) == list(ADAPTERS)
    return m


def assert_pool_free(llm: LLM) -> None:
    blocks = llm.engine.blocks
    assert llm.engine.requests == {} and blocks.free_blocks == blocks.num_blocks


def test_stacked_layers_equal_each_adapter_alone(adapted):
    """Every row of one forward with its own adapter equals the model with that adapter active (DoRA included, and
    an adapter that skips a layer: "dora" adapts attention only)."""
    model = stacked(adapted)
    assert isinstance(model.blocks[0].mlp.gate_proj, StackedLoRALinear)
    x = torch.randint(0, 300, (4, 7))
    index = torch.tensor([0, 1, 2, 3])
    model.blocks[0].attn.q_proj.selector.index = index
    rows = model(x)
    model.blocks[0].attn.q_proj.selector.index = None
    for b, name in enumerate([None, *ADAPTERS]):
        set_adapter(adapted, name)
        torch.testing.assert_close(rows[b], adapted(x[b : b + 1])[0], rtol=1e-5, atol=1e-5)
    set_adapter(adapted, None)
    torch.testing.assert_close(model(x), adapted(x), rtol=1e-5, atol=1e-5)  # no index: the base


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_mixed_batch_equals_each_adapter_alone(adapted, tok, prompts, params):
    names = [None, *ADAPTERS]
    adapters = [names[i % 4] for i in range(len(prompts))]
    llm = LLM(stacked(adapted), tok, max_num_seqs=6, max_num_batched_tokens=48, block_size=8)
    assert llm.adapters == list(ADAPTERS)
    outs = llm.generate(prompts, params, adapter=adapters)
    assert [o.outputs[0].token_ids for o in outs] == oracle(adapted, tok, prompts, adapters, params)
    assert len({tuple(o.outputs[0].token_ids) for o in outs[:4]}) == 4  # the adapters really differ
    assert_pool_free(llm)


def test_compiled_step_routes_rows(adapted, tok, prompts):
    """The compiled decode step reads each step's adapter index (a new tensor every step, rows regrouped)."""
    adapters = [[None, *ADAPTERS][(i * 3) % 4] for i in range(len(prompts))]
    llm = LLM(stacked(adapted), tok, max_num_seqs=4, block_size=8, compile=True)
    outs = llm.generate(prompts, GREEDY, adapter=adapters)
    assert [o.outputs[0].token_ids for o in outs] == oracle(adapted, tok, prompts, adapters, GREEDY)


def test_prefix_cache_is_per_adapter(adapted, tok):
    """The same prompt under two adapters computes its blocks twice; under one adapter the second run hits."""
    llm = LLM(stacked(adapted), tok, block_size=8)
    prompt = list(range(5, 45))
    first = llm.generate(prompt, GREEDY, adapter="plain")[0]
    hits = llm.engine.blocks.stats.hits
    other = llm.generate(prompt, GREEDY, adapter="wide")[0]
    assert llm.engine.blocks.stats.hits == hits  # nothing shared across adapters
    again = llm.generate(prompt, GREEDY, adapter="plain")[0]
    assert llm.engine.blocks.stats.hits > hits
    assert again.outputs[0].token_ids == first.outputs[0].token_ids != other.outputs[0].token_ids
    assert first.outputs[0].token_ids == oracle(adapted, tok, [prompt], ["plain"], GREEDY)[0]
    assert_pool_free(llm)


def test_beam_search_with_an_adapter(adapted, tok):
    from lmforge.engine.beam_search import BeamSearchParams

    llm = LLM(stacked(adapted), tok, block_size=8)
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    with_wide = llm.beam_search([5, 6, 7, 8], params, adapter="wide")[0].outputs[0].token_ids
    set_adapter(adapted, "wide")
    try:
        expected = LLM(copy.deepcopy(adapted), tok, block_size=8).beam_search([5, 6, 7, 8], params)[0]
    finally:
        set_adapter(adapted, None)
    assert with_wide == expected.outputs[0].token_ids


def test_adapter_errors(adapted, tok):
    llm = LLM(stacked(adapted), tok)
    with pytest.raises(GenerationInputError, match="'nope' is not one of the engine's LoRA adapters"):
        llm.generate("hi", GREEDY, adapter="nope")
    with pytest.raises(GenerationInputError, match="has 1 adapters for 2 prompts"):
        llm.generate(["a", "b"], GREEDY, adapter=["plain"])
    with pytest.raises(GenerationInputError, match="serves no adapters"):
        LLM(base_model(tok), tok).generate("hi", GREEDY, adapter="plain")
    assert served_adapters(base_model(tok)) == []
    with pytest.raises(LoRAError, match="no LoRA adapters"):
        stack_adapters(base_model(tok))
    merged = copy.deepcopy(adapted)
    set_adapter(merged, "plain")
    merge_adapter(merged)
    with pytest.raises(LoRAError, match="merged into the weights"):
        stack_adapters(merged)


# -- prompt and prefix tuning ----------------------------------------------------------------------------------


def tuned(tok, kind: str) -> Transformer:
    m = base_model(tok)
    torch.manual_seed(2)
    if kind == "prompt":
        add_prompt_tuning(m, 5, init="random")
    else:
        add_prefix_tuning(m, 6, projection=True)
        with torch.no_grad():
            for p in m.prefix_encoder.parameters():
                p.mul_(3)  # a prefix that changes the outputs
    return m.eval()


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_tuned_model_equals_generate_tuned(tok, prompts, kind, compile):
    model = tuned(tok, kind)
    llm = LLM(model, tok, max_num_seqs=4, max_num_batched_tokens=32, block_size=8, compile=compile)
    outs = llm.generate(prompts, GREEDY)
    expected = [[e.token_id for e in generate_tuned(model, tok, p, GREEDY)] for p in prompts]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert outs[0].prompt_token_ids == prompts[0]  # the lead is not the user's prompt
    plain = [[e.token_id for e in generate(base_model(tok), tok, p, GREEDY)] for p in prompts[:3]]
    assert [o.outputs[0].token_ids for o in outs[:3]] != plain  # the prompt / prefix is really applied
    again = llm.generate(prompts[1], GREEDY)[0]  # the lead's blocks are shared by prefix caching
    assert again.outputs[0].token_ids == expected[1]
    assert_pool_free(llm)


def test_tuned_context_counts_the_lead(tok):
    llm = LLM(tuned(tok, "prompt"), tok, max_model_len=40)
    with pytest.raises(GenerationInputError, match="prompt"):
        llm.generate(list(range(1, 37)), GREEDY)  # 36 + 5 virtual tokens > 40
    out = llm.generate(list(range(1, 30)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 40 - 5 - 29
