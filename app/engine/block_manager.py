"""Paged KV-cache bookkeeping: which cache blocks each sequence owns, plus prefix caching.

Pure Python, no torch: the runner owns the tensors, this module only hands out block ids.

Block i of a sequence's block table holds the K/V of positions [i * block_size,
(i + 1) * block_size). Blocks are reference counted, so a full block can be shared by
every sequence whose tokens start with the same prefix.

Prefix caching. A *full, computed* block is registered under a hash of its content that
also covers everything before it: hash(parent block's hash, the block's token ids). Two
blocks with equal hashes therefore hold the K/V of the same token prefix and are
interchangeable. We hash with SHA-256 (not Python's `hash`) so a collision, which would
silently serve another prompt's K/V, is out of reach, and keys stay 32 bytes however long
the chain is (nested tuples as keys would grow with the prefix and be rehashed on each
lookup).

With `hash_token_kinds` (the runner computes prompt and generated tokens with different
kernels: fp16 weights on the CPU), a block's hash also covers how many of its tokens are
prompt tokens of the sequence, because their K/V depend on it: another request's prompt
that repeats this sequence's generated tokens must not reuse their fp16-computed K/V,
nor a recomputed sequence the fp32-computed prompt K/V of another.

A block whose reference count drops to 0 keeps its hash and stays in the cache; it is
only recycled (evicted, least recently used first) when no never-cached free block is
left. `num_free_blocks` counts both kinds, since both can be handed out at once.

Free blocks holding nothing are handed out lowest id first. The CPU cache costs memory
only where blocks were ever written (kv_cache.py), so reusing low ids keeps resident
memory at the most blocks in use at once, where a queue would cycle through every block
of the cache and touch all of it.

The block manager asks before it acts: `can_allocate`/`allocate` at admission,
`can_append_slots`/`append_slots` for running sequences, and never fails half way.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

from app.core import Sequence

BlockHash = bytes  # SHA-256 digest of (parent hash, token ids)


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None  # set while registered in the prefix cache


def hash_block(
    parent_hash: BlockHash | None, token_ids: SequenceOf[int], num_prompt: int | None = None
) -> BlockHash:
    """Content hash of one full block, chained to the hash of the block before it.

    num_prompt: how many of the block's (leading) tokens are prompt tokens, when the K/V
    depend on it; None leaves it out (the hash of token ids alone).
    """
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(array("q", token_ids).tobytes())
    if num_prompt is not None:
        digest.update(b"prompt tokens:" + num_prompt.to_bytes(8, "little"))
    return digest.digest()


def _token_slice(seq: Sequence, start: int, end: int) -> list[int]:
    """seq.all_token_ids[start:end] without concatenating the whole sequence."""
    num_prompt = seq.num_prompt_tokens
    if end <= num_prompt:
        return seq.prompt_token_ids[start:end]
    if start >= num_prompt:
        return seq.output_token_ids[start - num_prompt : end - num_prompt]
    return seq.prompt_token_ids[start:] + seq.output_token_ids[: end - num_prompt]


class BlockManager:
    """Hands out KV-cache blocks to sequences and shares full blocks by content."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hash_token_kinds: bool = False,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be at least 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_token_kinds = hash_token_kinds  # see the module docstring
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Free blocks holding nothing reusable: handed out first, lowest id first (a heap).
        self._free_uncached: list[int] = list(range(num_blocks))
        # Free blocks still registered in the prefix cache, least recently used first.
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._block_by_hash: dict[BlockHash, int] = {}
        # Per live sequence: hashes of its leading full blocks (computed lazily, kept
        # because tokens never change), and how many of its blocks are registered.
        self._seq_hashes: dict[int, list[BlockHash]] = {}
        self._seq_num_registered: dict[int, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # of those, tokens served from the cache

    # ------------------------------------------------------------------ capacity
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: never-used free ones plus cached ones (ref 0)."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or not)."""
        return len(self._block_by_hash)

    def ref_count(self, block_id: int) -> int:
        """How many sequences hold this block (tests and debugging)."""
        return self._blocks[block_id].ref_count

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` positions."""
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------- prefix cache
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached chain of seq's leading full blocks. No side effects.

        Stops short of the last token: that token must be computed to get logits, so at
        most (num_tokens - 1) // block_size blocks can be reused.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        block_ids: list[int] = []
        for block_hash in self._hashes_of(seq, max_blocks):
            block_id = self._block_by_hash.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def _hashes_of(self, seq: Sequence, num_full_blocks: int) -> list[BlockHash]:
        """Hashes of seq's first `num_full_blocks` blocks (each must be full of known tokens)."""
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        size = self.block_size
        while len(hashes) < num_full_blocks:
            index = len(hashes)
            parent = hashes[-1] if hashes else None
            token_ids = _token_slice(seq, index * size, (index + 1) * size)
            num_prompt = None
            if self.hash_token_kinds:
                num_prompt = seq.num_prompt_tokens_in(index * size, size)
            hashes.append(hash_block(parent, token_ids, num_prompt))
        return hashes[:num_full_blocks]

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register seq's blocks that are now full and computed, so later sequences reuse them.

        Call after seq.num_computed_tokens advanced. When another block already holds the
        same content (two sequences computed the same prefix at once), ours stays
        unregistered and is simply freed later.
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        num_registered = self._seq_num_registered.get(seq.seq_id, 0)
        if num_full <= num_registered:
            return
        hashes = self._hashes_of(seq, num_full)
        for index in range(num_registered, num_full):
            block = self._blocks[seq.block_table[index]]
            block_hash = hashes[index]
            if block.block_hash is None and block_hash not in self._block_by_hash:
                block.block_hash = block_hash
                self._block_by_hash[block_hash] = block.block_id
        self._seq_num_registered[seq.seq_id] = num_full

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block. Blocks in use stay with their sequences, unshareable.

        Always succeeds (returns True): dropping hashes never changes any K/V a running
        sequence reads; it only stops future sharing.
        """
        for block in self._blocks:
            block.block_hash = None
        self._block_by_hash.clear()
        self._free_uncached.extend(self._free_cached)
        heapq.heapify(self._free_uncached)
        self._free_cached.clear()
        return True

    # --------------------------------------------------------------- admission
    def can_allocate(
        self, seq: Sequence, num_total_tokens: int, cached_block_ids: SequenceOf[int] = ()
    ) -> bool:
        """Whether `allocate(seq, num_total_tokens, cached_block_ids)` would succeed."""
        num_new = self.num_blocks_for(num_total_tokens) - len(cached_block_ids)
        return num_new <= self.num_free_blocks - self.num_revived(cached_block_ids)

    def num_revived(self, cached_block_ids: SequenceOf[int]) -> int:
        """Free blocks that sharing these cached blocks takes out of the free pool (the
        ones no sequence holds: ref count 0)."""
        return sum(1 for b in cached_block_ids if self._blocks[b].ref_count == 0)

    def allocate(
        self, seq: Sequence, num_total_tokens: int, cached_block_ids: SequenceOf[int] = ()
    ) -> None:
        """Give a sequence with no blocks a table covering positions [0, num_total_tokens).

        `cached_block_ids` (from `match_prefix`) are shared, the rest are fresh blocks.
        Counts the prefix-cache lookup (seq.num_tokens queried, the shared blocks' tokens
        hit). The caller sets num_computed_tokens to len(cached_block_ids) * block_size.
        """
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already holds blocks")
        if not self.can_allocate(seq, num_total_tokens, cached_block_ids):
            raise RuntimeError("not enough free KV-cache blocks; call can_allocate first")
        for block_id in cached_block_ids:
            self._take_cached(block_id)
        seq.block_table = list(cached_block_ids)
        num_new = self.num_blocks_for(num_total_tokens) - len(cached_block_ids)
        seq.block_table.extend(self._take_free() for _ in range(num_new))
        self._seq_num_registered[seq.seq_id] = len(cached_block_ids)
        if self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += len(cached_block_ids) * self.block_size

    # ------------------------------------------------------------------ growth
    def num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks seq lacks to compute `num_new_tokens` more tokens."""
        needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def can_append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_missing_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's table to cover positions up to num_computed_tokens + num_new_tokens."""
        num_missing = self.num_missing_blocks(seq, num_new_tokens)
        if num_missing > self.num_free_blocks:
            raise RuntimeError("not enough free KV-cache blocks; call can_append_slots first")
        seq.block_table.extend(self._take_free() for _ in range(num_missing))

    # ----------------------------------------------------------------- release
    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Free seq's blocks past those holding positions [0, num_tokens): speculative
        decoding's rejected draft tokens. Those blocks were never registered in the
        prefix cache (only computed, confirmed blocks are), so they hold nothing."""
        num_kept = self.num_blocks_for(num_tokens)
        for block_id in reversed(seq.block_table[num_kept:]):
            block = self._blocks[block_id]
            if block.ref_count != 1 or block.block_hash is not None:
                raise RuntimeError(f"block {block_id} past a draft's rollback is shared")
            block.ref_count = 0
            heapq.heappush(self._free_uncached, block_id)
        del seq.block_table[num_kept:]

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks and clear its table. Idempotent.

        Blocks are released last first, so under LRU eviction the tail of a cached chain
        goes before its head (a chain is useless without its head).
        """
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.block_hash is not None:
                self._free_cached[block_id] = None
            else:
                heapq.heappush(self._free_uncached, block_id)
        seq.block_table = []
        self._seq_hashes.pop(seq.seq_id, None)
        self._seq_num_registered.pop(seq.seq_id, None)

    # ---------------------------------------------------------------- internals
    def _take_cached(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free_cached[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        if self._free_uncached:
            block = self._blocks[heapq.heappop(self._free_uncached)]
        else:  # evict the least recently used cached block
            block_id, _ = self._free_cached.popitem(last=False)
            block = self._blocks[block_id]
            del self._block_by_hash[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block.block_id

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (tests and debugging)."""
        free_uncached = set(self._free_uncached)
        free_cached = set(self._free_cached)
        assert len(free_uncached) == len(self._free_uncached), "duplicate free block"
        assert not free_uncached & free_cached, "block in both free pools"
        for block in self._blocks:
            assert block.ref_count >= 0, f"block {block.block_id} has a negative ref count"
            is_free = block.block_id in free_uncached or block.block_id in free_cached
            assert is_free == (block.ref_count == 0), f"block {block.block_id} free/used mismatch"
            if block.block_id in free_cached:
                assert block.block_hash is not None, "cached free block without a hash"
            if block.block_id in free_uncached:
                assert block.block_hash is None, "uncached free block with a hash"
            if block.block_hash is not None:
                assert self._block_by_hash.get(block.block_hash) == block.block_id
        assert len(self._block_by_hash) == sum(b.block_hash is not None for b in self._blocks)
        assert self.num_free_blocks + self.num_used_blocks == self.num_blocks
