"""The objective seam: what the one training loop (trainer.py) minimises, as a module it calls on each batch.

An objective maps a batch (a dict of (B, ...) tensors, "input_ids" among them) to an `ObjectiveOutput`:

    loss       differentiable: the SUM over the batch's counted units (tokens, labels, ...) of the per-unit loss
    tokens     0-d: how many units `loss` sums over; `count(batch)` must give the same number before the forward
    metrics    detached sums over the same units, logged per unit; "loss" in it is what the log calls the loss
               (the language model logs its cross entropy without the z-loss regulariser); absent: `loss`
    mean_loss  optional differentiable term that is already a per-forward mean (MoE load balancing and router
               z-loss, coefficients applied): it is averaged over forwards, not weighted by tokens

Normalisation (exact under gradient accumulation and over ranks). A step's global batch is split over R ranks
and, on each, into A micro-batches (r, m). N = sum over ranks of `count(rank's rows)`, all-reduced before the
first forward (the reason `count` exists: the first micro-batch's gradient needs the global N). Micro-batch
(r, m) backpropagates

    L_rm = R * loss_rm / N + mean_loss_rm / A

and the wrappers (DDP, FSDP2) average gradients over the R ranks, so the update follows

    (1/R) sum_rm dL_rm = d/dθ [ (sum_rm loss_rm) / N  +  (1/(R A)) sum_rm mean_loss_rm ]

the gradient of the global batch's mean per-unit loss plus the mean of the per-forward terms: the update one
process computes on the whole batch in one forward (tested to 1e-5), whatever the micro-batches count. The
logged loss is sum_rm metrics["loss"]_rm / N; evaluation (objective in eval mode) reports
sum loss / sum tokens over the validation batches.

`LanguageModelObjective` is next-token cross entropy (plain or chunked, with z-loss and label smoothing, loss.py)
plus the model's MoE auxiliary losses; in eval mode it is the plain cross entropy (smoothing and z-loss are
training regularisers), so validation loss and bits per byte are comparable across runs. With
`document_mask=True` it passes the batch's "position_ids" and "doc_ids" (packed rows, data/loader.py) to the model,
so each document of a row attends only to itself and counts positions from its own start.

Any other `nn.Module` objective (a masked loss, a classification head, a preference loss) trains through the same
loop and the same `distributed.parallelize`: subclass `Objective`, write `forward` and, when its units are not
the targets other than -100, `count`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lmforge.train.loss import chunked_cross_entropy, cross_entropy, moe_loss_coefs, total_loss

if TYPE_CHECKING:
    from lmforge.train.config import LoopConfig

IGNORE_INDEX = -100  # a target that counts for nothing


@dataclass(frozen=True)
class ObjectiveOutput:
    """What an objective returns for one (micro-)batch; see the module docstring for the normalisation."""

    loss: Tensor  # differentiable sum over the counted units
    tokens: Tensor  # 0-d count of those units
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached sums, logged per unit
    mean_loss: Tensor | None = None  # differentiable per-forward mean term (weighted 1 / grad_accum)

    def logged(self) -> dict[str, Tensor]:
        """The sums the trainer logs per unit: `metrics`, with "loss" defaulting to the detached loss."""
        return {"loss": self.loss.detach()} | self.metrics


def count_targets(batch: dict[str, Tensor]) -> Tensor:
    """The targets of `batch` other than -100 (a 0-d int64 tensor): the units of a next-token loss."""
    return (batch["targets"] != IGNORE_INDEX).sum()


class Objective(nn.Module):
    """Base of the objectives: `forward(batch) -> ObjectiveOutput` and `count(batch)` (module docstring)."""

    def count(self, batch: dict[str, Tensor]) -> Tensor:
        """The units the loss of `batch` sums over, computed from the batch alone (no forward, no host sync)."""
        return count_targets(batch)

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:
        raise NotImplementedError


class LanguageModelObjective(Objective):
    """Next-token cross entropy of `model` (a `Transformer`, or any module with its `forward`/`hidden_states`,
    `head_weight` and `config`) on batch["input_ids"] against batch["targets"], plus its MoE auxiliary losses.

    chunked: the LM head fused into the loss (`chunked_cross_entropy`: the (tokens, vocab) logits never exist);
    z_loss, label_smoothing: see loss.py (training only); document_mask: pass "position_ids" and "doc_ids"."""

    def __init__(self, model: nn.Module, *, chunked: bool = False, z_loss: float = 0.0, label_smoothing: float = 0.0,
                 document_mask: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.chunked, self.z_loss, self.label_smoothing = chunked, z_loss, label_smoothing
        self.document_mask = document_mask
        config = getattr(model, "config", None)
        self.aux_coefs = moe_loss_coefs(config) if config is not None else {}

    @classmethod
    def from_loop(cls, model: nn.Module, loop: LoopConfig) -> LanguageModelObjective:
        """The objective the [train] section describes (train.chunked_ce, z_loss, label_smoothing, document_mask)."""
        return cls(model, **lm_options(loop))

    def options(self) -> dict[str, Any]:
        """The keyword arguments this objective was built with (compared with a loop's by the trainer)."""
        return {"chunked": self.chunked, "z_loss": self.z_loss, "label_smoothing": self.label_smoothing,
                "document_mask": self.document_mask}  # fmt: skip

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:
        ids, targets = batch["input_ids"], batch["targets"]
        inputs = {"position_ids": batch["position_ids"], "doc_ids": batch["doc_ids"]} if self.document_mask else {}
        smoothing, z_loss = (self.label_smoothing, self.z_loss) if self.training else (0.0, 0.0)
        kw = {"label_smoothing": smoothing, "z_loss": z_loss, "reduction": "sum"}
        if self.chunked:
            hidden = self.model.hidden_states(ids, **inputs)
            softcap = self.model.config.final_softcap
            out = chunked_cross_entropy(hidden, self.model.head_weight, targets, softcap=softcap, **kw)
        else:
            out = cross_entropy(self.model(ids, **inputs), targets, **kw)
        aux = self.model.aux_losses() if hasattr(self.model, "aux_losses") else {}
        mean_loss = total_loss(torch.zeros((), device=ids.device), aux, self.aux_coefs) if aux else None
        return ObjectiveOutput(loss=out.loss, tokens=out.tokens, metrics={"loss": out.ce}, mean_loss=mean_loss)


def lm_options(loop: LoopConfig) -> dict[str, Any]:
    """`LanguageModelObjective`'s keyword arguments from a [train] section."""
    return {"chunked": loop.chunked_ce, "z_loss": loop.z_loss, "label_smoothing": loop.label_smoothing,
            "document_mask": loop.document_mask}  # fmt: skip
