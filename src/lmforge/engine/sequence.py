"""One sequence in the engine: its tokens, how many of them have keys in the cache, its blocks, its output.

A sequence's `tokens` are its prompt followed by what it generated. `num_computed` of them have their keys and
values in the paged cache; the others are still to be fed to the model. That one number covers every phase:

    prefill          num_computed < len(tokens) - 1: a chunk of the uncomputed tokens goes to the next forward
    decode           num_computed == len(tokens) - 1: the last sampled token goes to the next forward (with up to
                     `max_drafts` draft tokens after it when the engine speculates: `engine.spec_decode`)
    after preemption num_computed == 0 again: the whole prompt and output are recomputed (then decoding resumes);
                     or, preempted by swap (`engine.swap`), num_computed stays and its blocks wait in host memory

A forward that computes a sequence up to its last token gives the logits of its next token, which is sampled and
appended. Stop rules, text and the sampling generator are `infer.decode.SequenceState`'s (the one decode loop's
per-sequence state), so the engine stops and detokenizes exactly as `generate` does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from lmforge.infer.decode import SequenceState


class Status(enum.Enum):
    WAITING = "waiting"  # no blocks: not admitted yet, or preempted (recompute or swapped out)
    RUNNING = "running"  # holds blocks for all its tokens
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sequence (one of a request's `n` / `best_of` samples)."""

    tokens: list[int]  # the prompt, then the generated tokens
    prompt_len: int
    arrival: int = 0  # the order it arrived in (forked samples share their parent's): lower runs first
    request_id: str = ""
    index: int = 0  # which sample of its request
    state: SequenceState | None = None  # stop rules, text decoder, generator (None in bookkeeping-only tests)
    adapter: int = 0  # the LoRA adapter its rows run with (`finetune.multi_lora`; 0: the base model)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full computed blocks
    num_computed: int = 0
    host_blocks: list[int] = field(default_factory=list)  # its computed blocks in host memory while swapped out
    status: Status = Status.WAITING
    forks: int = 0  # samples to fork from it once its prompt is computed (n > 1)
    lookahead: int = 0  # the most draft tokens one decode step may feed after its last token (0: no speculation)
    draft_lag: int = 0  # the last computed tokens the draft model's cache does not hold yet (0 or 1: spec_decode)
    text: str = ""  # the text released so far
    logprobs: list[dict[int, float]] | None = None  # per generated token, when asked for
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None

    @property
    def remaining(self) -> int:
        """Tokens not yet fed to the model."""
        return len(self.tokens) - self.num_computed

    @property
    def max_drafts(self) -> int:
        """Draft tokens its next step may feed after its last token: none while it has no output yet (the prompt
        is computed, or its first token drawn, the plain way); else up to `lookahead`, fewer than the tokens its
        budget still allows (a round emits its accepted drafts and one more token)."""
        if self.remaining != 1 or len(self.tokens) == self.prompt_len:
            return 0
        left = self.lookahead if self.state is None else self.state.budget - len(self.output) - 1
        return max(0, min(self.lookahead, left))

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
