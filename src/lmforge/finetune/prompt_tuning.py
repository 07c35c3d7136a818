"""Prompt tuning (Lester et al. 2021): n trainable "virtual token" embeddings in front of every input.

A frozen model reads E = [P; e(x_1); ...; e(x_T)], P (n, d) trainable, e(x) a token's input embedding: the model
is steered by a soft prompt of n vectors that need not be the embedding of any token. Only P trains (n d
parameters).

Virtual token ids. `add_prompt_tuning(model, n)` replaces `model.embed` (V rows) by a `PromptEmbedding` that embeds
ids < V as before and ids V .. V+n-1 as the rows of P, so prompt tuning is "prepend ids V .. V+n-1 to the input":
it runs unchanged through the KV cache, padding and masks, and learned positions apply to P as to any token.
The real tokens sit at positions n .. n+T-1. P lives where e(x) does, after Gemma's embedding scale sqrt(d) (PEFT
hands [P; e(x)] to transformers as inputs_embeds, and transformers 5 scales inside its embedding module): the
`PromptEmbedding` divides P's rows by the scale `Transformer.embed_tokens` multiplies back. The LM head is not
extended: virtual ids are never generated, and a tied head (`Transformer.head_weight` = `embed.weight`) still
reads the V real rows. The embedding's weight stays the same Parameter under the same name (`embed.weight`); P is
`embed.prompt`. `remove_prompt_tuning` puts a plain nn.Embedding holding that weight back.

Init (PEFT's `prompt_tuning_init`): "random" N(0, 1) (nn.Embedding's default, PEFT's RANDOM); "sample_vocab" the
input embeddings e(x) of n uniformly drawn token ids; "text" the input embeddings of a text's tokens (the
tokenizer's ids with its bos when it adds one, as PEFT's `tokenizer(text)["input_ids"]`), repeated until there
are n and cut to n (`text_init_ids`).

Shared with prefix tuning (finetune/prefix_tuning.py): a "tuning" is the module a model holds for its prompt
(`find_tuning`: a `PromptEmbedding` at `model.embed`, or a `PrefixEncoder` at `model.prefix_encoder`) with
`hidden_states(model, ids, attention_mask)` (the real tokens' final states) and `decode_forward(model, n_tokens)`
(the generation forward, with its own cache). `PromptLearningObjective` trains either on one-example-per-row
batches (SFTLoader(packing=False)); `generate_tuned` generates with either (infer.generate checks that every
prompt id is below vocab_size and builds its own cache, so it cannot take virtual ids or a prefix).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.configfile import check_choice, check_positive
from lmforge.infer.decode import DecodeBatch, Forward, GenerationEvent, decode
from lmforge.infer.generate import check_prompt, encode_prompt, last_logits, sequence_state
from lmforge.infer.kv_cache import KVCache
from lmforge.infer.sampling import SamplingParams
from lmforge.train.loss import chunked_cross_entropy, cross_entropy
from lmforge.train.objective import IGNORE_INDEX, Objective, ObjectiveOutput
from lmforge.utils.errors import LmforgeError

__all__ = [
    "INITS",
    "PromptEmbedding",
    "PromptLearningObjective",
    "PromptTuningError",
    "add_prompt_tuning",
    "check_untuned",
    "find_tuning",
    "generate_tuned",
    "remove_prompt_tuning",
    "text_init_ids",
    "train_only_prompt",
]

INITS = ("random", "sample_vocab", "text")  # PEFT's RANDOM, SAMPLE_VOCAB, TEXT


class PromptTuningError(LmforgeError):
    """A prompt or prefix that does not fit the model: a second one, none to remove, a bad init, an unsupported
    architecture, a batch the objective cannot take."""


class PromptEmbedding(nn.Module):
    """The model's embedding (`weight` (V, d), the same Parameter) plus `prompt` (n, d): ids < V embed as before,
    ids V .. V+n-1 as the prompt's rows."""

    def __init__(self, embed: nn.Embedding, prompt: Tensor, init: str = "random", init_text: str | None = None,
                 input_scale: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        if not isinstance(embed, nn.Embedding):
            raise PromptTuningError(f"prompt tuning extends an nn.Embedding, not {type(embed).__name__}")
        self.weight = embed.weight  # the same Parameter: the state dict keeps `embed.weight`
        self.padding_idx = embed.padding_idx
        self.num_embeddings, self.embedding_dim = embed.num_embeddings, embed.embedding_dim
        self.prompt = nn.Parameter(prompt.to(embed.weight.device, embed.weight.dtype))
        self.init, self.init_text = init, init_text  # how the prompt started (written to PEFT's config)
        self.input_scale = input_scale  # the model's embedding scale (Gemma: sqrt(d)), undone for the prompt

    @property
    def n_virtual(self) -> int:
        return self.prompt.shape[0]

    def virtual_ids(self, batch: int = 1, device: torch.device | str | None = None) -> Tensor:
        """(batch, n) the virtual token ids V .. V+n-1."""
        ids = torch.arange(self.num_embeddings, self.num_embeddings + self.n_virtual, device=device)
        return ids.expand(batch, -1)

    def forward(self, ids: Tensor) -> Tensor:
        v = self.num_embeddings
        virtual = ids >= v
        x = nn.functional.embedding(ids.clamp(max=v - 1), self.weight, self.padding_idx)
        p = self.prompt[(ids - v).clamp(min=0)].to(x.dtype)  # an id past V + n - 1 fails, as past V would
        if self.input_scale != 1.0:  # embed_tokens scales every row: P itself must reach the first block
            p = p / torch.tensor(self.input_scale, dtype=x.dtype)
        return torch.where(virtual[..., None], p, x)

    def prepend(self, ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(B, n + T) ids with the virtual ids first, and the attention mask with n ones first (None stays None)."""
        virtual = self.virtual_ids(ids.shape[0], ids.device).to(ids.dtype)
        if attention_mask is not None:
            ones = attention_mask.new_ones(ids.shape[0], self.n_virtual)
            attention_mask = torch.cat((ones, attention_mask), dim=1)
        return torch.cat((virtual, ids), dim=1), attention_mask

    def hidden_states(self, model: nn.Module, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The final-normed states (B, T, d) of the real tokens `ids` (B, T) behind the prompt (no cache)."""
        full, mask = self.prepend(ids, attention_mask)
        return model.hidden_states(full, mask)[:, self.n_virtual :]

    def decode_forward(self, model: nn.Module, n_tokens: int) -> Forward:
        """The decode loop's forward for sequences of up to `n_tokens` real tokens: a fresh `KVCache` of
        n + n_tokens slots; the first call (the prompts) gets the virtual ids in front."""
        cache = KVCache(self.n_virtual + n_tokens)

        def forward(ids: Tensor, mask: Tensor | None, first: bool) -> Tensor:
            if first:
                ids, mask = self.prepend(ids, mask)
            return last_logits(model, ids, cache, mask)

        return forward

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} + {self.n_virtual} virtual, {self.embedding_dim}"


def text_init_ids(ids: Sequence[int], n: int) -> list[int]:
    """PEFT's TEXT init ids: `ids` cut to n, or repeated ceil(n / len) times and cut to n."""
    if not ids:
        raise PromptTuningError("init text: encodes to no tokens")
    ids = list(ids)
    return (ids * math.ceil(n / len(ids)))[:n]


def add_prompt_tuning(
    model: nn.Module,
    num_virtual_tokens: int,
    *,
    init: str = "random",
    text: str | None = None,
    tokenizer: Any = None,
    init_ids: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> PromptEmbedding:
    """Give `model` a trainable prompt of `num_virtual_tokens` rows (module docstring); returns the new
    `model.embed`. init "text": from `text` encoded by `tokenizer`, or from token ids `init_ids`."""
    check_positive("num_virtual_tokens", num_virtual_tokens)
    check_choice("init", init, INITS)
    check_untuned(model)
    embed = model.embed
    if not isinstance(embed, nn.Embedding):
        raise PromptTuningError(f"model.embed is a {type(embed).__name__}; prompt tuning extends an nn.Embedding")
    n, (v, d) = num_virtual_tokens, embed.weight.shape
    scale = model.config.d_model**0.5 if model.config.embed_scale else 1.0
    weight = embed.weight.detach() * torch.tensor(scale, dtype=embed.weight.dtype)  # the rows the model reads
    if init == "random":
        prompt = torch.randn(n, d, generator=generator, device="cpu" if generator is None else generator.device)
    elif init == "sample_vocab":
        prompt = weight[torch.randint(0, v, (n,), generator=generator).to(weight.device)]
    else:
        if init_ids is None:
            if text is None or tokenizer is None:
                raise PromptTuningError("init='text' needs text= and tokenizer=, or init_ids=")
            init_ids = encode_prompt(tokenizer, text)
        ids = text_init_ids(init_ids, n)
        bad = [i for i in ids if not 0 <= i < v]
        if bad:
            raise PromptTuningError(f"init ids: {bad[0]} is outside the model's vocabulary (0 <= id < {v})")
        prompt = weight[torch.tensor(ids, device=weight.device)]
    tuned = PromptEmbedding(embed, prompt.clone(), init, text if init == "text" else None, input_scale=scale)
    model.embed = tuned.train(embed.training)
    return model.embed


def remove_prompt_tuning(model: nn.Module) -> Tensor:
    """Put a plain nn.Embedding (the same weight Parameter) back at `model.embed`; returns the prompt (n, d)."""
    embed = model.embed
    if not isinstance(embed, PromptEmbedding):
        raise PromptTuningError("the model has no prompt (model.embed is not a PromptEmbedding)")
    plain = nn.Embedding(embed.num_embeddings, embed.embedding_dim, embed.padding_idx, device="meta")
    plain.weight = embed.weight
    model.embed = plain.train(embed.training)
    return embed.prompt.detach()


def train_only_prompt(model: nn.Module) -> int:
    """Freeze everything but the model's prompt or prefix (`find_tuning`); returns its parameter count."""
    tuning = find_tuning(model)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [tuning.prompt] if isinstance(tuning, PromptEmbedding) else list(tuning.parameters())
    for p in trainable:
        p.requires_grad_(True)
    return sum(p.numel() for p in trainable)


def find_tuning(model: nn.Module) -> nn.Module:
    """The model's prompt (`model.embed`, a `PromptEmbedding`) or prefix (`model.prefix_encoder`, a
    `prefix_tuning.PrefixEncoder`)."""
    embed, prefix = getattr(model, "embed", None), getattr(model, "prefix_encoder", None)
    found = [m for m in (embed if isinstance(embed, PromptEmbedding) else None, prefix) if isinstance(m, nn.Module)]
    if len(found) != 1:
        raise PromptTuningError("the model has no prompt or prefix: add_prompt_tuning or add_prefix_tuning first"
                                if not found else "the model has both a prompt and a prefix")  # fmt: skip
    return found[0]


def check_untuned(model: nn.Module) -> None:
    """Raise `PromptTuningError` if the model has a prompt or a prefix already."""
    try:
        find_tuning(model)
    except PromptTuningError:
        return
    raise PromptTuningError("the model has a prompt or prefix already: remove it first")


class PromptLearningObjective(Objective):
    """Next-token cross entropy of a prompt- or prefix-tuned `model` (`find_tuning`) on batch["input_ids"] (B, T)
    against batch["targets"] (B, T): one example per row, right-padded (`SFTLoader(packing=False)`); the loss sums
    over the real targets (!= -100), which are those of the rows alone (the virtual tokens predict nothing).
    An "attention_mask" in the batch is passed on; packed rows (a second document with targets) are refused.
    chunked: the LM head fused into the loss (`chunked_cross_entropy`)."""

    def __init__(self, model: nn.Module, *, chunked: bool = False) -> None:
        super().__init__()
        find_tuning(model)  # a clear error now, not at the first batch
        self.model, self.chunked = model, chunked

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:
        ids, targets = batch["input_ids"], batch["targets"]
        doc_ids = batch.get("doc_ids")
        if doc_ids is not None and bool(((doc_ids > 0) & (targets != IGNORE_INDEX)).any()):
            raise PromptTuningError("the batch packs several examples in a row; prompt and prefix tuning need one "
                                    "example per row (SFTLoader(packing=False))")  # fmt: skip
        hidden = find_tuning(self.model).hidden_states(self.model, ids, batch.get("attention_mask"))
        if self.chunked:
            softcap = self.model.config.final_softcap
            out = chunked_cross_entropy(hidden, self.model.head_weight, targets, softcap=softcap, reduction="sum")
        else:
            out = cross_entropy(self.model.logits(hidden), targets, reduction="sum")
        return ObjectiveOutput(loss=out.loss, tokens=out.tokens, metrics={"loss": out.ce})


def generate_tuned(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    *,
    tuning: nn.Module | None = None,
    **overrides: Any,
) -> Iterator[GenerationEvent]:
    """`infer.generate` for a prompt- or prefix-tuned model (`tuning`, default `find_tuning(model)`): the same
    events, the prompt's checks and stop rules, with the n virtual tokens taking n places of the context."""
    params = dataclasses.replace(params or SamplingParams(), **overrides)
    tuning = find_tuning(model) if tuning is None else tuning
    n, context = tuning.n_virtual, model.config.max_seq_len
    ids = encode_prompt(tokenizer, prompt)
    check_prompt(ids, model.config.vocab_size, context - n, from_text=isinstance(prompt, str))
    device = next(model.parameters()).device
    row = sequence_state(model, tokenizer, ids, params, 0, device)
    row.budget = min(params.max_tokens, context - n - len(ids))
    forward = tuning.decode_forward(model, len(ids) + row.budget)
    events = decode(forward, DecodeBatch([row], tokenizer.vocab_size), torch.tensor([ids], device=device))
    return (event for _, event in events)
