"""The scheduler: which sequences the next forward computes, and how many tokens of each.

Continuous batching: sequences join (admitted from `waiting`) and leave (finished, aborted, preempted) between
steps, so a step's batch is whatever is running now, not a fixed group. Each step has a token budget,
`max_num_batched_tokens`; a running sequence asks for its uncomputed tokens (1 when decoding, the rest of its
prompt when prefilling) and gets min(asked, budget left), so a long prompt is prefilled in chunks over several
steps, in the same forwards as the others' decode steps (chunked prefill).

Order: arrival (FCFS). Running sequences are served oldest first; waiting ones are admitted oldest first and only
while the oldest fits (no one overtakes it, so none starves). A sequence is admitted with blocks for all its
tokens (`BlockManager.allocate`, sharing any cached prefix), so its later chunks never wait for memory; only
decoding grows a table.

Preemption by recompute: when a running sequence needs a block and none is free, the youngest running sequence
is preempted: its blocks are freed (its full blocks stay in the prefix cache while nobody needs their room) and
it goes back to waiting with every token it has, to be prefilled again when it is the oldest waiting. If the
sequence in need is itself the youngest, it is the one preempted. No sequence is admitted in a step that
preempted. Since every sequence fits the pool alone (the engine checks max_model_len against the pool), the
oldest sequence always progresses: no crash, no deadlock.

Lookahead slots (speculative decoding): after the running and admitted sequences are scheduled, each decoding row
gets room for up to `Sequence.max_drafts` draft tokens after its last token (`ScheduledBatch.lookahead`), oldest
first, from the budget left and the free blocks only: drafts never preempt anyone nor keep anyone waiting, and
a row that finds no room decodes plainly. The engine feeds the drafts it makes (at most the slots) and gives back
the blocks of the rejected ones (`BlockManager.truncate`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.sequence import Sequence, Status


def _order(seq: Sequence) -> tuple[int, int]:
    return seq.arrival, seq.index


@dataclass
class ScheduledBatch:
    """One step's work: each scheduled sequence with the count of its tokens to compute, in batch order; the block
    copies (copy-on-write) to make before the forward; the sequences preempted while scheduling; per row, the draft
    tokens it has room for after its chunk (lookahead slots; all 0 without speculation)."""

    rows: list[tuple[Sequence, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    lookahead: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.rows)


class Scheduler:
    """The waiting and running sequences, both kept in arrival order (see the module docstring)."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """A new (or preempted) sequence waits for admission, in arrival order."""
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=_order)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """The next step's batch: running sequences first, then admissions, then lookahead slots, within the token
        budget."""
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not batch.preempted:
            budget = self._admit(batch, budget)
        self._reserve_lookahead(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.remaining, budget)
            while not self.blocks.can_grow(seq, seq.num_computed + n):
                victim = self.running[-1]  # the youngest; never one already scheduled (those are older than seq)
                self.preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    return budget
            batch.copies += self.blocks.grow(seq, seq.num_computed + n)
            batch.rows.append((seq, n))
            budget -= n
            i += 1
        return budget

    def _admit(self, batch: ScheduledBatch, budget: int) -> int:
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            taken = sum(1 + s.forks for s in self.running)  # the running, and the samples they will fork
            if self.running and taken + 1 + seq.forks > self.max_num_seqs:
                break
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.pop(0)
            self.blocks.allocate(seq)
            self._run(seq)
            n = min(seq.remaining, budget)
            batch.rows.append((seq, n))
            budget -= n
        return budget

    def _reserve_lookahead(self, batch: ScheduledBatch, budget: int) -> None:
        """Room for each decoding row's drafts, oldest first, within `budget` and the free blocks."""
        for seq, _ in batch.rows:
            k = min(seq.max_drafts, budget)
            while k and not self.blocks.can_grow(seq, len(seq.tokens) + k):
                k -= 1
            if k:
                batch.copies += self.blocks.grow(seq, len(seq.tokens) + k)
            batch.lookahead.append(k)
            budget -= k

    def _run(self, seq: Sequence) -> None:
        seq.status = Status.RUNNING
        bisect.insort(self.running, seq, key=_order)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` runs beside `parent`, sharing its blocks (copy-on-write)."""
        self.blocks.fork(parent, child)
        self._run(child)

    def preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and send it back to waiting, to be recomputed."""
        self.running.remove(seq)
        self.blocks.free(seq)
        self.add(seq)

    def finish(self, seq: Sequence) -> None:
        """`seq` is done (finished or aborted): it leaves the queues and frees its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED
