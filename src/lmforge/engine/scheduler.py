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

Preemption by swap (`engine.swap`, when the engine has swap space): a victim with at least one full block
computed, for which the host has room, copies the blocks of its computed tokens to host blocks instead
(`ScheduledBatch.swap_out`, made before the forward) and keeps its computed length; when it is again the oldest
waiting and fresh blocks for all its tokens are free, it is readmitted with them and its host blocks are copied
back (`ScheduledBatch.swap_in`): it resumes where it stopped, nothing recomputed.

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
from lmforge.engine.swap import HostBlocks


def _order(seq: Sequence) -> tuple[int, int]:
    return seq.arrival, seq.index


@dataclass
class ScheduledBatch:
    """One step's work: each scheduled sequence with the count of its tokens to compute, in batch order; the block
    copies (copy-on-write) to make before the forward; the sequences preempted while scheduling; per row, the draft
    tokens it has room for after its chunk (lookahead slots; all 0 without speculation); the (device, host) blocks
    to swap out and the (host, device) blocks to swap in before the forward (swap space: `engine.swap`)."""

    rows: list[tuple[Sequence, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    lookahead: list[int] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.rows)


class Scheduler:
    """The waiting and running sequences, both kept in arrival order (see the module docstring)."""

    def __init__(
        self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, host: HostBlocks | None = None
    ) -> None:
        self.blocks, self.host = blocks, host  # host: the swap space's blocks (None: preempt by recompute only)
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
                batch.swap_out += self.preempt(victim)
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
            if seq.host_blocks:
                if not self.blocks.can_swap_in(seq):
                    break
                self.waiting.pop(0)
                batch.swap_in += self._swap_in(seq)
            else:
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

    def preempt(self, seq: Sequence) -> list[tuple[int, int]]:
        """Free `seq`'s blocks and send it back to waiting: swapped out when that pays and the host has room (see
        the module docstring), else to be recomputed. The (device, host) blocks to copy out (none: recompute)."""
        self.running.remove(seq)
        held = self.blocks.blocks_for(seq.num_computed)
        pairs = []
        if self.host is not None and seq.num_computed >= self.blocks.block_size and held <= self.host.free_blocks:
            seq.host_blocks = self.host.take(held)
            pairs = list(zip(self.blocks.swap_out(seq), seq.host_blocks, strict=True))
        else:
            self.blocks.free(seq)
        self.add(seq)
        return pairs

    def _swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Readmit swapped-out `seq` on fresh blocks: the (host, device) blocks to copy back."""
        pairs = list(zip(seq.host_blocks, self.blocks.swap_in(seq, len(seq.host_blocks)), strict=True))
        self.host.release(seq.host_blocks)
        seq.host_blocks = []
        return pairs

    @property
    def swapped(self) -> int:
        """Sequences swapped out now."""
        return sum(bool(seq.host_blocks) for seq in self.waiting)

    def finish(self, seq: Sequence) -> None:
        """`seq` is done (finished or aborted): it leaves the queues and frees its blocks (host ones too)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        if seq.host_blocks:
            self.host.release(seq.host_blocks)
            seq.host_blocks = []
        seq.status = Status.FINISHED
