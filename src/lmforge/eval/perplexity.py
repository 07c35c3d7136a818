"""Perplexity as llama.cpp's `llama-perplexity` computes it (tools/perplexity/perplexity.cpp, `perplexity()`).

The text is tokenized once, as `common_tokenize(ctx, text, true)` does: special tokens are plain text, and the bos
token goes first when the vocabulary adds one (`add_bos_token`). Its N tokens are cut into n_chunk = ⌊N / n_ctx⌋
chunks of n_ctx tokens (the tail is dropped; `max_chunks` caps the count; llama.cpp refuses N < 2·n_ctx). Chunk c
is x = tokens[c·n_ctx : (c+1)·n_ctx], its first token replaced by bos when the vocabulary adds one, evaluated alone
from position 0. Only its second half is scored, so that every scored token has at least n_ctx/2 tokens of context:
with f = ⌊n_ctx/2⌋ and z_j the logits at position j,

    nll_t = -log softmax(z_{t-1})[x_t]                    t = f+1 … n_ctx-1: n_ctx - f - 1 tokens per chunk

and over the M scored tokens of all chunks

    PPL = exp(μ),   μ = (1/M) Σ nll_t
    ±   = PPL · sqrt((⟨nll²⟩ - μ²) / (M - 1))

the ± being the standard error of μ carried to PPL to first order, what llama.cpp prints as
``Final estimate: PPL = … +/- …`` (no ± when the variance is not positive, e.g. M = 1: NaN here).

Bits per byte (`with_bits_per_byte`) rates the same scored tokens by the text they stand for, so that models with
different tokenizers compare: with B the UTF-8 bytes of the M scored tokens (`tokenizer.token_to_bytes`; the first
half of each chunk, which only gives context, is not counted, nor is the tail after the last whole chunk),

    bits/byte = Σ nll_t / (B · ln 2)

Numerics as llama.cpp's `log_softmax`: the max and exp(z - max) in float32, their sum in float64,
nll = log Σ - (z[x] - max) in float64, and μ, ⟨nll²⟩ in float64.

Shapes: chunks (n_chunk, n_ctx); `batch_size` chunks go through one forward, (B, n_ctx) -> hidden states, and only the
scored positions f … n_ctx-2 through the head -> logits (B, n_ctx - f - 1, vocab). The figure does not depend on
`batch_size`: each chunk is a row of its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.model.transformer import Transformer
from lmforge.tokenizer.base import BaseTokenizer
from lmforge.utils.errors import LmforgeError

__all__ = ["PerplexityInputError", "PerplexityResult", "check_settings", "chunk_bos", "chunk_ids", "perplexity",
           "scored_bytes", "summarize", "text_perplexity", "token_nll", "tokenize", "too_short",
           "with_bits_per_byte"]  # fmt: skip

FLAGS = {"n_ctx": "--ctx", "batch_size": "--batch", "max_chunks": "--chunks"}  # the `lmforge eval ppl` flags


class PerplexityInputError(LmforgeError):
    """A perplexity setting is wrong: ``n_ctx=1024: ...``; `cli_message` names the command-line flag instead
    (``--ctx=1024: ...``)."""

    def __init__(self, name: str, value: object, rule: str) -> None:
        self.name, self.value, self.rule = name, value, rule
        super().__init__(f"{name}={value!r}: {rule}")

    @property
    def cli_message(self) -> str:
        return f"{FLAGS[self.name]}={self.value!r}: {self.rule}"


@dataclass(frozen=True)
class PerplexityResult:
    """`ppl` = exp(`nll`), `nll` the mean negative log-likelihood (nats per scored token), `stderr` llama.cpp's ±
    on `ppl`, over `tokens_scored` tokens of `chunks` chunks of `n_ctx` tokens; `bits_per_byte` over the
    `bytes_scored` UTF-8 bytes of those tokens, when a tokenizer was at hand (`with_bits_per_byte`), else None."""

    ppl: float
    nll: float
    stderr: float
    tokens_scored: int
    chunks: int
    n_ctx: int
    bytes_scored: int | None = None
    bits_per_byte: float | None = None


def chunk_bos(tokenizer: BaseTokenizer) -> int | None:
    """The bos id when the tokenizer adds one (`add_bos_token`): what leads the text and every chunk; else None."""
    if not tokenizer.add_bos_token or tokenizer.bos_token is None:
        return None
    return tokenizer.token_to_id(tokenizer.bos_token)


def tokenize(tokenizer: BaseTokenizer, text: str) -> list[int]:
    """llama.cpp's `common_tokenize(ctx, text, true)`: special tokens as plain text, bos first when added."""
    bos = chunk_bos(tokenizer)
    return ([] if bos is None else [bos]) + tokenizer.encode_ordinary(text)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[targets] in float64, as llama.cpp's `log_softmax`: logits (..., vocab) in float32,
    targets (...) -> (...)."""
    logits = logits.float()
    top = logits.max(dim=-1, keepdim=True).values
    sum_exp = (logits - top).exp().sum(dim=-1, dtype=torch.float64)
    picked = (logits.gather(-1, targets.unsqueeze(-1)) - top).squeeze(-1)
    return sum_exp.log() - picked.double()


def check_settings(model: Transformer, n_ctx: int, batch_size: int = 1, max_chunks: int | None = None) -> None:
    """Raise `PerplexityInputError` for settings `perplexity` cannot run with on `model`."""
    if n_ctx < 3:
        raise PerplexityInputError("n_ctx", n_ctx, "must be at least 3 (a chunk scores n_ctx - n_ctx//2 - 1 tokens)")
    if n_ctx > model.config.max_seq_len:
        raise PerplexityInputError("n_ctx", n_ctx, f"larger than the model's max_seq_len ({model.config.max_seq_len})")
    if batch_size < 1:
        raise PerplexityInputError("batch_size", batch_size, "must be at least 1")
    if max_chunks is not None and max_chunks < 1:
        raise PerplexityInputError("max_chunks", max_chunks, "must be at least 1 (or None: every chunk)")


def too_short(n_tokens: int, n_ctx: int) -> str | None:
    """Why `n_tokens` tokens are too few for a context of `n_ctx` (llama.cpp's rule: at least 2·n_ctx), or None."""
    if n_tokens >= 2 * n_ctx:
        return None
    return f"only {n_tokens} tokens; perplexity with a context of {n_ctx} needs at least 2 × n_ctx = {2 * n_ctx}"


def chunk_ids(
    tokens: Sequence[int], n_ctx: int, bos_id: int | None = None, max_chunks: int | None = None
) -> torch.Tensor:
    """The chunks a forward sees, (n_chunk, n_ctx): the first n_chunk whole chunks of `tokens`, each led by
    `bos_id` when given."""
    n_chunk = len(tokens) // n_ctx if max_chunks is None else min(max_chunks, len(tokens) // n_ctx)
    chunks = torch.tensor(list(tokens[: n_chunk * n_ctx]), dtype=torch.long).view(n_chunk, n_ctx)
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


def summarize(nll: torch.Tensor, chunks: int, n_ctx: int) -> PerplexityResult:
    """llama.cpp's final estimate from the nll (float64, any shape) of the tokens scored in `chunks` chunks."""
    count = nll.numel()
    mean = nll.mean().item()
    var = (nll * nll).mean().item() - mean * mean
    ppl = math.exp(mean)
    stderr = ppl * math.sqrt(var / (count - 1)) if var > 0 else math.nan
    return PerplexityResult(ppl=ppl, nll=mean, stderr=stderr, tokens_scored=count, chunks=chunks, n_ctx=n_ctx)


@torch.inference_mode()
def perplexity(
    model: Transformer,
    tokens: Sequence[int],
    *,
    n_ctx: int = 512,
    bos_id: int | None = None,
    batch_size: int = 1,
    max_chunks: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """llama.cpp's perplexity of `model` on the token ids `tokens` (module docstring): chunks of `n_ctx` tokens,
    each led by `bos_id` when given (`chunk_bos(tokenizer)`), `batch_size` chunks per forward, at most
    `max_chunks` chunks. The settings are checked before any forward (`PerplexityInputError`); `progress` shows a
    tqdm bar of chunks with the running PPL."""
    from tqdm.auto import tqdm

    check_settings(model, n_ctx, batch_size, max_chunks)
    if (reason := too_short(len(tokens), n_ctx)) is not None:
        raise PerplexityInputError("n_ctx", n_ctx, f"the text has {reason}")
    device = next(model.parameters()).device
    chunks = chunk_ids(tokens, n_ctx, bos_id, max_chunks).to(device)
    first = n_ctx // 2
    nlls: list[torch.Tensor] = []
    with tqdm(total=len(chunks), desc="perplexity", unit="chunk", disable=not progress) as bar:
        for batch in chunks.split(batch_size):
            logits = model.logits(model.hidden_states(batch)[:, first:-1])
            nlls.append(token_nll(logits, batch[:, first + 1 :]).flatten().cpu())
            bar.update(len(batch))
            bar.set_postfix(ppl=f"{math.exp(torch.cat(nlls).mean().item()):.4f}")
    return summarize(torch.cat(nlls), len(chunks), n_ctx)


def scored_bytes(tokenizer: BaseTokenizer, tokens: Sequence[int], n_ctx: int, max_chunks: int | None = None) -> int:
    """The UTF-8 bytes of the tokens `perplexity` scores: ids n_ctx//2 + 1 … n_ctx - 1 of each whole chunk."""
    scored = chunk_ids(tokens, n_ctx, max_chunks=max_chunks)[:, n_ctx // 2 + 1 :]
    return sum(len(tokenizer.token_to_bytes(i)) for i in scored.flatten().tolist())


def with_bits_per_byte(
    result: PerplexityResult, tokenizer: BaseTokenizer, tokens: Sequence[int], max_chunks: int | None = None
) -> PerplexityResult:
    """`result` (of `perplexity` over `tokens`) with its bits per byte: Σ nll / (B · ln 2), B the scored bytes."""
    n_bytes = scored_bytes(tokenizer, tokens, result.n_ctx, max_chunks)
    bits = result.nll * result.tokens_scored / (n_bytes * math.log(2)) if n_bytes else math.nan
    return dataclasses.replace(result, bytes_scored=n_bytes, bits_per_byte=bits)


def text_perplexity(model: Transformer, tokenizer: BaseTokenizer, text: str, **options) -> PerplexityResult:
    """`perplexity` of `text` tokenized as llama.cpp does (`tokenize`), every chunk led by bos when the tokenizer
    adds one, with its bits per byte; `options` as `perplexity`'s (n_ctx, batch_size, max_chunks, progress)."""
    tokens = tokenize(tokenizer, text)
    result = perplexity(model, tokens, bos_id=chunk_bos(tokenizer), **options)
    return with_bits_per_byte(result, tokenizer, tokens, options.get("max_chunks"))
