"""Model surgery: selection by pattern and predicate, swaps that change nothing when the new module only calls
the old one, undo, views sharing every tensor, and the MoE experts reached through the same path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge import ModelConfig, Transformer
from lmforge.config import MLAConfig, MoEConfig
from lmforge.io.gguf_export import save_gguf
from lmforge.io.hf import save_hf
from lmforge.model.moe import ExpertLinear, MoE
from lmforge.model.surgery import SurgeryError, select_modules, swap_modules, view
from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.pretokenize import GPT2_PATTERN

MLA = MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=24)
MOE = MoEConfig(n_experts=4, top_k=2, d_expert=16, n_shared_experts=1)
CONFIGS = {"gqa": dict(n_kv_heads=2), "mla": dict(mla=MLA), "moe": dict(n_kv_heads=2, moe=MOE)}


class Through(nn.Module):
    """An identity wrapper: calls the module it holds, counts the calls, and lends it its attributes
    (`weight`, ...) as a LoRA adapter lends its base layer's."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple] = []

    def forward(self, *args, **kwargs):
        self.calls.append(args[1:])  # what follows the input: the expert id of an ExpertLinear
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def leaf_in_blocks(name: str, module: nn.Module) -> bool:
    return name.startswith("blocks.") and not list(module.children())


def model(kind: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64, **CONFIGS[kind])
    return Transformer(cfg)


def logits_and_grads(m: nn.Module, params: list[nn.Parameter], ids: torch.Tensor):
    m.zero_grad()
    out = m(ids)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_identity_wrappers_leave_logits_and_gradients_bit_identical(kind: str) -> None:
    m = model(kind)
    params = list(m.parameters())
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    want = logits_and_grads(m, params, ids)
    swap = swap_modules(m, leaf_in_blocks, lambda _, old: Through(old))
    assert swap.model is m and all(type(m.get_submodule(n)) is Through for n in swap.replaced)
    got = logits_and_grads(m, params, ids)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(g, w) for g, w in zip(got[1], want[1], strict=True))
    projections = [n for n, old in swap.replaced.items() if isinstance(old, nn.Linear | ExpertLinear)]
    called = [n for n in projections if m.get_submodule(n).calls]
    assert called == [n for n in projections if not n.endswith(".router")]  # the router's weight is read


def test_restore_puts_back_the_same_modules() -> None:
    m = model("moe")
    before = [(name, mod) for name, mod in m.named_modules()]
    names = list(m.state_dict())
    swap = swap_modules(m, "blocks.*_proj", lambda _, old: Through(old))
    assert any(".inner." in n for n in m.state_dict())  # a wrapper holding `old` shows in the names
    assert swap.restore() is m
    after = list(m.named_modules())
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before, strict=True))
    assert list(m.state_dict()) == names


def test_patterns_and_predicates_select_exactly() -> None:
    m = model("gqa")
    assert select_modules(m, "blocks.*.attn.q_proj") == ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]
    assert select_modules(m, ["*.o_proj", "*.q_proj"]) == [
        "blocks.0.attn.q_proj", "blocks.0.attn.o_proj", "blocks.1.attn.q_proj", "blocks.1.attn.o_proj",
    ]  # fmt: skip
    per_block = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj"]  # fmt: skip
    blocks = [f"blocks.{i}.{p}" for i in range(2) for p in per_block]
    assert select_modules(m, "*_proj") == blocks
    assert select_modules(m, lambda _, mod: isinstance(mod, nn.Linear)) == [*blocks, "lm_head"]
    assert select_modules(m, "*") == [n for n, _ in m.named_children()]  # a selected module is not entered
    assert select_modules(m, ["blocks.0", "blocks.0.attn.q_proj"]) == ["blocks.0"]
    moe = model("moe")
    experts = [f"blocks.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    assert select_modules(moe, lambda _, mod: isinstance(mod, ExpertLinear)) == experts
    assert select_modules(moe, "blocks.1.mlp.*_proj") == [
        *experts[3:], "blocks.1.mlp.shared.gate_proj", "blocks.1.mlp.shared.up_proj", "blocks.1.mlp.shared.down_proj"
    ]  # fmt: skip


def test_a_module_held_twice_is_replaced_by_one_module_and_restored() -> None:
    linear = nn.Linear(3, 3)
    seq = nn.Sequential(linear, nn.ReLU(), linear)
    swap = swap_modules(seq, lambda _, mod: isinstance(mod, nn.Linear), lambda _, old: Through(old))
    assert list(swap.replaced) == ["0", "2"] and seq[0] is seq[2] and type(seq[0]) is Through
    swap.restore()
    assert seq[0] is linear and seq[2] is linear


def test_errors_leave_the_model_unchanged() -> None:
    m = model("gqa")
    with pytest.raises(SurgeryError, match=r"where='blocks\.\*\.atn\.q_proj' selects no module of Transformer"):
        swap_modules(m, "blocks.*.atn.q_proj", lambda _, old: Through(old))
    with pytest.raises(SurgeryError, match=r"returned int for 'blocks\.0\.attn\.q_proj', expected an nn\.Module"):
        swap_modules(m, "*.q_proj", lambda _, old: 0)
    assert all(type(mod) is nn.Linear for mod in (m.blocks[0].attn.q_proj, m.blocks[1].attn.q_proj))


def test_a_view_shares_every_tensor_and_leaves_the_model_alone() -> None:
    m = model("moe")
    modules = list(m.named_modules())
    swap = swap_modules(m, leaf_in_blocks, lambda _, old: Through(old), on_view=True)
    v = swap.model
    assert v is not m and list(m.named_modules()) == modules  # same names, same module objects
    assert type(v.blocks[0].attn.q_proj) is Through and type(m.blocks[0].attn.q_proj) is nn.Linear
    assert type(v.blocks[0].mlp.gate_proj) is Through and type(m.blocks[0].mlp.gate_proj) is ExpertLinear
    for ours, theirs in ((m.parameters(), v.parameters()), (m.buffers(), v.buffers())):
        ours, theirs = list(ours), list(theirs)
        assert len(ours) == len(theirs) and {t.data_ptr() for t in ours} == {t.data_ptr() for t in theirs}
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    params = list(m.parameters())
    want = logits_and_grads(m, params, ids)
    got = logits_and_grads(v, params, ids)  # the view's backward fills the model's own parameters' grads
    assert torch.equal(got[0], want[0]) and all(torch.equal(g, w) for g, w in zip(got[1], want[1], strict=True))
    moe = m.blocks[0].mlp
    moe_view = view(moe)  # after a forward with gradients: its aux_loss is shared, not copied
    assert moe_view.aux_loss is moe.aux_loss and moe_view.w_gate is moe.w_gate
    assert moe_view.runtime is moe.runtime  # one set of runtime options: switching the model switches its view
    assert v.runtime is m.runtime and v.blocks[0].attn.runtime is m.runtime
    assert v.blocks[0].attn is not m.blocks[0].attn  # while the modules themselves are copies


def _moe(seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=4, d_ff=32)
    moe = MoE(cfg.replace(moe=MoEConfig(n_experts=8, top_k=2, d_expert=8, n_shared_experts=1)))
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
    return moe


@pytest.mark.parametrize("reference", [False, True])
def test_every_expert_call_goes_through_the_swapped_expert_linears(reference: bool) -> None:
    moe, x = _moe(), torch.randn(1, 5, 16)
    moe.runtime.moe_reference = reference
    want = moe(x)
    routed = sorted(set(moe.route(x.reshape(-1, 16))[2].flatten().tolist()))
    assert len(routed) < 8  # some experts idle: a wrapper must not see them
    swap = swap_modules(moe, lambda _, mod: isinstance(mod, ExpertLinear), lambda _, old: Through(old))
    assert list(swap.replaced) == ["gate_proj", "up_proj", "down_proj"]
    assert torch.equal(moe(x), want)
    for name in swap.replaced:
        assert sorted(e for (e,) in moe.get_submodule(name).calls) == routed, name


class Silenced(nn.Module):
    """An expert matrix that outputs zeros: the MoE is left with its shared expert alone."""

    def __init__(self, old: ExpertLinear) -> None:
        super().__init__()
        self.out_features = old.out_features

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.out_features)


@pytest.mark.parametrize("reference", [False, True])
def test_a_replaced_expert_linear_computes_the_experts(reference: bool) -> None:
    moe, x = _moe(), torch.randn(1, 5, 16)
    moe.runtime.moe_reference = reference
    swap_modules(moe, "down_proj", lambda _, old: Silenced(old))
    assert torch.equal(moe(x), moe.shared(x))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_an_undone_swap_leaves_names_and_hf_export_unchanged(tmp_path: Path) -> None:
    moe = MoEConfig(n_experts=8, top_k=2, d_expert=16, n_shared_experts=1, scoring="sigmoid", n_group=4,
                    topk_group=2, group_score="top2_sum", score_correction_bias=True, first_k_dense=1)  # fmt: skip
    torch.manual_seed(0)  # DeepSeek-V3: MLA, a dense layer, then routed + shared experts with a score bias
    m = Transformer(ModelConfig(arch="deepseek_v3", vocab_size=64, d_model=32, n_layers=3, n_heads=4, d_ff=48,
                                mla=MLA, moe=moe, rope_layout="interleaved"))  # fmt: skip
    state = m.state_dict()
    save_hf(m, tmp_path / "before")
    swap = swap_modules(m, leaf_in_blocks, lambda _, old: Through(old))
    assert swap.replaced and list(m.state_dict()) != list(state)
    swap.restore()
    after = m.state_dict()
    assert list(after) == list(state) and all(after[k].data_ptr() == state[k].data_ptr() for k in state)
    save_hf(m, tmp_path / "after")
    assert _files(tmp_path / "after") == _files(tmp_path / "before")


def test_an_undone_swap_leaves_gguf_export_unchanged(tmp_path: Path) -> None:
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], GPT2_PATTERN, {"<|endoftext|>": 256})  # bytes only
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48))
    before = save_gguf(m, tok, tmp_path / "before" / "m.gguf", "f32")  # the same file name: it is general.name
    swap_modules(m, leaf_in_blocks, lambda _, old: Through(old)).restore()
    after = save_gguf(m, tok, tmp_path / "after" / "m.gguf", "f32")
    assert after.read_bytes() == before.read_bytes()
