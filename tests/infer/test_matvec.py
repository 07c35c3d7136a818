"""`matvec_view`, one use of model surgery: every plain `nn.Linear` of a view becomes a `MatVecLinear` over the
same tensors; expert matrices, subclasses of `nn.Linear` and the model itself are left as they were.
(The compiled multiply + sum form is checked against `linear` in test_static_decode.py.)"""

from __future__ import annotations

import torch
from torch import nn

from lmforge import ModelConfig, Transformer
from lmforge.config import MoEConfig
from lmforge.infer.matvec import MatVecLinear, matvec_view
from lmforge.model.moe import ExpertLinear


def test_matvec_view_of_a_moe_model() -> None:
    torch.manual_seed(0)
    moe = MoEConfig(n_experts=4, top_k=2, d_expert=16, n_shared_experts=1)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, moe=moe)).eval()
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    view = matvec_view(model)
    assert all(type(view.get_submodule(n)) is MatVecLinear for n in linears)  # router and shared expert too
    assert all(type(model.get_submodule(n)) is nn.Linear for n in linears)
    assert type(view.blocks[1].mlp.down_proj) is ExpertLinear
    ours, theirs = dict(model.named_parameters()), dict(view.named_parameters())
    assert ours.keys() == theirs.keys() and all(ours[k] is theirs[k] for k in ours)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(view(ids), model(ids))  # eager: matvec is linear


def test_matvec_view_keeps_subclasses_of_linear() -> None:
    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(4, 4), Scaled(4, 4))
    view = matvec_view(model)
    assert [type(m) for m in view] == [MatVecLinear, Scaled]
    x = torch.randn(3, 4)
    assert torch.equal(view(x), model(x))
