"""The block manager alone (pure bookkeeping): accounting without leaks, prefix-cache hits on full blocks only,
LRU eviction order of cached blocks, fork and copy-on-write, and speculative decoding's rollback (truncate, and
naming a block only once the draft model holds it)."""

from __future__ import annotations

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.sequence import Sequence


def seq(tokens: list[int]) -> Sequence:
    return Sequence(list(tokens), len(tokens))


def refs_match_tables(bm: BlockManager, seqs: list[Sequence]) -> bool:
    """Invariant: each block's count is the number of tables holding it; free blocks are exactly those at 0."""
    counts = [0] * bm.num_blocks
    for s in seqs:
        for b in s.block_table:
            counts[b] += 1
    free = {b.id for b in bm.blocks if b.refs == 0}
    return [b.refs for b in bm.blocks] == counts and free == set(bm._free) and bm.free_blocks == len(free)


def test_allocate_grow_free_keeps_the_counts_and_leaks_nothing():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a, b = seq(range(10)), seq(range(100, 105))
    assert bm.can_allocate(a) and bm.can_allocate(b)
    bm.allocate(a)
    bm.allocate(b)
    assert (len(a.block_table), len(b.block_table)) == (3, 2)  # ceil(10/4), ceil(5/4)
    assert bm.used_blocks == 5 and refs_match_tables(bm, [a, b])
    assert a.num_computed == 0 and len(set(a.block_table) | set(b.block_table)) == 5
    bm.computed(a, 10)
    a.tokens += [1, 2, 3]  # 13 tokens: a fourth block
    assert bm.blocks_needed(a, 13) == 1
    assert bm.grow(a, 13) == []
    assert len(a.block_table) == 4 and refs_match_tables(bm, [a, b])
    big = seq(range(20))  # 5 blocks, 2 free
    assert not bm.can_allocate(big)
    bm.free(a)
    bm.free(b)
    assert bm.free_blocks == 8 and a.block_table == [] and refs_match_tables(bm, [])


def test_a_second_prompt_shares_the_computed_full_blocks_of_the_first():
    bm = BlockManager(16, 4)
    system = list(range(1, 11))  # 10 tokens: 2 full blocks + 2
    a = seq([*system, 50, 51])
    bm.allocate(a)
    assert a.num_computed == 0  # nothing computed yet
    early = seq([*system, 60])
    bm.allocate(early)
    assert early.num_computed == 0  # a's blocks are not computed yet: no hit
    bm.free(early)
    bm.computed(a, len(a.tokens))  # 12 tokens: 3 full blocks named
    b = seq([*system, 70, 71, 72])
    bm.allocate(b)
    assert b.num_computed == 8  # the 2 full blocks of the shared system prompt
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.blocks[a.block_table[0]].refs == 2 and refs_match_tables(bm, [a, b])
    same = seq(a.tokens)  # all 3 of a's blocks are full and cached, but its last token is always computed
    bm.allocate(same)
    assert same.num_computed == 8 and same.block_table[2] != a.block_table[2]
    other = seq([9, *system[1:], 70])  # differs in the first token: the chain misses from block 0
    bm.allocate(other)
    assert other.num_computed == 0
    for s in (a, b, same, other):
        bm.free(s)
    assert bm.free_blocks == 16 and refs_match_tables(bm, [])
    assert bm.stats.hits == 16 and bm.stats.queried == 12 + 11 + 13 + 12 + 11


def test_freed_cached_blocks_survive_until_needed_then_the_least_recently_freed_go_first():
    bm = BlockManager(6, 2)
    a, b = seq([1, 2, 3, 4, 5]), seq([7, 8, 9, 10, 11])  # 3 blocks each: 2 full + 1 partial
    for s in (a, b):
        bm.allocate(s)
        bm.computed(s, 5)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)  # a's blocks are freed first (oldest), last block first
    bm.free(b)
    assert bm.free_blocks == 6
    again = seq([1, 2, 3, 4, 0])  # a's prefix is still cached although free
    bm.allocate(again)
    assert again.num_computed == 4 and again.block_table[:2] == a_blocks[:2]
    # the fresh block: an uncached one first (a's and b's partial last blocks hold no hash)
    assert again.block_table[2] in (a_blocks[2], b_blocks[2])
    bm.free(again)
    # now every free block but the two partials is cached; order of reuse: partials, then LRU cached
    c = seq(list(range(100, 111)))  # 6 blocks: takes the whole pool, evicting everything
    order = [next(iter(bm._free))]
    assert order[0] in (a_blocks[2], b_blocks[2])
    bm.allocate(c)
    cached_order = [blk for blk in c.block_table if blk not in (a_blocks[2], b_blocks[2])]
    # b's cached blocks were freed before `again` freed a's (tail first), so b's go first, tail first
    assert cached_order == [b_blocks[1], b_blocks[0], a_blocks[1], a_blocks[0]]
    assert bm._cached == {} and all(blk.hash is None for blk in bm.blocks)
    bm.free(c)
    assert refs_match_tables(bm, [])


def test_fork_shares_blocks_and_a_write_into_a_shared_block_copies_it_first():
    bm = BlockManager(8, 4)
    parent = seq(range(6))  # block 0 full, block 1 holds 2 of 4
    bm.allocate(parent)
    bm.computed(parent, 6)
    child = seq(range(6))
    bm.fork(parent, child)
    assert child.block_table == parent.block_table and child.num_computed == 6
    assert refs_match_tables(bm, [parent, child]) and bm.blocks[parent.block_table[1]].refs == 2
    parent.tokens.append(40)
    child.tokens.append(41)
    shared = parent.block_table[1]
    assert bm.blocks_needed(child, 7) == 1  # its own copy of the partial block
    copies = bm.grow(child, 7)
    assert copies == [(shared, child.block_table[1])] and child.block_table[1] != shared
    assert child.block_table[0] == parent.block_table[0]  # the full block stays shared
    assert bm.grow(parent, 7) == []  # the partial block is the parent's alone now: written in place
    assert parent.block_table[1] == shared and refs_match_tables(bm, [parent, child])
    bm.free(parent)
    bm.free(child)
    assert bm.free_blocks == 8 and refs_match_tables(bm, [])


def test_can_allocate_counts_cached_blocks_it_would_take_from_the_free_list():
    bm = BlockManager(3, 2)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    bm.computed(a, 5)
    bm.free(a)
    assert bm.free_blocks == 3
    b = seq([1, 2, 3, 4, 5, 6])  # hits 2 free cached blocks, needs 1 more: fits exactly
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_computed == 4 and bm.free_blocks == 0 and refs_match_tables(bm, [b])


def test_truncate_gives_back_draft_blocks_and_a_block_the_draft_model_lags_on_is_named_later():
    bm = BlockManager(8, 4)
    s = seq(range(5))
    bm.allocate(s)
    bm.computed(s, 5)
    s.tokens.append(10)  # its first token: 6 tokens, 5 computed, block 0 named
    assert len(s.block_hashes) == 1 and bm.grow(s, 6 + 2) == [] and len(s.block_table) == 2  # room for 2 drafts
    s.tokens += [11, 12, 13]  # both drafts kept, then the bonus token: 9 tokens, 8 computed on the target...
    s.draft_lag = 1  # ... and 7 on the draft model, which was never fed its last draft
    bm.computed(s, 8)
    assert len(s.block_hashes) == 1 and set(bm._cached) == set(s.block_hashes)  # block 1 waits for the draft
    s.draft_lag = 0  # the next step's first draft forward computed it
    bm.computed(s, 8)
    assert len(s.block_hashes) == 2 and bm.blocks[s.block_table[1]].tokens == (4, 10, 11, 12)
    assert bm.grow(s, 9 + 4) == [] and len(s.block_table) == 4  # room for 4 drafts
    s.tokens.append(14)  # every draft rejected: the target's own token
    bm.computed(s, 9)
    bm.truncate(s)
    assert len(s.block_table) == 3 and bm.free_blocks == 5 and refs_match_tables(bm, [s])
    s.draft_lag = 1
    bm.free(s)
    assert s.draft_lag == 0 and bm.free_blocks == 8 and refs_match_tables(bm, [])
