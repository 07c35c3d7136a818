"""The block manager: which KV-cache blocks each sequence owns, shared blocks, and the prefix cache.

The pool has `num_blocks` blocks of `block_size` token slots (the tensors live in the runner's paged cache; this
file is pure bookkeeping). A sequence's block table lists its blocks in slot order: token t lives in block
table[t // block_size] at offset t % block_size. Every block has a reference count (the sequences whose tables
hold it); a block is free when no table holds it.

Prefix caching. Once a FULL block's keys and values are computed, it is named by a chained hash

    h_i = hash((h_{i-1}, tokens[i * block_size : (i + 1) * block_size]))      (h_{-1} = None, or the LoRA adapter)

which fixes the block's tokens and everything before them, hence its keys (causal attention); a sequence served
with LoRA adapter k (`finetune.multi_lora`) starts the chain from the adapter instead (`root_hash`), as its keys
differ from the base model's. A new sequence
whose first i blocks have the hashes of computed blocks takes those blocks (reference count + 1) and computes
only the tokens after them. At least its last token is always computed (its logits give the next token), so a
prompt of whole cached blocks recomputes its last block in a block of its own. A hash hit is confirmed against
the block's stored tokens, so a collision of Python's hash can never share a wrong block.

Freed blocks keep their contents and hash until reused: the free list is ordered for reuse, blocks that hold no
cached prefix first, then cached blocks least recently freed first (LRU eviction). A sequence frees its blocks
last-first, so its tail is evicted before the shared prefix it started from.

Fork (n > 1 samples of one prompt): a child's table is its parent's, every block's count + 1. The blocks are
shared copy-on-write: before a sequence writes into a block that another table also holds (the partly filled last
block of a forked prompt), it gets a fresh block and the runner copies the old one's contents (`grow` returns the
(source, destination) pairs). Full shared blocks are never written: writes go to slots >= the computed length.

Speculative decoding writes draft tokens past the computed length into blocks grown for them (lookahead slots). A
rejected draft's slots stay past the computed length, so they are overwritten before their block is full and
named; `truncate` gives back the blocks grown for drafts that were not kept. A block is named only once the draft
model's cache holds it too (`Sequence.draft_lag`), so a prefix hit gives both models their keys.

Swap (preemption to host memory, `engine.swap`): `swap_out` releases a sequence's blocks like `free` but keeps its
computed length and hashes, and names the blocks whose contents go to host memory first; `swap_in` gives it fresh
blocks for all its tokens (no prefix lookup: its contents come back from the host).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from lmforge.engine.sequence import Sequence


@dataclass
class Block:
    """One block of the pool: who holds it, and the prefix it caches (hash None: none)."""

    id: int
    refs: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] = ()


@dataclass
class BlockStats:
    """Prefix-cache counts since the start: prompt tokens looked up, and those found computed."""

    queried: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queried if self.queried else 0.0


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """The chained hash of a full block: its tokens and (through `parent`) every token before them."""
    return hash((parent, tokens))


def root_hash(seq: Sequence) -> int | None:
    """The `parent` of a sequence's first block: None for the base model, ("adapter", k) hashed for LoRA adapter
    k, so sequences of different adapters (whose keys differ for the same tokens) never share a block."""
    return None if not seq.adapter else hash(("adapter", seq.adapter))


@dataclass
class BlockManager:
    """The blocks of a pool of `num_blocks` x `block_size` slots (see the module docstring)."""

    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    stats: BlockStats = field(default_factory=BlockStats)

    def __post_init__(self) -> None:
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(self.num_blocks))  # next to reuse first
        self._cached: dict[int, int] = {}  # hash -> the block that holds it

    @property
    def free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are reused when needed)."""
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- admission ----------------------------------------------------------------------------------------------

    def _prefix_hits(self, seq: Sequence) -> list[tuple[int, int]]:
        """(hash, block) of the leading full blocks of `seq.tokens` found computed in the pool (not its last
        token's block: that token is always computed)."""
        if not self.enable_prefix_caching:
            return []
        hits, parent, bs = [], root_hash(seq), self.block_size
        for i in range((len(seq.tokens) - 1) // bs):
            tokens = tuple(seq.tokens[i * bs : (i + 1) * bs])
            h = block_hash(parent, tokens)
            block = self._cached.get(h)
            if block is None or self.blocks[block].tokens != tokens:
                break
            hits.append((h, block))
            parent = h
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether every token of `seq` fits now: its cache hits plus fresh blocks for the rest."""
        hits = self._prefix_hits(seq)
        taken_from_free = sum(self.blocks[b].refs == 0 for _, b in hits)
        return self.blocks_for(len(seq.tokens)) - len(hits) + taken_from_free <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` (no blocks yet) blocks for all its tokens, sharing the cached prefix; its computed length
        becomes the cached tokens. Call after `can_allocate`."""
        assert not seq.block_table, "allocate: the sequence holds blocks already"
        hits = self._prefix_hits(seq)
        seq.block_table = [self._take(block) for _, block in hits]
        seq.block_hashes = [h for h, _ in hits]
        seq.num_computed = len(hits) * self.block_size
        while len(seq.block_table) < self.blocks_for(len(seq.tokens)):
            seq.block_table.append(self._take_free())
        self.stats.queried += len(seq.tokens)
        self.stats.hits += seq.num_computed

    # -- growth, computed blocks, release -----------------------------------------------------------------------

    def blocks_needed(self, seq: Sequence, length: int) -> int:
        """Fresh blocks `seq` needs to hold `length` tokens and write slots num_computed..length-1 unshared."""
        need = max(0, self.blocks_for(length) - len(seq.block_table))
        return need + (self._shared_write_block(seq, length) is not None)

    def _shared_write_block(self, seq: Sequence, length: int) -> int | None:
        """The index in `seq`'s table of the block its next write goes to, when another table holds it too."""
        i = seq.num_computed // self.block_size
        if seq.num_computed < length and i < len(seq.block_table) and self.blocks[seq.block_table[i]].refs > 1:
            return i
        return None

    def can_grow(self, seq: Sequence, length: int) -> bool:
        return self.blocks_needed(seq, length) <= len(self._free)

    def grow(self, seq: Sequence, length: int) -> list[tuple[int, int]]:
        """Make `seq`'s table hold `length` tokens, its block under write its own (copy-on-write); return the
        (source, destination) blocks whose contents the runner must copy. Call after `can_grow`."""
        copies = []
        i = self._shared_write_block(seq, length)
        if i is not None:
            old = seq.block_table[i]
            seq.block_table[i] = self._take_free()
            self._release(old)
            copies.append((old, seq.block_table[i]))
        while len(seq.block_table) < self.blocks_for(length):
            seq.block_table.append(self._take_free())
        return copies

    def computed(self, seq: Sequence, length: int) -> None:
        """`seq`'s first `length` tokens now have their keys in the pool: name its newly full blocks (prefix
        caching; those within the first length - draft_lag tokens, which the draft model holds too) and record
        the length."""
        seq.num_computed = length
        bs = self.block_size
        while len(seq.block_hashes) < (length - seq.draft_lag) // bs:
            i = len(seq.block_hashes)
            tokens = tuple(seq.tokens[i * bs : (i + 1) * bs])
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else root_hash(seq), tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if self.enable_prefix_caching and h not in self._cached and block.hash is None:
                block.hash, block.tokens = h, tokens
                self._cached[h] = block.id

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares every block of `parent` (and its computed length and hashes)."""
        child.block_table = [self._take(block) for block in parent.block_table]
        child.block_hashes = list(parent.block_hashes)
        child.num_computed = parent.num_computed

    def truncate(self, seq: Sequence) -> None:
        """Release the blocks past those `seq`'s tokens fill (grown for drafts it did not keep), last first."""
        keep = self.blocks_for(len(seq.tokens))
        assert len(seq.block_hashes) <= keep, "truncate: a named block would be released"
        for block in reversed(seq.block_table[keep:]):
            self._release(block)
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks, last first (see the module docstring); it holds none afterwards."""
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table, seq.block_hashes, seq.num_computed, seq.draft_lag = [], [], 0, 0

    # -- swapping (engine.swap) ---------------------------------------------------------------------------------

    def swap_out(self, seq: Sequence) -> list[int]:
        """Release `seq`'s blocks; return those holding its computed tokens (to copy to host before they are
        reused). Its computed length, hashes and draft lag stay: it resumes from them after `swap_in`."""
        held = seq.block_table[: self.blocks_for(seq.num_computed)]
        kept = seq.num_computed, seq.block_hashes, seq.draft_lag
        self.free(seq)
        seq.num_computed, seq.block_hashes, seq.draft_lag = kept
        return held

    def can_swap_in(self, seq: Sequence) -> bool:
        return self.blocks_for(len(seq.tokens)) <= len(self._free)

    def swap_in(self, seq: Sequence, held: int) -> list[int]:
        """Give `seq` (no blocks, swapped out) fresh blocks for all its tokens; return the first `held`, where its
        swapped blocks go back. Call after `can_swap_in`."""
        assert not seq.block_table, "swap_in: the sequence holds blocks already"
        seq.block_table = [self._take_free() for _ in range(self.blocks_for(len(seq.tokens)))]
        return seq.block_table[:held]

    # -- one block ----------------------------------------------------------------------------------------------

    def _take(self, block: int) -> int:
        if self.blocks[block].refs == 0:
            del self._free[block]
        self.blocks[block].refs += 1
        return block

    def _take_free(self) -> int:
        """The next free block (an uncached one, else the least recently freed cached one, evicted)."""
        block = self.blocks[next(iter(self._free))]
        if block.hash is not None:
            del self._cached[block.hash]
            block.hash, block.tokens = None, ()
        return self._take(block.id)

    def _release(self, block: int) -> None:
        b = self.blocks[block]
        b.refs -= 1
        if b.refs == 0:
            self._free[block] = None  # cached: reused last (most recently freed)
            if b.hash is None:
                self._free.move_to_end(block, last=False)  # holds nothing worth keeping: reused first
