"""The objective seam: another objective trains through the same loop (its gradient is the hand-written loss'),
document masking reaches the model, and one LoopConfig configures the trainer (keywords build the same one)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from dist_worker import ROWS, SEQ, VOCAB, MaskedTagging, Sharded, Tagger, tag_batch
from torch import nn

from lmforge import ModelConfig, Transformer
from lmforge.train.config import LoopConfig, load_train_config
from lmforge.train.objective import LanguageModelObjective
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import Schedule
from lmforge.train.trainer import Trainer


def masked_mean_ce(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The hand-written loss: mean cross entropy over the positions whose loss_mask is 1."""
    keep = batch["loss_mask"].bool()
    return F.cross_entropy(model(batch["input_ids"])[keep], batch["labels"][keep])


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_masked_objective_trains_through_the_same_loop(grad_accum):
    torch.manual_seed(0)
    model = Tagger()
    before = copy.deepcopy(model)
    data = Sharded(0, 1, make=tag_batch)
    optimizer = build_optimizer("sgd", model, lr=1.0, weight_decay=0.0)  # p <- p - grad
    trainer = Trainer(model, optimizer, Schedule("constant"), data, MaskedTagging(model), max_steps=1,
                      grad_accum=grad_accum, grad_clip=0.0, progress=False, val_data=Sharded(0, 1, 100, tag_batch),
                      eval_steps=2)  # fmt: skip
    batch = data.batch(1)  # rows 0-1 have no counted token: micro-batches count different numbers
    expected = masked_mean_ce(before, batch)
    expected.backward()
    metrics = trainer.train_step(1)
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), before.parameters(), strict=True):
        if q.requires_grad:
            torch.testing.assert_close(q.detach() - p.detach(), q.grad, rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(p, q), name  # frozen
    val = [trainer.val_data.batch(i) for i in range(2)]
    with torch.no_grad():
        total = sum(masked_mean_ce(model, b) * b["loss_mask"].sum() for b in val)
    assert trainer.evaluate()["val_loss"] == pytest.approx((total / sum(b["loss_mask"].sum() for b in val)).item())


class SpyLM(nn.Module):
    """A tiny language model that records the keyword arguments its forward and hidden_states receive."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(final_softcap=None, moe=None)
        self.embed = nn.Embedding(VOCAB, 8)
        self.calls: list[dict] = []

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight

    def hidden_states(self, ids: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        self.calls.append(kw)
        return self.embed(ids)

    def forward(self, ids: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        return self.hidden_states(ids, **kw) @ self.head_weight.t()


def packed_batch(step: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + step)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
    doc_ids = (torch.arange(SEQ) >= 5).long().expand(ROWS, SEQ) + torch.arange(ROWS)[:, None] % 2
    positions = torch.arange(SEQ) - torch.where(torch.arange(SEQ) >= 5, 5, 0)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "doc_ids": doc_ids,
            "position_ids": positions.expand(ROWS, SEQ) + step}  # fmt: skip


@pytest.mark.parametrize("chunked", [False, True])
def test_document_mask_gives_the_model_position_and_doc_ids(chunked):
    batch = packed_batch(3)
    for document_mask in (False, True):
        model = SpyLM()
        trainer = Trainer(model, build_optimizer("adamw", model, 1e-3, 0.0), Schedule("constant"),
                          Sharded(0, 1, make=packed_batch), max_steps=1, grad_accum=2, progress=False,
                          chunked_ce=chunked, document_mask=document_mask)  # fmt: skip
        trainer.train_step(3)
        if not document_mask:  # today's runs: the model sees input_ids alone
            assert model.calls == [{}, {}]
            continue
        assert len(model.calls) == 2  # one per micro-batch, each with its own rows
        for half, call in zip(range(2), model.calls, strict=True):
            rows = slice(half * ROWS // 2, (half + 1) * ROWS // 2)
            assert call.keys() == {"position_ids", "doc_ids"}
            assert torch.equal(call["position_ids"], batch["position_ids"][rows])
            assert torch.equal(call["doc_ids"], batch["doc_ids"][rows])


def test_document_mask_on_a_transformer_is_the_documents_run_alone():
    """A packed row of two documents with document masking gives the loss and gradients of the two documents as
    separate rows (the Transformer's doc_ids masking; positions restart at each document)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=SEQ)
    model = Transformer(cfg)
    a, b = torch.randint(0, VOCAB, (7,)), torch.randint(0, VOCAB, (10,))
    packed = {"input_ids": torch.cat([a[:-1], b[:-1]])[None], "targets": torch.cat([a[1:], b[1:]])[None],
              "position_ids": torch.cat([torch.arange(6), torch.arange(9)])[None],
              "doc_ids": torch.tensor([0] * 6 + [1] * 9)[None]}  # fmt: skip
    alone = LanguageModelObjective(model)
    separate = sum(alone({"input_ids": d[:-1][None], "targets": d[1:][None]}).loss for d in (a, b))
    separate.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = LanguageModelObjective(model, document_mask=True)(packed)
    out.loss.backward()
    assert out.tokens.item() == 15
    torch.testing.assert_close(out.loss, separate, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # without the mask the second document sees the first: another loss
        assert abs(LanguageModelObjective(model)(packed).loss - separate) > 1e-3


def small_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=SEQ))


def trainer_for(model: nn.Module, *args, **kw) -> Trainer:
    return Trainer(model, build_optimizer("adamw", model, 1e-3, 0.0), Schedule("constant"), Sharded(0, 1), *args,
                   progress=False, **kw)  # fmt: skip


def test_one_loop_config_and_the_keywords_that_build_it():
    model = small_model()
    loop = LoopConfig(max_steps=7, eval_every=0, checkpoint_every=0, keep_last=3, log_every=2, chunked_ce=True)
    assert trainer_for(model, loop=loop).loop == loop
    keywords = trainer_for(model, max_steps=7, log_every=2, chunked_ce=True)
    assert keywords.loop == loop and keywords.max_steps == 7 and keywords.chunked_ce
    assert keywords.objective.chunked  # the default objective is the loop's language model
    keywords.max_steps = 3  # a loop field set on the trainer replaces the loop, checked again
    assert keywords.loop == LoopConfig(**{**vars(loop), "max_steps": 3})
    with pytest.raises(ValueError, match="invalid max_steps=0"):
        keywords.max_steps = 0
    assert trainer_for(model, loop=loop, max_steps=9).loop.max_steps == 9  # keywords override a loop's fields
    with pytest.raises(TypeError, match="unexpected keyword argument 'out_dir'"):
        trainer_for(model, max_steps=1, out_dir="x")  # the run's field: run_dir=
    with pytest.raises(TypeError, match="needs loop=LoopConfig"):
        trainer_for(model)
    with pytest.raises(ValueError, match="loop options z_loss describe the language-model objective"):
        trainer_for(model, MaskedTagging(model), max_steps=1, z_loss=1e-4)
    assert trainer_for(model, LanguageModelObjective(model, z_loss=1e-4), max_steps=1, z_loss=1e-4).loop.z_loss


def test_the_toml_config_maps_to_the_trainer_in_one_place(tmp_path):
    cfg = load_train_config(None, ["train.time_budget_min=0.5", "data.grad_accum=2", "optim.grad_clip=none",
                                   f"train.out_dir={tmp_path}", "train.document_mask=true"])  # fmt: skip
    assert cfg.trainer_options() == {"run_dir": str(tmp_path), "time_budget_s": 30.0, "grad_accum": 2,
                                     "grad_clip": 0.0}  # fmt: skip
    model = small_model()
    trainer = trainer_for(model, None, cfg.train, **cfg.trainer_options())
    assert trainer.loop == cfg.train and trainer.objective.document_mask and trainer.time_budget_s == 30.0
