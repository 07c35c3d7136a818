"""Knowledge distillation (train/distill.py): the losses equal TRL's GKD loss; the objective's update is the gradient
of the mean per-token alpha T^2 D + (1 - alpha) CE (TRL's per-token divergence and torch's cross entropy as the
oracle) whatever the micro-batches; the teacher stays frozen; on-policy rows are the student's own samples; a
teacher with another vocabulary and bad [distill] values are refused by name."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from lmforge import ModelConfig, Transformer
from lmforge.configfile import ConfigError
from lmforge.infer.generate import generate
from lmforge.tokenizer import train_bpe
from lmforge.train.config import DistillConfig, LoopConfig, load_train_config
from lmforge.train.distill import (
    DistillationObjective,
    DistillError,
    OnPolicyBatches,
    forward_kl,
    generalized_jsd_loss,
    reverse_kl,
    token_divergence,
)
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import Schedule
from lmforge.train.trainer import Trainer

VOCAB, ROWS, SEQ = 300, 4, 12


@pytest.fixture(scope="module")
def trl_jsd():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def logits_and_labels(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student, teacher = (torch.randn(3, 7, 33, generator=g) * 3 for _ in range(2))
    labels = torch.randint(0, 33, (3, 7), generator=g)
    labels[0, :4] = labels[2, 5:] = -100
    return student, teacher, labels


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_equals_trl(trl_jsd, beta, temperature, masked):
    student, teacher, labels = logits_and_labels()
    labels = labels if masked else None
    for reduction in ("batchmean", "sum", "mean", "none"):
        ours = generalized_jsd_loss(student, teacher, labels, beta, temperature, reduction)
        ref = trl_jsd(student, teacher, labels, beta=beta, temperature=temperature, reduction=reduction)
        assert ours.shape == ref.shape, reduction
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6, msg=reduction)


def test_the_ends_are_forward_and_reverse_kl_and_a_fully_masked_batch_is_zero(trl_jsd):
    student, teacher, labels = logits_and_labels(1)
    p, q = F.softmax(teacher / 2, -1), F.softmax(student / 2, -1)
    kl_pq = (p * (p.log() - q.log())).sum(-1)  # closed form, per token
    torch.testing.assert_close(forward_kl(student, teacher, temperature=2.0), kl_pq.sum() / 3)  # batchmean: / B
    torch.testing.assert_close(reverse_kl(student, teacher, temperature=2.0, reduction="sum"),
                               (q * (q.log() - p.log())).sum())  # fmt: skip
    torch.testing.assert_close(token_divergence(student, teacher, 0.0, 2.0), kl_pq)
    assert token_divergence(student, teacher, 0.5).min() > 0  # JSD > 0 between different distributions
    assert token_divergence(student, student, 0.5).abs().max() < 1e-6
    none = torch.full_like(labels, -100)
    assert generalized_jsd_loss(student, teacher, none).item() == trl_jsd(student, teacher, none).item() == 0.0


def test_bad_beta_and_temperature_are_refused_by_name():
    student, teacher, _ = logits_and_labels()
    with pytest.raises(ValueError, match=r"beta=1\.5"):
        generalized_jsd_loss(student, teacher, beta=1.5)
    with pytest.raises(ValueError, match="temperature=0"):
        generalized_jsd_loss(student, teacher, temperature=0)
    with pytest.raises(ValueError, match="reduction='avg'"):
        generalized_jsd_loss(student, teacher, reduction="avg")


def tiny(seed: int, d_model: int = 32, n_layers: int = 2, vocab: int = VOCAB) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=4, d_ff=2 * d_model,
                                   max_seq_len=64))  # fmt: skip


class Batches:
    """Random rows with uneven counted targets: rows 0 and 1 count none of their first 8 (micro-batches differ)."""

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        rows = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
        targets = rows[:, 1:].clone()
        targets[:2, :8] = -100
        return {"input_ids": rows[:, :-1], "targets": targets}


def oracle_loss(student, teacher, batch, trl_jsd, beta, temperature, alpha) -> torch.Tensor:
    """mean over counted targets of alpha T^2 D + (1 - alpha) CE, D per token from TRL's unreduced terms."""
    logits = student(batch["input_ids"])
    with torch.no_grad():
        teacher_logits = teacher(batch["input_ids"])
    d = trl_jsd(logits, teacher_logits, beta=beta, temperature=temperature, reduction="none").sum(-1)
    ce = F.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none")  # 0 where ignored
    keep = batch["targets"] != -100
    return (alpha * temperature**2 * d + (1 - alpha) * ce)[keep].mean()


@pytest.mark.parametrize(("beta", "grad_accum"), [(0.0, 1), (0.5, 2), (1.0, 2)])
def test_the_update_is_the_gradient_of_the_mean_token_loss(trl_jsd, beta, grad_accum):
    student, teacher = tiny(0), tiny(1, d_model=48, n_layers=3)  # a larger teacher, the same vocabulary
    before, teacher_before = copy.deepcopy(student), copy.deepcopy(teacher)
    objective = DistillationObjective(student, teacher, beta=beta, temperature=2.0, alpha=0.7)
    optimizer = build_optimizer("sgd", student, lr=1.0, weight_decay=0.0)  # p <- p - grad
    trainer = Trainer(student, optimizer, Schedule("constant"), Batches(), objective, max_steps=1,
                      grad_accum=grad_accum, grad_clip=0.0, progress=False)  # fmt: skip
    batch = Batches().batch(3)
    expected = oracle_loss(before, teacher_before, batch, trl_jsd, beta, 2.0, 0.7)
    expected.backward()
    metrics = trainer.train_step(3)
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)
    for (name, p), q in zip(student.named_parameters(), before.parameters(), strict=True):
        torch.testing.assert_close(q.detach() - p.detach(), q.grad, rtol=0, atol=1e-5, msg=name)
    for p, q in zip(teacher.parameters(), teacher_before.parameters(), strict=True):
        assert torch.equal(p, q) and not p.requires_grad
    assert not teacher.training and objective.training  # train() of the objective leaves the teacher in eval
    assert all(p is not t for p in objective.parameters() for t in teacher.parameters())  # not a submodule


def test_eval_mode_is_the_students_plain_cross_entropy():
    student, teacher = tiny(0), tiny(1)
    objective = DistillationObjective(student, teacher, beta=0.5, temperature=2.0, alpha=0.5).eval()
    batch = Batches().batch(0)
    with torch.no_grad():
        out = objective(batch)
        ce = F.cross_entropy(student(batch["input_ids"]).transpose(1, 2), batch["targets"], reduction="sum")
    torch.testing.assert_close(out.loss, ce)
    assert out.tokens == (batch["targets"] != -100).sum()


def test_a_teacher_with_another_vocabulary_is_refused():
    with pytest.raises(DistillError, match=r"teacher's vocab_size is 128 .* model.vocab_size is 300"):
        DistillationObjective(tiny(0), tiny(1, vocab=128))


@pytest.fixture(scope="module")
def tokenizer():
    text = "Once upon a time there was a little fox who liked to run in the woods. " * 20
    return train_bpe(texts=[text], vocab_size=VOCAB, progress=False)


def test_on_policy_rows_are_the_students_samples_and_count_what_they_sum(trl_jsd, tokenizer):
    student, teacher = tiny(0), tiny(1)
    objective = DistillationObjective(student, teacher, beta=0.5, temperature=2.0, alpha=0.3, prompt_tokens=5,
                                      tokenizer=tokenizer)  # fmt: skip
    data = OnPolicyBatches(Batches(), fraction=0.5, seed=7)
    step = next(s for s in range(50) if 0 < int(data.batch(s)["on_policy"].sum()) < ROWS)  # a mixed batch
    batch = data.batch(step)
    assert torch.equal(batch["on_policy"], data.batch(step)["on_policy"])  # a pure function of the step
    assert torch.equal(batch["sample_seed"], data.batch(step)["sample_seed"])
    rolled = objective.rollout(batch)
    for row in range(ROWS):
        ids, targets = rolled["input_ids"][row], rolled["targets"][row]
        if not batch["on_policy"][row]:
            assert torch.equal(ids, batch["input_ids"][row]) and torch.equal(targets, batch["targets"][row])
            continue
        assert torch.equal(ids[:5], batch["input_ids"][row, :5])  # the prompt kept
        seed = int(batch["sample_seed"][row])
        alone = [e.token_id for e in generate(student, tokenizer, ids[:5].tolist(), temperature=1.0, seed=seed,
                                              max_tokens=SEQ - 5, ignore_eos=True)]  # fmt: skip
        assert ids[5:].tolist() == alone  # the student's sample, as generate draws it alone
        assert (targets[:4] == -100).all() and targets[-1] == -100 and torch.equal(targets[4:-1], ids[5:])
    objective.train()
    out = objective(batch)
    assert out.tokens == objective.count(batch)  # count knows the units before the forward
    logits = student(rolled["input_ids"])
    d = trl_jsd(logits, teacher(rolled["input_ids"]), beta=0.5, temperature=2.0, reduction="none").sum(-1)
    ce = F.cross_entropy(logits.transpose(1, 2), rolled["targets"], reduction="none")
    per_token = torch.where(batch["on_policy"][:, None], 4 * d, 0.3 * 4 * d + 0.7 * ce)  # sampled: no hard label
    expected = per_token[rolled["targets"] != -100].sum()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)


def test_the_distill_section_is_checked_by_name():
    teacher = ['distill.teacher="t"']
    assert load_train_config(None, [*teacher, "distill.loss=jsd", "distill.beta=0.2"]).distill.beta == 0.2
    for overrides, name in [(["distill.loss=jsd", "distill.beta=1.5"], "distill.beta"),
                            (["distill.beta=0.3"], "distill.beta"),  # beta without loss = "jsd"
                            (["distill.temperature=0"], "distill.temperature"), (["distill.alpha=-1"], "distill.alpha"),
                            (["distill.loss=kl"], "distill.loss")]:  # fmt: skip
        with pytest.raises(ConfigError, match=rf"invalid {name}="):
            load_train_config(None, [*teacher, *overrides])
    with pytest.raises(ConfigError, match=r"distill\.teacher"):
        load_train_config(None, ["distill.alpha=0.9"])  # options without a teacher
    with pytest.raises(ConfigError, match=r"data\.tokenizer"):
        load_train_config(None, [*teacher, "distill.on_policy_fraction=0.5"])
    assert DistillConfig() == load_train_config(None).distill


def test_the_chunked_loss_is_refused():
    with pytest.raises(ValueError, match="chunked_ce"):
        DistillationObjective.from_config(tiny(0), tiny(1), DistillConfig(teacher="t"), LoopConfig(chunked_ce=True))
