"""The scheduler with a block manager and no model: each simulated step computes what was scheduled and appends
a token to every sequence that reached its last token. Checked: the token budget and chunked prefill beside
decodes, sequences joining and leaving between steps, arrival order without overtaking, preemption by recompute
(the youngest goes back to waiting with its tokens; everyone finishes; no deadlock) and by swap (the blocks go to
host memory and come back; nothing recomputed), a free pool at the end, and the lookahead slots of speculative
decoding (the budget and free blocks left, never a preemption). The simulated pool holds tokens, not keys: each
step makes the batch's swaps and copies, checks that every row reads its own tokens from its blocks, then writes
its chunk."""

from __future__ import annotations

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.scheduler import Scheduler
from lmforge.engine.sequence import Sequence, Status
from lmforge.engine.swap import HostBlocks


class Sim:
    """The engine's loop with a fake model: sequence i generates `wants[i]` tokens (token id 7)."""

    def __init__(
        self, num_blocks: int, block_size: int, max_num_seqs: int = 8, budget: int = 16, host_blocks: int = 0
    ) -> None:
        self.blocks = BlockManager(num_blocks, block_size)
        self.host = HostBlocks(host_blocks) if host_blocks else None
        self.scheduler = Scheduler(self.blocks, max_num_seqs, budget, self.host)
        self.pool = [[None] * block_size for _ in range(num_blocks)]  # the token each slot holds
        self.host_pool = [[None] * block_size for _ in range(host_blocks)]
        self.wants: dict[int, int] = {}
        self.seqs: list[Sequence] = []
        self.log: list[list[tuple[int, int]]] = []  # per step: (arrival, tokens computed)
        self.preempted: list[int] = []

    def add(self, prompt_len: int, wants: int) -> Sequence:
        first = 1000 * len(self.seqs)  # distinct prompts: no prefix-cache hits between them
        seq = Sequence(list(range(first, first + prompt_len)), prompt_len, arrival=len(self.seqs))
        self.seqs.append(seq)
        self.wants[seq.arrival] = wants
        self.scheduler.add(seq)
        return seq

    def step(self) -> None:
        batch = self.scheduler.schedule()
        assert batch.rows and batch.tokens <= self.scheduler.max_num_batched_tokens
        assert len({id(s) for s, _ in batch.rows}) == len(batch.rows)
        self.log.append([(s.arrival, n) for s, n in batch.rows])
        self.preempted += [s.arrival for s in batch.preempted]
        assert not (batch.swap_out and batch.swap_in)
        for src, dst in batch.swap_out:
            self.host_pool[dst] = list(self.pool[src])
        for src, dst in batch.swap_in:
            self.pool[dst] = list(self.host_pool[src])
        for src, dst in batch.copies:
            self.pool[dst] = list(self.pool[src])
        bs = self.blocks.block_size
        for seq, n in batch.rows:
            assert len(seq.block_table) * bs >= seq.num_computed + n  # room for what it writes
            held = [self.pool[seq.block_table[t // bs]][t % bs] for t in range(seq.num_computed)]
            assert held == seq.tokens[: seq.num_computed]  # what its attention reads
        for seq, n in batch.rows:
            for t in range(seq.num_computed, seq.num_computed + n):
                self.pool[seq.block_table[t // bs]][t % bs] = seq.tokens[t]
            self.blocks.computed(seq, seq.num_computed + n)
            if seq.remaining == 0:
                seq.tokens.append(7)
                if len(seq.output) == self.wants[seq.arrival]:
                    self.scheduler.finish(seq)

    def run(self, limit: int = 1000) -> int:
        steps = 0
        while self.scheduler.has_work():
            self.step()
            steps += 1
            assert steps < limit, "no progress"
        return steps


def test_chunked_prefill_shares_the_budget_with_decodes_oldest_first():
    sim = Sim(num_blocks=64, block_size=4, budget=8)
    sim.add(3, 6)  # short: decodes soon
    sim.step()
    assert sim.log[-1] == [(0, 3)]
    sim.add(20, 2)  # a long prompt joins while 0 decodes
    sim.step()
    assert sim.log[-1] == [(0, 1), (1, 7)]  # 0's decode first, then a chunk of 1's prompt within the budget
    sim.step()
    assert sim.log[-1] == [(0, 1), (1, 7)]
    sim.step()
    assert sim.log[-1] == [(0, 1), (1, 6)]  # the rest of 1's prompt: its first token is sampled
    assert len(sim.seqs[1].output) == 1
    sim.run()
    assert all(s.status is Status.FINISHED for s in sim.seqs)
    assert [len(s.output) for s in sim.seqs] == [6, 2]
    assert sim.blocks.free_blocks == 64 and sim.preempted == []


def test_sequences_join_and_leave_between_steps():
    sim = Sim(num_blocks=64, block_size=4, budget=64)
    sim.add(4, 1)
    sim.add(4, 3)
    sim.step()  # both prefill; 0 is done after its first token
    assert sim.log[-1] == [(0, 4), (1, 4)] and sim.seqs[0].status is Status.FINISHED
    sim.add(5, 2)
    sim.step()
    assert sim.log[-1] == [(1, 1), (2, 5)]  # 0 left, 2 joined beside 1's decode
    sim.run()
    assert [len(s.output) for s in sim.seqs] == [1, 3, 2] and sim.blocks.free_blocks == 64


def test_admission_is_in_arrival_order_and_nothing_overtakes_the_oldest_waiting():
    sim = Sim(num_blocks=10, block_size=4, budget=64)
    sim.add(24, 8)  # 6 blocks, then grows while decoding
    sim.step()
    big = sim.add(20, 1)  # 5 blocks: does not fit beside 0
    small = sim.add(2, 1)  # 1 block: would fit, but must not overtake
    sim.step()
    assert [a for a, _ in sim.log[-1]] == [0] and big.status is small.status is Status.WAITING
    sim.run()
    admitted = [next(i for i, step in enumerate(sim.log) if any(a == s.arrival for a, _ in step)) for s in sim.seqs]
    assert admitted == sorted(admitted)  # first computed in arrival order
    assert all(len(s.output) == sim.wants[s.arrival] for s in sim.seqs) and sim.blocks.free_blocks == 10


def test_a_full_pool_preempts_the_youngest_which_recomputes_and_everyone_finishes():
    sim = Sim(num_blocks=12, block_size=2, max_num_seqs=8, budget=32)
    lengths = [(5, 12), (3, 14), (6, 10), (4, 9), (2, 16)]
    for prompt, wants in lengths:
        sim.add(prompt, wants)
    while sim.scheduler.has_work():
        before, seen = sorted(s.arrival for s in sim.scheduler.running), len(sim.preempted)
        sim.step()
        victims = sim.preempted[seen:]
        assert sorted(victims) == before[len(before) - len(victims) :]  # the youngest running ones go
        assert len(sim.log) < 500
    assert sim.preempted, "the pool was meant to run out"
    assert [len(s.output) for s in sim.seqs] == [w for _, w in lengths]
    assert sim.blocks.free_blocks == 12 and sim.scheduler.running == sim.scheduler.waiting == []


def test_a_full_pool_swaps_the_youngest_out_and_back_and_nothing_is_recomputed():
    lengths = [(5, 12), (3, 14), (6, 10), (4, 9), (2, 16)]
    runs = {}
    for host in (0, 64):
        sim = Sim(num_blocks=12, block_size=2, max_num_seqs=8, budget=32, host_blocks=host)
        for prompt, wants in lengths:
            sim.add(prompt, wants)
        sim.run()
        assert sim.preempted and [len(s.output) for s in sim.seqs] == [w for _, w in lengths]
        assert sim.blocks.free_blocks == 12 and sim.scheduler.waiting == [] == sim.scheduler.running
        runs[host] = sum(n for step in sim.log for _, n in step)
    once = sum(prompt + wants - 1 for prompt, wants in lengths)  # every token fed once
    assert once == runs[64] < runs[0]  # these victims all hold a full block: every one swaps
    assert sim.host.free_blocks == 64


def test_a_victim_recomputes_when_it_holds_under_a_block_or_the_host_is_full():
    blocks, host = BlockManager(16, 2), HostBlocks(2)
    scheduler = Scheduler(blocks, 8, 64, host)
    seqs = [Sequence(list(range(100 * i, 100 * i + n)), n, arrival=i) for i, n in enumerate((5, 3, 1))]
    for seq in seqs:
        scheduler.add(seq)
    for seq, n in scheduler.schedule().rows:  # each prompt computed, its first token drawn
        blocks.computed(seq, seq.num_computed + n)
        seq.tokens.append(7)
    five, three, one = seqs
    assert scheduler.preempt(five) == [] and five.num_computed == 0  # 3 blocks: the host has 2
    pairs = scheduler.preempt(three)
    assert [d for _, d in pairs] == three.host_blocks and len(pairs) == 2 and host.free_blocks == 0
    assert three.num_computed == 3 and three.block_table == [] and scheduler.swapped == 1
    assert scheduler.preempt(one) == [] and one.num_computed == 0  # under a block computed
    batch = scheduler.schedule()  # readmitted oldest first: five (recomputed past its 2 prefix-cached blocks),
    assert batch.rows == [(five, 2), (three, 1), (one, 2)]  # three (swapped in), one (recomputed)
    assert [s for s, _ in batch.swap_in] == [d for _, d in pairs] and host.free_blocks == 2
    scheduler.preempt(three)
    scheduler.finish(three)  # finished (aborted) while swapped out: its host blocks come back
    assert host.free_blocks == 2 and three.host_blocks == []


def test_a_preempted_sequence_waits_at_the_front_with_its_tokens_and_blocks_freed():
    sim = Sim(num_blocks=4, block_size=2, budget=32)
    old = sim.add(3, 5)
    young = sim.add(3, 5)
    later = sim.add(1, 1)
    while young.status is not Status.WAITING or not young.output:
        sim.step()
        assert len(sim.log) < 100
    assert young.block_table == [] and young.num_computed == 0 and len(young.tokens) == 3 + len(young.output)
    assert sim.scheduler.waiting[0] is young and later in sim.scheduler.waiting  # before the later arrival
    assert old.status is Status.RUNNING
    sim.run()
    assert [len(s.output) for s in (old, young, later)] == [5, 5, 1] and sim.blocks.free_blocks == 4


def test_admission_counts_the_samples_running_sequences_will_fork():
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=4, budget=64)
    sim.add(3, 2).forks = 2  # runs as 3 sequences once its prompt is computed
    later = sim.add(3, 2)
    later.forks = 1  # 2 more would make 5 > max_num_seqs
    sim.step()
    assert sim.log[-1] == [(0, 3)] and later.status is Status.WAITING


def decoding(sim: Sim, lengths: list[int], lookahead: int) -> list[Sequence]:
    """Sequences of prompt `lengths` that got their first token (their last one uncomputed), with lookahead."""
    seqs = [sim.add(n, 100) for n in lengths]
    while any(not s.output for s in seqs):
        sim.step()
    for s in seqs:
        s.lookahead = lookahead
    return seqs


def test_lookahead_slots_take_the_budget_left_oldest_first():
    sim = Sim(num_blocks=16, block_size=4, budget=8)
    a, b = decoding(sim, [3, 5], lookahead=4)
    assert (len(a.tokens), len(b.tokens)) == (4, 6)
    prefill = sim.add(20, 1)
    prefill.lookahead = 4
    batch = sim.scheduler.schedule()
    # the decodes (1 + 1), then prefill's first chunk (6 of the 8): nothing is left for drafts
    assert [(s.arrival, n) for s, n in batch.rows] == [(0, 1), (1, 1), (2, 6)] and batch.lookahead == [0, 0, 0]
    sim.blocks.computed(prefill, 6)
    sim.scheduler.finish(prefill)
    batch = sim.scheduler.schedule()
    assert batch.rows == [(a, 1), (b, 1)] and batch.lookahead == [4, 2]  # 6 tokens of budget left: a first
    assert len(a.block_table) == 2 and len(b.block_table) == 2  # room for 4 + 4 and 6 + 2 tokens
    assert batch.tokens == 2 and not batch.preempted


def test_lookahead_slots_use_free_blocks_only_and_never_preempt():
    sim = Sim(num_blocks=4, block_size=4, budget=64)
    a, b = decoding(sim, [3, 5], lookahead=8)  # 1 and 2 blocks: 1 free
    batch = sim.scheduler.schedule()
    assert batch.lookahead == [4, 2] and not batch.preempted  # a takes the free block; b fills its own
    assert sim.blocks.free_blocks == 0 and {s.status for s in (a, b)} == {Status.RUNNING}
    for seq, kept in ((a, [7, 7]), (b, [7])):  # a keeps a draft and a bonus token, b rejects both drafts
        seq.tokens += kept
        sim.blocks.computed(seq, len(seq.tokens) - 1)
        sim.blocks.truncate(seq)  # a gives back nothing (6 tokens in 2 blocks), nor b (7 in 2)
    assert [len(s.block_table) for s in (a, b)] == [2, 2] and sim.blocks.free_blocks == 0
    assert sim.scheduler.schedule().lookahead == [2, 1]  # 6 and 7 tokens: what is left of their 8 slots
    b.lookahead = a.lookahead = 0
    assert sim.scheduler.schedule().lookahead == [0, 0]


def test_a_prefilling_or_new_sequence_gets_no_lookahead():
    sim = Sim(num_blocks=16, block_size=4, budget=4)
    seq = sim.add(9, 3)
    seq.lookahead = 4
    assert seq.max_drafts == 0
    batch = sim.scheduler.schedule()
    assert batch.rows == [(seq, 4)] and batch.lookahead == [0]
