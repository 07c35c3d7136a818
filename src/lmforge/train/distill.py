"""Knowledge distillation: a frozen teacher's next-token distributions train a student (Hinton et al. 2015; GKD,
Agarwal et al. 2024), as pure losses over logits and as an objective on the one trainer.

Token i has student logits s_i and teacher logits t_i (V,), over the same vocabulary. At temperature T

    log p_i = log_softmax(t_i / T)      (teacher)        log q_i = log_softmax(s_i / T)      (student)

and the divergences, summed over the vocabulary v, are

    forward KL   KL(p || q) = sum_v p (log p - log q)                   mean-seeking: q covers all of p
    reverse KL   KL(q || p) = sum_v q (log q - log p)                   mode-seeking: q sits on p's modes
    JSD(beta)    beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q

log m is computed as logsumexp(log q + log(1 - beta), log p + log(beta)). The mixture terms vanish at both ends
(m = q at beta = 0, m = p at beta = 1), so, as TRL's `GKDTrainer.generalized_jsd_loss`, beta = 0 *is* the forward
KL and beta = 1 the reverse KL (the divergences JSD(beta) interpolates between, up to scale); in between it is the
formula above. `generalized_jsd_loss` reproduces TRL's function exactly: the elementwise terms (..., V), positions
whose label is -100 dropped, then reduction "batchmean" (the sum over the kept positions divided by their number,
at least 1; without labels, by the batch size: the first dimension), "sum", "mean" (over the kept elements, the
vocabulary included) or "none" (the kept (n, V) terms; without labels the whole (..., V)). Logits are upcast to
float32 (float64 stays) first; TRL computes in the inputs' dtype, which is the same for float32 inputs.

The objective (`DistillationObjective`) sums, over the counted targets (targets != -100: the trainer's units),

    loss_i = alpha T^2 D_i + (1 - alpha) CE_i

D_i the chosen divergence of token i at temperature T, CE_i the student's hard-label cross entropy at T = 1 (with
the [train] z-loss and label smoothing; loss.py). T^2 keeps the soft term's gradient, which scales as 1 / T^2,
comparable across temperatures (Hinton et al.). The teacher (any architecture with the same vocabulary size) is
frozen: eval mode, no gradients, not a submodule (not wrapped, sharded, optimised or checkpointed with the student).
In eval mode the objective is the student's plain cross entropy, so validation loss and bits per byte compare with a
student trained without a teacher.

On-policy (GKD's lambda, `on_policy_fraction`): each training row is, with probability lambda, replaced by the
student's own continuation of the row's first `prompt_tokens` tokens (sampled at temperature 1 with
`infer.generate.generate_batch`, exactly T_row - P new tokens: stop tokens ignored), and the loss on it is the
divergence alone on the generated tokens (the prompt is masked, and a sampled token is no label: loss_i = T^2 D_i).
Which rows, and each row's sampling seed, are drawn by `OnPolicyBatches` from (seed, step), so a batch stays a pure
function of its step (a resumed run draws the same) and `count` knows each row's units before the forward: P' =
T_row - P for an on-policy row, its counted targets otherwise.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lmforge.infer.generate import generate_batch
from lmforge.infer.sampling import SamplingParams
from lmforge.train.loss import cross_entropy, total_loss
from lmforge.train.objective import IGNORE_INDEX, LanguageModelObjective, ObjectiveOutput, count_targets, lm_options
from lmforge.utils.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.tokenizer.base import BaseTokenizer
    from lmforge.train.config import DistillConfig, LoopConfig
    from lmforge.train.trainer import Batches

LOSS_BETAS = {"forward_kl": 0.0, "reverse_kl": 1.0}  # distill.loss -> its beta ("jsd": distill.beta)
JSD_REDUCTIONS = ("batchmean", "sum", "mean", "none")


class DistillError(LmforgeError):
    """A teacher that cannot teach this student (another vocabulary); the message names both sizes."""


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise a (log a - log b): summed over the vocabulary, KL(a || b)."""
    return log_a.exp() * (log_a - log_b)


def check_divergence(beta: float, temperature: float) -> None:
    """Refuse a beta outside [0, 1] or a temperature that is not a finite number > 0 (ValueError naming it)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"invalid beta={beta!r}: must be in [0, 1]")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"invalid temperature={temperature!r}: must be a finite number > 0")


def jsd_terms(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """The (..., V) elementwise terms of JSD(beta) at `temperature` (module docstring; beta 0: forward KL, 1:
    reverse KL); their sum over the last dimension is the per-token divergence."""
    check_divergence(beta, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")  # fmt: skip
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if beta == 0:
        return _kl_terms(log_p, log_q)
    if beta == 1:
        return _kl_terms(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_q + math.log1p(-beta), log_p + math.log(beta)]), dim=0)
    return beta * _kl_terms(log_p, log_m) + (1 - beta) * _kl_terms(log_q, log_m)


def token_divergence(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5,
                     temperature: float = 1.0) -> Tensor:  # fmt: skip
    """(...,) JSD(beta) of each token's distributions (logits (..., V)); beta 0: forward KL, 1: reverse KL."""
    return jsd_terms(student_logits, teacher_logits, beta, temperature).sum(dim=-1)


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> Tensor:
    """TRL's `GKDTrainer.generalized_jsd_loss` (module docstring): logits (B, T, V), labels (B, T) with -100 for
    positions left out, reduction "batchmean", "sum", "mean" or "none"."""
    if reduction not in JSD_REDUCTIONS:
        raise ValueError(f"invalid reduction={reduction!r}: must be one of {', '.join(JSD_REDUCTIONS)}")
    jsd = jsd_terms(student_logits, teacher_logits, beta, temperature)
    mask = labels != IGNORE_INDEX if labels is not None else None
    if mask is not None:
        jsd = jsd[mask]
    if reduction == "batchmean":
        denom = mask.sum().clamp_min(1) if mask is not None else max(jsd.shape[0], 1)
        return jsd.sum() / denom
    if reduction == "sum":
        return jsd.sum()
    return jsd.mean() if reduction == "mean" else jsd


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
               temperature: float = 1.0, reduction: str = "batchmean") -> Tensor:  # fmt: skip
    """KL(teacher || student): `generalized_jsd_loss` with beta = 0."""
    return generalized_jsd_loss(student_logits, teacher_logits, labels, 0.0, temperature, reduction)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
               temperature: float = 1.0, reduction: str = "batchmean") -> Tensor:  # fmt: skip
    """KL(student || teacher): `generalized_jsd_loss` with beta = 1."""
    return generalized_jsd_loss(student_logits, teacher_logits, labels, 1.0, temperature, reduction)


def check_vocab(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a teacher whose vocabulary size differs from the student's (their logits could not be compared)."""
    t, s = teacher.config.vocab_size, student.config.vocab_size
    if t != s:
        raise DistillError(f"the teacher's vocab_size is {t} and the student's model.vocab_size is {s}: "
                           "distillation needs one vocabulary (the same tokenizer and vocab_size)")  # fmt: skip


class OnPolicyBatches:
    """`data`'s batches, each with (B,) "on_policy" (the row is replaced by the student's continuation, with
    probability `fraction`) and "sample_seed" (its sampling seed), drawn from (seed, step): a pure function of
    the step, as the trainer's batches are."""

    def __init__(self, data: Batches, fraction: float, seed: int) -> None:
        self.data, self.fraction, self.seed = data, fraction, seed

    def batch(self, step: int) -> dict[str, Tensor]:
        batch = self.data.batch(step)
        g = torch.Generator().manual_seed(hash((self.seed, step)) & (2**63 - 1))
        rows = batch["input_ids"].shape[0]
        draws = {"on_policy": torch.rand(rows, generator=g) < self.fraction,
                 "sample_seed": torch.randint(0, 2**31, (rows,), generator=g)}  # fmt: skip
        return batch | draws


class DistillationObjective(LanguageModelObjective):
    """alpha T^2 D + (1 - alpha) CE of `model` (the student) against the frozen `teacher`, summed over the counted
    targets; on-policy rows (batch["on_policy"], from `OnPolicyBatches`) are first rewritten with the student's
    continuation of their first `prompt_tokens` tokens (module docstring). `tokenizer` serves the generation
    (needed with on-policy rows). z_loss, label_smoothing and document_mask apply to the CE term as in
    `LanguageModelObjective`; the chunked loss is not available (the divergence needs the logits)."""

    def __init__(self, model: nn.Module, teacher: nn.Module, *, beta: float = 0.0, temperature: float = 1.0,
                 alpha: float = 1.0, prompt_tokens: int = 32, tokenizer: BaseTokenizer | None = None,
                 **lm: Any) -> None:  # fmt: skip
        if lm.get("chunked"):
            raise ValueError("distillation needs the student's logits: the chunked loss (train.chunked_ce) cannot "
                             "be used")  # fmt: skip
        super().__init__(model, **lm)
        check_vocab(teacher, model)
        check_divergence(beta, temperature)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"invalid alpha={alpha!r}: must be in [0, 1]")
        if prompt_tokens < 1:
            raise ValueError(f"invalid prompt_tokens={prompt_tokens!r}: must be >= 1")
        self.beta, self.temperature, self.alpha, self.prompt_tokens = beta, temperature, alpha, prompt_tokens
        self.tokenizer = tokenizer
        self._teacher = (teacher.eval().requires_grad_(False),)  # a tuple: not a submodule (module docstring)

    @classmethod
    def from_config(cls, model: nn.Module, teacher: nn.Module, distill: DistillConfig, loop: LoopConfig,
                    tokenizer: BaseTokenizer | None = None) -> DistillationObjective:  # fmt: skip
        """The objective a [distill] section (and [train]'s language-model options) describes."""
        return cls(model, teacher, beta=LOSS_BETAS.get(distill.loss, distill.beta), temperature=distill.temperature,
                   alpha=distill.alpha, prompt_tokens=distill.prompt_tokens, tokenizer=tokenizer,
                   **lm_options(loop))  # fmt: skip

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def count(self, batch: dict[str, Tensor]) -> Tensor:
        """Counted targets; an on-policy row counts its generated tokens, T - prompt_tokens."""
        if "on_policy" not in batch:
            return count_targets(batch)
        per_row = (batch["targets"] != IGNORE_INDEX).sum(dim=1)
        generated = batch["input_ids"].shape[1] - self.prompt_tokens
        return torch.where(batch["on_policy"], generated, per_row).sum()

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:
        if not self.training:
            return super().forward(batch)  # the plain cross entropy (module docstring)
        on_policy = batch.get("on_policy")
        if on_policy is not None:
            batch = self.rollout(batch)
        ids, targets = batch["input_ids"], batch["targets"]
        inputs = {"position_ids": batch["position_ids"], "doc_ids": batch["doc_ids"]} if self.document_mask else {}
        logits = self.model(ids, **inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(ids, **inputs)
        hard = cross_entropy(logits, targets, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                             reduction="none")  # fmt: skip
        soft = token_divergence(logits, teacher_logits, self.beta, self.temperature) * self.temperature**2
        per_token = self.alpha * soft + (1 - self.alpha) * hard.loss
        if on_policy is not None:
            per_token = torch.where(on_policy[:, None], soft, per_token)
        counted = targets != IGNORE_INDEX
        zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
        aux = self.model.aux_losses() if hasattr(self.model, "aux_losses") else {}
        mean_loss = total_loss(torch.zeros((), device=ids.device), aux, self.aux_coefs) if aux else None
        metrics = {"ce": hard.ce.sum(), "divergence": (soft.detach() / self.temperature**2).where(counted, zero).sum()}
        return ObjectiveOutput(loss=per_token.where(counted, zero).sum(), tokens=counted.sum(), metrics=metrics,
                               mean_loss=mean_loss)  # fmt: skip

    def rollout(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """`batch` with its on-policy rows replaced: the row's first `prompt_tokens` ids, then the student's
        sampled continuation to the row's length; targets the generated ids (-100 on the prompt)."""
        rows = batch["on_policy"].nonzero().flatten().tolist()
        if not rows:
            return batch
        if self.tokenizer is None:
            raise ValueError("on-policy distillation generates with the student: it needs the tokenizer "
                             "(data.tokenizer)")  # fmt: skip
        ids, p = batch["input_ids"], self.prompt_tokens
        n_new = ids.shape[1] - p
        if n_new < 1:
            raise ValueError(f"prompt_tokens={p} leaves nothing to generate in rows of {ids.shape[1]} tokens")
        prompts = ids[rows, :p].tolist()
        params = [SamplingParams(temperature=1.0, max_tokens=n_new, ignore_eos=True, seed=seed)
                  for seed in batch["sample_seed"][rows].tolist()]  # fmt: skip
        continuations: list[list[int]] = [[] for _ in rows]
        was_training = self.model.training
        self.model.eval()
        try:
            for i, event in generate_batch(self.model, self.tokenizer, prompts, params):
                continuations[i].append(event.token_id)
        finally:
            self.model.train(was_training)
        generated = torch.tensor([q + c for q, c in zip(prompts, continuations, strict=True)], device=ids.device)
        row_targets = torch.full_like(generated, IGNORE_INDEX)
        row_targets[:, p - 1 : -1] = generated[:, p:]
        index = torch.tensor(rows, device=ids.device)
        return batch | {"input_ids": ids.index_copy(0, index, generated),
                        "targets": batch["targets"].index_copy(0, index, row_targets)}  # fmt: skip
