"""The engine: requests in, tokens out, many requests sharing every forward. `llm.LLM` (offline) and
`async_llm.AsyncLLM` (streaming) are its two faces, in vLLM's shape.

One step (`Engine.step`):

    schedule   the scheduler picks the running sequences' chunks (decode: 1 token, prefill: up to the budget) and
               admits waiting ones (prefix-cache hits skip their cached tokens)          scheduler.py, block_manager.py
    draft      with `speculative_config`, decoding rows get up to K draft tokens (prompt lookup, or a draft model
               over its own paged cache); the forward verifies them and the acceptance rules decide which are
               kept; the rest are rolled back                                         spec_decode.py, speculative.py
    forward    one `hidden_states` forward over the padded (B, T) batch through the paged cache       runner.py
    computed   each row's computed length advances; full blocks get their prefix hashes
    sample     rows that reached their last token sample one token with their own parameters and generator
               (`infer.decode.DecodeBatch.step`: penalties, warpers, stop ids and strings, text, budget), so a
               request's tokens are those `infer.generate.generate` gives it alone (the same draws when seeded)
    fork       a request with n (or best_of) > 1 samples forks its sequence once the prompt is computed: the
               samples share the prompt's blocks (copy-on-write) and each draws its first token from the same
               logits
    finish     a finished sequence frees its blocks; a finished request yields its last `RequestOutput`

A request is checked when it arrives (prompt ids in the vocabulary, the prompt shorter than `max_model_len`, the
sampling parameters, `n` within `max_num_seqs`), before anything is scheduled; each sample's budget is
max_tokens cut to the room the prompt leaves in `max_model_len`. The pool must hold one sequence of
`max_model_len` tokens, so the scheduler can always make progress by preemption. By default it holds
`max_num_seqs` full sequences, but no more than `kv_cache_gib` GiB of keys and values (as vLLM sizes its pool from
the memory it may use): SmolLM2-135M at 8192 tokens would otherwise ask 32 x 360 MiB in float32; a draft model's
keys and values (the same blocks in its own pool) count in that budget. Preempted sequences swap their computed
blocks to `swap_space_gib` GiB of host memory while it has room (`engine.swap`; 0: always recompute).

Adapters. A model whose LoRA adapters were stacked (`finetune.multi_lora.stack_adapters`) serves them all at once:
each request names its adapter (`make_request(..., adapter=name)`), its rows run with it within any batch, and
prefix caching never shares blocks across adapters. A prompt- or prefix-tuned model's virtual tokens lead every
sequence (`engine.tuning`), taking their places of `max_model_len`.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.configfile import check, check_finite, check_positive
from lmforge.engine.block_manager import BlockManager
from lmforge.engine.params import CompletionOutput, EngineStats, RequestOutput, SamplingParams
from lmforge.engine.runner import ModelRunner
from lmforge.engine.scheduler import ScheduledBatch, Scheduler
from lmforge.engine.sequence import Sequence
from lmforge.engine.spec_decode import Draft, drafter, load_draft, masked, verify
from lmforge.engine.speculative import SpeculativeConfig
from lmforge.engine.swap import HostBlocks
from lmforge.engine.tuning import lead_ids
from lmforge.finetune.multi_lora import served_adapters
from lmforge.infer import sampling
from lmforge.infer.cache_memory import model_bytes_per_token
from lmforge.infer.decode import DecodeBatch, SequenceState
from lmforge.infer.generate import check_prompt, encode_prompt, sequence_state
from lmforge.infer.sampling import SEED_LIMIT, GenerationInputError
from lmforge.tokenizer.base import BaseTokenizer

Prompt = str | Seq[int]


KV_CACHE_GIB = 2.0  # the default memory budget of the KV-cache pool (GiB)
SWAP_SPACE_GIB = 4.0  # the default host memory for preemption by swap (GiB; vLLM's default), allocated when used

@dataclass(eq=False)
class Request:
    """One request: its prompt and parameters, and its samples (one sequence until the prompt is computed)."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    aborted: bool = False
    adapter: int = 0  # the LoRA adapter it runs with (`Engine.adapters`: k is adapters[k - 1]; 0: the base)
    lead: list[int] = field(default_factory=list)  # a prompt- or prefix-tuned model's lead ids (`engine.tuning`)

    @property
    def tokens(self) -> list[int]:
        """Its sequences' first tokens: the lead, then the prompt."""
        return self.lead + self.prompt_ids

    @property
    def finished(self) -> bool:
        done = len(self.seqs) == self.params.samples and all(s.finished for s in self.seqs)
        return self.aborted or done

    def output(self) -> RequestOutput:
        """The outputs so far: every sample in index order; once finished with best_of > n, the n samples of the
        highest cumulative log-probability."""
        seqs, finished = sorted(self.seqs, key=lambda s: s.index), self.finished
        if finished and len(seqs) > self.params.n:
            seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[: self.params.n]
        outputs = [_completion(i, seq) for i, seq in enumerate(seqs)]
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_ids), outputs, finished)


def _completion(index: int, seq: Sequence) -> CompletionOutput:
    logprobs = None if seq.logprobs is None else [dict(d) for d in seq.logprobs]
    return CompletionOutput(index, seq.text, list(seq.output), seq.finish_reason, logprobs, seq.cumulative_logprob)


def reported_logprobs(logits: torch.Tensor, params: Seq[SamplingParams]) -> torch.Tensor:
    """(R, V) the log-probabilities row r reports: log softmax of logits[r] / params[r].logprob_temperature (1: the
    model's own; T for a request with `scaled_logprobs`)."""
    scales = [p.logprob_temperature for p in params]
    if all(t == 1.0 for t in scales):
        return logits.log_softmax(-1)
    return (logits / torch.tensor(scales, dtype=logits.dtype, device=logits.device)[:, None]).log_softmax(-1)


def as_params(params: sampling.SamplingParams | None) -> SamplingParams:
    """The engine's `SamplingParams` of `params` (None: the defaults; generation's own: n = 1)."""
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, sampling.SamplingParams):
        return SamplingParams(**{f.name: getattr(params, f.name) for f in dataclasses.fields(params)})
    raise GenerationInputError("params", f"expected SamplingParams, got {type(params).__name__}")


class Engine:
    """The step loop over one model and one KV-cache pool (see the module docstring).

    `speculative_config`: None, or speculative decoding's settings (a dict in vLLM's shape or a
    `speculative.SpeculativeConfig`: method "ngram" or a draft `model`, num_speculative_tokens, ...);
    `compile`: the runners compile their forwards."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: BaseTokenizer,
        *,
        max_num_seqs: int = 32,
        max_model_len: int | None = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_batched_tokens: int = 512,
        enable_prefix_caching: bool = True,
        kv_cache_gib: float = KV_CACHE_GIB,
        swap_space_gib: float = SWAP_SPACE_GIB,
        speculative_config: SpeculativeConfig | dict | None = None,
        compile: bool = False,
    ) -> None:
        context = model.config.max_seq_len
        max_model_len = context if max_model_len is None else max_model_len
        sizes = {"max_num_seqs": max_num_seqs, "max_model_len": max_model_len, "block_size": block_size,
                 "max_num_batched_tokens": max_num_batched_tokens}  # fmt: skip
        for name, value in sizes.items():
            check_positive(name, value)
        check(max_model_len <= context, "max_model_len", max_model_len, f"must be <= the model's context {context}")
        check(isinstance(compile, bool), "compile", compile, "must be True or False")
        self.speculative = SpeculativeConfig.of(speculative_config)
        draft = None
        if self.speculative is not None and self.speculative.method == "draft_model":
            draft = load_draft(self.speculative, model, tokenizer, max_model_len)
        per_seq = -(-max_model_len // block_size)
        block_bytes = block_size * sum(model_bytes_per_token(m.config, next(m.parameters()).element_size())
                                       for m in (model, draft) if m is not None)  # fmt: skip
        if num_blocks is None:  # room for max_num_seqs full sequences, within the memory budget
            check_finite("kv_cache_gib", kv_cache_gib, above=0)
            num_blocks = max(per_seq, min(max_num_seqs * per_seq, int(kv_cache_gib * 2**30 // block_bytes)))
        check_finite("swap_space_gib", swap_space_gib, at_least=0)
        swap_blocks = min(max_num_seqs * per_seq, int(swap_space_gib * 2**30 // block_bytes))  # no more than useful
        check_positive("num_blocks", num_blocks)
        check(num_blocks >= per_seq, "num_blocks", num_blocks,
              f"must hold one sequence of max_model_len {max_model_len} tokens: >= {per_seq} blocks")  # fmt: skip
        self.model, self.tokenizer, self.max_model_len = model, tokenizer, max_model_len
        self.adapters = served_adapters(model)  # LoRA adapters served side by side (`finetune.multi_lora`)
        self.lead = lead_ids(model)  # a prompt- or prefix-tuned model's lead ids (`engine.tuning`)
        if self.lead and draft is not None:
            raise GenerationInputError("speculative_config", "a draft model cannot speculate for a prompt- or "
                                       "prefix-tuned model (it has no virtual tokens); use method 'ngram'")
        self.max_num_seqs = max_num_seqs
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        host = HostBlocks(swap_blocks) if swap_blocks else None
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens, host)
        rows = max_num_seqs * (1 + (self.speculative.num_speculative_tokens if self.speculative else 0))
        self.runner = ModelRunner(model, num_blocks, block_size, compile, swap_blocks, max_rows=rows)
        self.known_vocab = tokenizer.vocab_size  # ids past it (a padded embedding) are never sampled; computed once
        self.drafter = drafter(self.speculative, draft, num_blocks, block_size, self.known_vocab, compile, swap_blocks,
                               max_rows=rows)  # fmt: skip
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self.prompt_tokens = self.generated_tokens = 0
        self.draft_tokens = self.accepted_draft_tokens = 0  # speculative decoding: drafts fed, drafts kept

    # -- requests -----------------------------------------------------------------------------------------------

    def make_request(
        self, request_id: str, prompt: Prompt, params: sampling.SamplingParams | None, adapter: str | None = None
    ) -> Request:
        """A checked request (nothing is scheduled: a bad input raises `GenerationInputError` here); `adapter`
        names one of the LoRA adapters the engine serves (`adapters`; None: the base model)."""
        if request_id in self.requests:
            raise GenerationInputError("request_id", f"{request_id!r} is already running")
        params = as_params(params)
        index = self.adapter_index(adapter)
        ids = encode_prompt(self.tokenizer, prompt)
        room = self.max_model_len - len(self.lead)  # the lead takes its places of the context
        check_prompt(ids, self.model.config.vocab_size, room, from_text=isinstance(prompt, str))
        if params.samples > self.max_num_seqs:
            name = "best_of" if params.best_of else "n"
            raise GenerationInputError(name, f"asks for {params.samples} samples; max_num_seqs is {self.max_num_seqs}")
        return Request(request_id, prompt if isinstance(prompt, str) else None, ids, params, adapter=index,
                       lead=list(self.lead))  # fmt: skip

    def adapter_index(self, adapter: str | None) -> int:
        """The index of LoRA adapter `adapter` among those the engine serves (1-based; None: 0, the base)."""
        if adapter is None:
            return 0
        if adapter not in self.adapters:
            served = f"it serves {self.adapters}" if self.adapters else "it serves no adapters"
            raise GenerationInputError("adapter", f"{adapter!r} is not one of the engine's LoRA adapters: {served}")
        return self.adapters.index(adapter) + 1

    def add(self, request: Request) -> None:
        """Queue a request made by `make_request`."""
        seq = self._sample_of(request, 0, request.tokens, next(self._arrivals))
        seq.forks = request.params.samples - 1
        self.requests[request.request_id] = request
        self.prompt_tokens += len(request.prompt_ids)
        self.scheduler.add(seq)

    def add_request(
        self, request_id: str, prompt: Prompt, params: sampling.SamplingParams | None = None, adapter: str | None = None
    ) -> None:
        self.add(self.make_request(request_id, prompt, params, adapter))

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now (its samples finish with "abort", their blocks are freed); its last output, or None
        when it is not running."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        request.aborted = True
        for seq in request.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return request.output()

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        running = {s.request_id for s in self.scheduler.running}
        waiting = {s.request_id for s in self.scheduler.waiting} - running
        b = self.blocks
        return EngineStats(len(running), len(waiting), b.used_blocks, b.free_blocks, b.stats.hit_rate,
                           self.prompt_tokens, self.generated_tokens, self.draft_tokens,
                           self.accepted_draft_tokens, self.scheduler.swapped)  # fmt: skip

    # -- one step -----------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one forward; return the outputs of the requests that got tokens (finished ones last seen here)."""
        batch = self.scheduler.schedule()
        if not batch.rows:
            if self.scheduler.has_work():
                raise RuntimeError("the scheduler scheduled nothing while sequences wait (a bug)")
            return []
        started = time.perf_counter()
        drafts = self.drafter.propose(batch) if self.drafter else [None] * len(batch.rows)
        logits = self._forward(batch, drafts)
        done, which, speculated = [], [], []
        for (seq, n), draft, row_logits in zip(batch.rows, drafts, logits, strict=True):
            if draft is not None:
                speculated.append((seq, draft, row_logits))
                continue
            self.blocks.computed(seq, seq.num_computed + n)
            if seq.remaining == 0:
                done.append(seq)
                which.append(row_logits)
        rows, family_logits = [], []
        for seq, row_logits in zip(done, which, strict=True):
            family = [seq, *self._fork(seq)]
            rows += family
            family_logits += [row_logits] * len(family)
        if rows:
            self._sample(rows, torch.cat(family_logits), started)
        if speculated:
            self._verify(speculated)
        for (seq, _), slots in zip(batch.rows, batch.lookahead, strict=True):
            if slots and not seq.finished:
                self.blocks.truncate(seq)  # the blocks of drafts it did not keep (or never made)
        return self._outputs({seq.request_id for seq in rows} | {seq.request_id for seq, _, _ in speculated})

    def _forward(self, batch: ScheduledBatch, drafts: list[Draft | None]) -> list[torch.Tensor]:
        """One target forward over `batch`, each draft fed after its row's last token; per row its logits: K_b + 1
        positions for a drafted row, 1 for a row whose chunk ends at its last token, else none."""
        rows, per_row = [], []
        for (seq, n), draft in zip(batch.rows, drafts, strict=True):
            k = 0 if draft is None else len(draft.tokens)
            per_row.append(k + 1 if k else int(seq.num_computed + n == len(seq.tokens)))
            seq.tokens += draft.tokens if k else []
            rows.append((seq, n + k))
        try:
            logits = self.runner.run(dataclasses.replace(batch, rows=rows), per_row)
        finally:
            for (seq, _), draft in zip(batch.rows, drafts, strict=True):
                if draft is not None:
                    del seq.tokens[len(seq.tokens) - len(draft.tokens) :]
        return list(logits.split(per_row))

    def _sample(self, rows: list[Sequence], logits: torch.Tensor, started: float) -> None:
        """Sample each row's next token (one `DecodeBatch` step) and record it; finished rows leave."""
        events = DecodeBatch([seq.state for seq in rows], self.known_vocab).step(logits, started)
        logprobs = reported_logprobs(logits, [seq.state.params for seq in rows])  # unknown ids: -inf (the step)
        for seq, event, lp in zip(rows, events, logprobs, strict=True):
            self._record(seq, event.token_id, event.text, lp)
            if event.finish_reason is not None:
                seq.finish_reason = event.finish_reason
                self.scheduler.finish(seq)

    def _verify(self, rows: list[tuple[Sequence, Draft, torch.Tensor]]) -> None:
        """Keep each drafted row's emitted tokens (`spec_decode.verify`) up to its first stop, in order; roll its
        computed length back to them (the blocks of the drafts not kept go in `step`); finished rows leave."""
        seqs, drafts, per_row = (list(column) for column in zip(*rows, strict=True))
        logits = masked(torch.cat(per_row), self.known_vocab, "the model's")
        positions = [len(d.tokens) + 1 for d in drafts]
        params = [seq.state.params for seq, n in zip(seqs, positions, strict=True) for _ in range(n)]
        logprobs = reported_logprobs(logits, params).split(positions)
        for seq, draft, emitted, lps in zip(seqs, drafts, verify(seqs, drafts, logits), logprobs,
                                            strict=True):  # fmt: skip
            self.draft_tokens += len(draft.tokens)
            self.accepted_draft_tokens += len(emitted) - 1
            for token, lp in zip(emitted, lps, strict=False):
                self._record(seq, token, seq.state.accept(token), lp)
                if seq.state.finish_reason is not None:
                    break
            if draft.computed is not None:
                seq.draft_lag = max(0, len(seq.tokens) - 1 - draft.computed)
            self.blocks.computed(seq, len(seq.tokens) - 1)  # every kept token but the last has its keys
            if seq.state.finish_reason is not None:
                seq.finish_reason = seq.state.finish_reason
                self.scheduler.finish(seq)

    def _record(self, seq: Sequence, token: int, text: str, logprobs: torch.Tensor) -> None:
        """Append `token` (and the `text` it released) to `seq`, with its log-probabilities (`logprobs` (V,): the
        log softmax of the model's masked logits at its position, `reported_logprobs`)."""
        seq.tokens.append(token)
        seq.text += text
        seq.cumulative_logprob += float(logprobs[token])
        if seq.logprobs is not None:
            top = logprobs.topk(seq.state.params.logprobs) if seq.state.params.logprobs else None
            entry = {} if top is None else dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            entry[token] = float(logprobs[token])
            seq.logprobs.append(entry)
        self.generated_tokens += 1

    def _outputs(self, request_ids: set[str]) -> list[RequestOutput]:
        outputs = []
        for request_id in sorted(request_ids, key=lambda r: self.requests[r].seqs[0].arrival):
            request = self.requests[request_id]
            if request.finished:
                del self.requests[request_id]
            elif request.params.samples > request.params.n:
                continue  # best_of > n: which samples are returned is known only at the end
            outputs.append(request.output())
        return outputs

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """The samples forked from `seq` now that its prompt is computed (none when it has no forks pending)."""
        request = self.requests[seq.request_id]
        children = [self._sample_of(request, seq.index + k, list(seq.tokens), seq.arrival)
                    for k in range(1, seq.forks + 1)]  # fmt: skip
        for child in children:
            self.scheduler.fork(seq, child)
        seq.forks = 0
        return children

    def _sample_of(self, request: Request, index: int, tokens: list[int], arrival: int) -> Sequence:
        """Sample `index` of `request`: its decode state (seed + index when seeded), budget cut to max_model_len."""
        params = request.params
        if params.seed is not None and index:
            params = dataclasses.replace(params, seed=(params.seed + index) % SEED_LIMIT)
        ids = request.prompt_ids
        state: SequenceState = sequence_state(self.model, self.tokenizer, ids, params, index, self.runner.device)
        state.budget = min(state.budget, self.max_model_len - len(request.tokens))
        seq = Sequence(tokens, len(request.tokens), arrival, request.request_id, index, state, request.adapter)
        seq.lookahead = self.speculative.num_speculative_tokens if self.speculative else 0
        seq.logprobs = [] if params.logprobs is not None else None
        request.seqs.append(seq)
        return seq
