"""Log-likelihood of continuations given contexts, as lm-evaluation-harness computes it for Hugging Face models
(lm_eval 0.4.13: `TemplateLM.loglikelihood`, `_encode_pair`, `HFLM.tok_encode`, `HFLM._loglikelihood_tokens`).

For a request (context c, continuation y) the model scores y's tokens y_1 … y_m after c's tokens:

    log p(y | c) = Σ_j log softmax(z_{j-1})[y_j]          z_{j-1}: the logits at the position before y_j
    is_greedy    = ∀ j: argmax z_{j-1} = y_j              (y is what greedy decoding would produce)

**Tokens** (`encode_pair`). The context's trailing whitespace moves to the front of the continuation (so that
" Paris" is one word-initial token, not " " + "Paris"); then the *whole* string c + y is encoded and split after as
many tokens as c alone encodes to: context ids = enc(c), continuation ids = enc(c + y)[len(enc(c)):]. `encode` is
HFLM's `tok_encode`: special tokens in the text are recognised, and the bos token goes first when the tokenizer
adds one (`add_bos=None`: `tokenizer.add_bos_token`; True / False as HFLM's ``add_bos_token=`` argument forces
it), except when the text already starts with the bos token's text. An empty context is the prefix token alone
(bos, else eos), unless the continuation already starts with it.

**Truncation.** The model reads (context + continuation)[-(L+1):][:-1], L = `max_length` (default: the model's
max_seq_len): the left is cut so at most L tokens go in, and the last token is only predicted. A continuation of
more than L tokens is refused.

**Batches.** Requests are sorted longest first (lm-eval's order), `batch_size` at a time are right-padded to the
longest and run through one forward without a mask: the model is causal, so padding on the right changes nothing
that comes before it; the head runs only on the positions that predict continuation tokens. The log-softmax is
float32 (lm-eval's default `softmax_dtype`), the sum is float64. Results
come back in the requests' order and do not depend on `batch_size` beyond float rounding (≤ 1e-4 checked).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmforge.infer.generate import eos_token_id
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.base import BaseTokenizer
from lmforge.utils.errors import LmforgeError

__all__ = ["LoglikelihoodInputError", "encode", "encode_pair", "loglikelihood", "loglikelihood_tokens", "prefix_id"]

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


class LoglikelihoodInputError(LmforgeError):
    """A request cannot be scored (``requests[3]: ...``)."""


def bos_id(tokenizer: BaseTokenizer) -> int | None:
    """The id of the tokenizer's bos token, or None."""
    return eos_token_id(tokenizer, "bos_token")


def prefix_id(tokenizer: BaseTokenizer) -> int:
    """HFLM's `prefix_token_id`: what an empty context is made of, the bos token, else the eos token."""
    found = bos_id(tokenizer)
    found = eos_token_id(tokenizer) if found is None else found
    if found is None:
        raise LoglikelihoodInputError("an empty context needs a bos or eos token, and the tokenizer has neither")
    return found


def encode(tokenizer: BaseTokenizer, text: str, add_bos: bool | None = None) -> list[int]:
    """HFLM's `tok_encode(text)`: special tokens recognised, bos first when added (`add_bos`, None: the
    tokenizer's `add_bos_token`) unless the text already starts with the bos token."""
    add = tokenizer.add_bos_token if add_bos is None else add_bos
    ids = tokenizer.encode(text, allowed_special="all")
    bos = bos_id(tokenizer)
    if not add or bos is None or text.startswith(tokenizer.bos_token or ""):
        return ids
    return [bos, *ids]


def encode_pair(
    tokenizer: BaseTokenizer, context: str, continuation: str, add_bos: bool | None = None
) -> Request:
    """(context ids, continuation ids) as lm-eval splits them (module docstring)."""
    if context == "":
        cont = tokenizer.encode(continuation, allowed_special="all")
        prefix = prefix_id(tokenizer)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation, add_bos)
    n_context = len(encode(tokenizer, context, add_bos))
    return whole[:n_context], whole[n_context:]


def check_requests(requests: Sequence[Request], max_length: int) -> None:
    """Refuse a request with no context or continuation tokens, or a continuation longer than `max_length`."""
    for i, (context, continuation) in enumerate(requests):
        if not context:
            raise LoglikelihoodInputError(f"requests[{i}]: the context has no tokens")
        if not continuation:
            raise LoglikelihoodInputError(f"requests[{i}]: the continuation has no tokens")
        if len(continuation) > max_length:
            raise LoglikelihoodInputError(
                f"requests[{i}]: the continuation has {len(continuation)} tokens, more than max_length {max_length}"
            )


@torch.inference_mode()
def loglikelihood_tokens(
    model: Transformer,
    requests: Sequence[Request],
    *,
    batch_size: int = 1,
    max_length: int | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is_greedy) for each (context ids, continuation ids), in order (module
    docstring: truncation from the left to `max_length`, batches of `batch_size` right-padded)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise LoglikelihoodInputError(f"batch_size={batch_size}: must be at least 1")
    if max_length is not None and not 1 <= max_length <= model.config.max_seq_len:
        raise LoglikelihoodInputError(f"max_length={max_length}: must be 1 … the model's max_seq_len "
                                      f"({model.config.max_seq_len})")  # fmt: skip
    max_length = max_length or model.config.max_seq_len
    check_requests(requests, max_length)
    device = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    with tqdm(total=len(requests), desc="loglikelihood", unit="request", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = [(requests[i][0] + requests[i][1])[-(max_length + 1) :][:-1] for i in batch]
            width = max(map(len, inputs))
            ids = torch.tensor([row + [0] * (width - len(row)) for row in inputs], device=device)
            hidden = model.hidden_states(ids)
            for row, i in enumerate(batch):
                cont = requests[i][1]
                end = len(inputs[row])
                scored = torch.log_softmax(model.logits(hidden[row, end - len(cont) : end]).float(), dim=-1)
                target = torch.tensor(cont, device=device)
                total = scored.gather(-1, target[:, None]).sum(dtype=torch.float64).item()
                results[i] = (total, bool((scored.argmax(-1) == target).all()))
            bar.update(len(batch))
    return results


def loglikelihood(
    model: Transformer,
    tokenizer: BaseTokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    add_bos: bool | None = None,
    **options,
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is_greedy) for each (context, continuation) text pair, as lm-eval's
    `HFLM.loglikelihood` (module docstring); `options` as `loglikelihood_tokens`'s (batch_size, max_length,
    progress)."""
    pairs = [encode_pair(tokenizer, context, continuation, add_bos) for context, continuation in requests]
    return loglikelihood_tokens(model, pairs, **options)
