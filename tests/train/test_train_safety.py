"""Training refuses to go silently wrong: a non-finite step stops the run (or is skipped, on request) before its
update, and config values that can only give NaN or overflow are refused up front, naming `section.field`.

Oracles: a run that never saw the bad step (same weights, bit for bit, when the bad update was not applied); the
count of host syncs (one per optimizer step, not per micro-batch); hand-picked values outside each field's range.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.config import ConfigError
from lmforge.train.config import LoopConfig, load_train_config
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import Schedule
from lmforge.train.trainer import NonFiniteError, Trainer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)


class Batches:
    """Batch `order[step]` of a fixed random stream; on the steps in `bad` the model is poisoned (see `make`)."""

    def __init__(self, order: list[int] | None = None, bad: set[int] = frozenset()) -> None:
        self.order, self.bad, self.poisoned = order, bad, False

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        self.poisoned = step in self.bad
        seed = self.order[step] if self.order is not None else step
        rows = torch.randint(0, CFG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": rows[:, :-1], "targets": rows[:, 1:]}


def make(max_steps: int, data: Batches | None = None, lr: float = 1e-3, poison: str = "loss", **kw) -> Trainer:
    """A tiny run on a constant lr; a poisoned step has a NaN loss ("loss") or an infinite gradient ("grad")."""
    data = data or Batches()
    torch.manual_seed(0)
    model = Transformer(CFG)
    if poison == "loss":
        model.embed.register_forward_hook(lambda m, i, out: out * math.nan if data.poisoned else None)
    else:
        model.embed.weight.register_hook(lambda g: g * math.inf if data.poisoned else None)
    optimizer = build_optimizer("adamw", model, lr=lr, weight_decay=0.1)
    return Trainer(model, optimizer, Schedule("constant"), data, max_steps=max_steps, progress=False, log_every=1,
                   **kw)  # fmt: skip


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------------------------------------------
# a non-finite step stops the run before its update


def test_a_huge_learning_rate_stops_at_the_step_that_went_nan():
    trainer = make(20, lr=1e10)
    with pytest.raises(NonFiniteError, match=r"^step 2: the loss is nan .*\(lr 1e\+10\); the update was not applied"):
        trainer.fit()
    one_step = make(1, lr=1e10)
    one_step.fit()
    assert trainer.step == 1
    assert_same(weights(trainer), weights(one_step))  # step 2's update never touched the weights
    assert all(torch.isfinite(v).all() for v in weights(trainer).values())


@pytest.mark.parametrize(
    ("poison", "problem"),
    [("loss", "the loss is nan and the gradient norm is nan"), ("grad", "the gradient norm is (nan|inf)")],
)
def test_a_poisoned_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, poison, problem):
    trainer = make(6, Batches(bad={2}), poison=poison, run_dir=tmp_path, checkpoint_every=1)
    with pytest.raises(NonFiniteError, match=rf"^step 3: {problem} \(lr 0\.001\)"):
        trainer.fit()
    clean = make(2)
    clean.fit()
    assert_same(weights(trainer), weights(clean))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "step_00000002.pt"


def test_skipping_applies_no_update_and_the_run_goes_on(tmp_path):
    skipped = make(4, Batches(bad={1}), run_dir=tmp_path, skip_nonfinite=True)
    last = skipped.fit()
    reference = make(3, Batches(order=[0, 2, 3]))  # the same updates, without the bad batch
    reference.fit()
    assert_same(weights(skipped), weights(reference))
    assert skipped.skipped_steps == 1 and last["skipped_steps"] == 1
    assert {"step": 2, "skipped": "the loss is nan and the gradient norm is nan"} in skipped.history
    losses = [r["loss"] for r in skipped.history if "loss" in r]
    assert math.isnan(losses[1]) and losses[2:] == [r["loss"] for r in reference.history if "loss" in r][1:]
    resumed = make(4, Batches(bad={1}), run_dir=tmp_path, skip_nonfinite=True)
    resumed.fit()  # nothing left to train; the counters come back from the checkpoint
    assert resumed.step == 4 and resumed.skipped_steps == 1


def test_too_many_skipped_steps_in_a_row_still_stop():
    trainer = make(20, Batches(bad={1, 2, 3, 4, 5}), skip_nonfinite=True, max_consecutive_skips=3)
    with pytest.raises(NonFiniteError, match=r"^steps 2-4: the loss is nan .* at 3 steps in a row "
                                             r"\(max_consecutive_skips=3\)"):  # fmt: skip
        trainer.fit()
    assert trainer.skipped_steps == 3
    apart = make(8, Batches(bad={1, 3, 5}), skip_nonfinite=True, max_consecutive_skips=2)
    apart.fit()  # never two in a row
    assert apart.skipped_steps == 3 and apart.step == 8


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_the_check_costs_one_host_sync_per_optimizer_step(monkeypatch, grad_accum):
    trainer = make(3, grad_accum=grad_accum)
    trainer.train_step(0)
    syncs = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name, **k: syncs.append(_n)
                            or _real(self, *a, **k))  # fmt: skip
    trainer.train_step(1)
    monkeypatch.undo()
    assert syncs == ["tolist"]


@pytest.mark.parametrize(
    ("kw", "field"),
    [({"max_consecutive_skips": 0}, "max_consecutive_skips"), ({"grad_clip": math.nan}, "grad_clip"),
     ({"grad_clip": -1.0}, "grad_clip"), ({"grad_clip": math.inf}, "grad_clip")],
)  # fmt: skip
def test_bad_trainer_arguments(kw, field):
    with pytest.raises(ValueError, match=rf"invalid {field}="):
        make(2, **kw)


# ---------------------------------------------------------------------------------------------------------------
# config values that can only give NaN or overflow


def error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_train_config(None, list(overrides))
    return str(info.value)


BIG = "1e19"  # an integral float >= 2**63: read as an int, refused for being outside int64
MOE = ["model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.d_expert=32"]
LLAMA3 = ["model.rope_scaling.kind=llama3", "model.rope_scaling.original_max_seq_len=128"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["optim.lr=nan"], "optim.lr"),
        (["optim.lr=inf"], "optim.lr"),
        (["optim.lr=1e10"], "optim.lr"),
        (["optim.lr=10.5"], "optim.lr"),
        (["optim.name=muon", "optim.adamw_lr=inf"], "optim.adamw_lr"),
        (["optim.eps=0"], "optim.eps"),
        (["optim.eps=nan"], "optim.eps"),
        (["optim.eps=inf"], "optim.eps"),
        (["optim.weight_decay=inf"], "optim.weight_decay"),
        (["optim.weight_decay=nan"], "optim.weight_decay"),
        (["optim.betas=[nan, 0.9]"], "optim.betas[0]"),
        (["optim.betas=[0.9, -inf]"], "optim.betas[1]"),
        (["optim.momentum=nan"], "optim.momentum"),
        (["optim.grad_clip=inf"], "optim.grad_clip"),
        (["optim.grad_clip=nan"], "optim.grad_clip"),
        (["optim.grad_clip=-1"], "optim.grad_clip"),
        (["train.z_loss=inf"], "train.z_loss"),
        (["train.label_smoothing=nan"], "train.label_smoothing"),
        (["train.time_budget_min=nan"], "train.time_budget_min"),
        (["train.max_consecutive_skips=0"], "train.max_consecutive_skips"),
        (["data.val_fraction=nan"], "data.val_fraction"),
        (["schedule.min_lr_ratio=nan"], "schedule.min_lr_ratio"),
        (["schedule.kind=cosine", "schedule.decay_fraction=nan"], "schedule.decay_fraction"),
        ([f"schedule.warmup_steps={BIG}"], "schedule.warmup_steps"),
        ([f"schedule.total_steps={BIG}"], "schedule.total_steps"),
        ([f"train.max_steps={BIG}"], "train.max_steps"),
        (["train.max_steps=9223372036854775808"], "train.max_steps"),  # a TOML integer one past int64
        ([f"train.seed={BIG}"], "train.seed"),
        (["train.seed=-1"], "train.seed"),
        ([f"data.seed={BIG}"], "data.seed"),
        ([f"data.batch_size={BIG}"], "data.batch_size"),
        ([f"train.checkpoint_every={BIG}"], "train.checkpoint_every"),
        ([f"model.vocab_size={BIG}"], "model.vocab_size"),
        ([f"model.n_layers={BIG}"], "model.n_layers"),
        (["model.vocab_size=1099511627776", "model.d_model=1099511627776", "model.head_dim=32"], "model.vocab_size"),
        (["model.rope_theta=nan"], "model.rope_theta"),
        (["model.rope_theta=inf"], "model.rope_theta"),
        (["model.rope_theta=0"], "model.rope_theta"),
        (["model.norm_eps=inf"], "model.norm_eps"),
        (["model.norm_eps=nan"], "model.norm_eps"),
        (["model.attn_softcap=inf"], "model.attn_softcap"),
        (["model.final_softcap=nan"], "model.final_softcap"),
        (["model.attn_scale=inf"], "model.attn_scale"),
        (["model.rotary_fraction=nan"], "model.rotary_fraction"),
        (["model.rope_scaling.kind=linear", "model.rope_scaling.factor=inf"], "model.rope_scaling.factor"),
        ([*LLAMA3, "model.rope_scaling.low_freq_factor=nan"], "model.rope_scaling.low_freq_factor"),
        ([*LLAMA3, "model.rope_scaling.high_freq_factor=1"], "model.rope_scaling.high_freq_factor"),  # = low: 1/0
        ([*MOE, "model.moe.routed_scaling_factor=nan"], "model.moe.routed_scaling_factor"),
        ([*MOE, "model.moe.aux_loss_coef=inf"], "model.moe.aux_loss_coef"),
        ([*MOE, "model.moe.z_loss_coef=-1"], "model.moe.z_loss_coef"),
        ([*MOE, f"model.moe.n_shared_experts={BIG}"], "model.moe.n_shared_experts"),
    ],
)
def test_values_that_can_only_diverge_or_overflow_are_refused(overrides, field):
    assert f"invalid {field}=" in error(*overrides)


def test_nan_and_inf_literals_in_a_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[optim]\nlr = nan\n")
    with pytest.raises(ConfigError, match=r"invalid optim\.lr=nan"):
        load_train_config(path)
    path.write_text("[model]\nrope_theta = inf\n")
    with pytest.raises(ConfigError, match=r"invalid model\.rope_theta=inf"):
        load_train_config(path)
    path.write_text("[optim]\nlr = 10.0\n\n[model]\nrope_theta = 1e6\n")  # the bounds themselves are allowed
    assert load_train_config(path).optim.lr == 10.0


def test_cuda_without_cuda_is_refused_naming_train_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_train_config(None, ["train.device=cuda"]).train.device == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "invalid train.device='cuda': CUDA is not available" in error("train.device=cuda")
    with pytest.raises(ConfigError, match=r"invalid train\.device='cuda'"):
        LoopConfig(device="cuda")
    assert "invalid dist.backend='nccl': nccl needs CUDA" in error("dist.backend=nccl")
    assert "invalid train.device='tpu'" in error("train.device=tpu")
