"""`infer.step_compile`: a step compiled without guards on the module tree stays right for every model, keeps the
guards on its other inputs, and refuses (or, through `decoder_for`, rebuilds for) a model cast after it stepped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge import ModelConfig, Transformer
from lmforge.infer.static_decode import decoder_for
from lmforge.infer.step_compile import check_unchanged, compile_step, fingerprint, own_code, skip_module_guards


class Stepper:
    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x).relu()


def test_each_model_gets_its_own_code_object_and_keeps_it():
    a, b, stepper = nn.Linear(4, 3), nn.Linear(4, 3), Stepper()
    code_a = own_code(stepper.forward, a).__code__
    assert own_code(stepper.forward, a).__code__ is code_a  # the same model: the same code (its graphs shared)
    assert own_code(stepper.forward, b).__code__ is not code_a  # another model never sees a's graphs
    assert own_code(Stepper().forward, a).__code__ is code_a  # whichever instance steps it
    a.double()
    assert own_code(stepper.forward, a).__code__ is not code_a  # cast: as good as another model


def test_module_guards_are_dropped_and_the_others_kept():
    model = nn.Linear(4, 3)
    seen = []

    def spy(entries):
        keep = skip_module_guards(entries)
        seen.extend((e.name, k) for e, k in zip(entries, keep, strict=True))
        return keep

    step = torch.compile(own_code(Stepper().forward, model), options={"guard_filter_fn": spy})
    x = torch.randn(2, 4)
    torch.testing.assert_close(step(model, x), model(x).relu())
    dropped = {name for name, k in seen if not k}
    assert "model._parameters['weight']" in dropped and all(name.startswith("model") for name in dropped)
    assert ("x", True) in seen  # the input's shape, dtype and strides: still checked


@pytest.mark.slow
def test_models_of_different_shapes_and_dtypes_each_step_right():
    stepper, runs = Stepper(), []
    for d_in, dtype in ((4, torch.float32), (6, torch.float32), (4, torch.float64)):
        torch.manual_seed(d_in)
        model = nn.Linear(d_in, 3).to(dtype)
        step = compile_step(stepper.forward, model, fullgraph=True)
        for batch in (2, 5):
            x = torch.randn(batch, d_in, dtype=dtype)
            torch.testing.assert_close(step(model, x), model(x).relu())
            runs.append(step(model, x).dtype)
    assert runs == [torch.float32] * 4 + [torch.float64] * 2


def test_check_unchanged_catches_a_cast():
    model = nn.Linear(4, 3)
    seen = fingerprint(model)
    check_unchanged(model, seen)
    model.double()
    with pytest.raises(RuntimeError, match="cast, moved or reloaded"):
        check_unchanged(model, seen)


@pytest.mark.slow
def test_decoder_for_builds_a_new_decoder_for_a_model_cast_after_it_stepped():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=64)).eval()
    x = torch.randint(0, 64, (1, 6))
    for dtype in (torch.float32, torch.float64):
        model.to(dtype)
        decoder = decoder_for(model, 16, compile=True)
        decoder.prefill(x[:, :5])
        got = decoder.step(x[:, 5:6])
        with torch.no_grad():
            want = model(x)[:, -1].float()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        with pytest.raises(RuntimeError, match="cast, moved or reloaded"):  # the old decoder refuses the cast model
            model.to(torch.float64 if dtype == torch.float32 else torch.float32)
            decoder.step(x[:, 5:6])
        model.to(dtype)
