"""What a request asks of the engine, and what it gets back (vLLM's shapes, which users of vLLM know).

`SamplingParams` is `infer.sampling.SamplingParams` (temperature, top-k/p, min-p, penalties, seed, stop strings
and ids, ignore_eos, max_tokens) plus:

    n         samples returned per prompt; they share the prompt's computed blocks (fork, copy-on-write)
    best_of   samples drawn (>= n); the n with the highest cumulative log-probability are returned
    logprobs  per generated token, the log-probabilities of the `logprobs` most likely tokens and of the sampled
              one (0: the sampled one only), log softmax of the model's logits before any sampling transform
    scaled_logprobs  report (and rank best_of by) the log-probabilities of logits / temperature instead, the
              distribution temperature samples from before top-k/p and penalties (what a beam search at
              temperature T ranks by: `engine.async_beam_search`); no effect at temperature 0

Sample k of a seeded request draws from seed + k (mod 2**64), so `n` seeded samples differ and each repeats.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.configfile import is_int
from lmforge.infer import sampling
from lmforge.infer.sampling import SamplingParamsError

MAX_LOGPROBS = 20  # as the OpenAI API's top_logprobs


@dataclass
class SamplingParams(sampling.SamplingParams):
    """`infer.sampling.SamplingParams` plus `n`, `best_of`, `logprobs` and `scaled_logprobs` (see the module
    docstring)."""

    n: int = 1
    best_of: int | None = None
    logprobs: int | None = None
    scaled_logprobs: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_int(self.n) or self.n < 1:
            raise SamplingParamsError("n", self.n, "must be an integer >= 1")
        if self.best_of is not None and (not is_int(self.best_of) or self.best_of < self.n):
            raise SamplingParamsError("best_of", self.best_of, f"must be None or an integer >= n ({self.n})")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise SamplingParamsError("logprobs", self.logprobs, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        if not isinstance(self.scaled_logprobs, bool):
            raise SamplingParamsError("scaled_logprobs", self.scaled_logprobs, "must be true or false")

    @property
    def logprob_temperature(self) -> float:
        """What the logits are divided by before the log softmax the request reports."""
        return self.temperature if self.scaled_logprobs and self.temperature > 0 else 1.0

    @property
    def samples(self) -> int:
        """Sequences drawn for the request: best_of, else n."""
        return self.best_of or self.n


@dataclass
class CompletionOutput:
    """One sample of a request so far: its text and ids (cumulative), why it ended, its log-probabilities."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort"; None while it runs
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """A request's outputs so far (one per sample); `finished` on the last one."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


@dataclass
class EngineStats:
    """The engine now (requests running and waiting, pool blocks) and totals since it started."""

    running: int
    waiting: int
    blocks_used: int
    blocks_free: int
    prefix_cache_hit_rate: float  # prompt tokens found computed / prompt tokens admitted
    prompt_tokens: int
    generated_tokens: int
    draft_tokens: int = 0  # speculative decoding: draft tokens proposed for verification
    accepted_draft_tokens: int = 0  # ... and accepted by the target (acceptance rate: accepted / proposed)
    swapped: int = 0  # sequences preempted by swap, their blocks in host memory now (`engine.swap`)
