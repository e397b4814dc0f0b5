"""BlockManager: allocation, growth, freeing, prefix caching and LRU eviction."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from app.core import SamplingParams, Sequence
from app.engine.block_manager import BlockManager, hash_block

BLOCK_SIZE = 4


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence("r", list(tokens), SamplingParams(), max_tokens=100)


def admit(manager: BlockManager, seq: Sequence, num_tokens: int | None = None) -> int:
    """Admit seq the way the scheduler does; returns the number of cached tokens."""
    cached = manager.match_prefix(seq)
    num_cached = len(cached) * manager.block_size
    total = seq.num_tokens if num_tokens is None else num_tokens
    assert manager.can_allocate(seq, total, cached)
    manager.allocate(seq, total, cached)
    seq.num_computed_tokens = num_cached
    return num_cached


def compute_all(manager: BlockManager, seq: Sequence) -> None:
    seq.num_computed_tokens = seq.num_tokens
    manager.cache_full_blocks(seq)


@pytest.fixture
def manager() -> BlockManager:
    return BlockManager(num_blocks=8, block_size=BLOCK_SIZE)


def test_allocate_and_free_counts(manager: BlockManager):
    seq = make_seq(list(range(10)))
    assert manager.num_blocks_for(10) == 3
    admit(manager, seq)
    assert len(seq.block_table) == 3
    assert (manager.num_used_blocks, manager.num_free_blocks) == (3, 5)
    assert manager.usage == pytest.approx(3 / 8)
    manager.free(seq)
    manager.free(seq)  # idempotent
    assert seq.block_table == []
    assert (manager.num_used_blocks, manager.num_free_blocks) == (0, 8)
    manager.check_invariants()


def test_lazy_allocation_grows_with_append_slots(manager: BlockManager):
    seq = make_seq(list(range(10)))
    admit(manager, seq, num_tokens=4)  # first chunk only
    assert len(seq.block_table) == 1
    seq.num_computed_tokens = 4
    assert manager.num_missing_blocks(seq, 4) == 1
    manager.append_slots(seq, 4)
    assert len(seq.block_table) == 2
    manager.append_slots(seq, 4)  # already covered: no-op
    assert len(seq.block_table) == 2
    manager.free(seq)
    manager.check_invariants()


def test_free_blocks_are_handed_out_lowest_id_first():
    """The CPU cache costs memory only where blocks were written: reusing low ids keeps
    the written part at the most blocks in use at once (a queue would walk all of it)."""
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    first, second = make_seq(list(range(12))), make_seq(list(range(100, 108)))
    admit(manager, first)
    admit(manager, second)
    assert (first.block_table, second.block_table) == ([0, 1, 2], [3, 4])
    manager.free(first)
    third = make_seq(list(range(200, 216)))
    admit(manager, third)
    assert third.block_table == [0, 1, 2, 5]  # freed ids again, then the next unused one
    for _ in range(20):  # a stream of short requests never leaves the first blocks
        manager.free(third)
        third = make_seq(list(range(200, 216)))
        admit(manager, third)
        assert max(third.block_table) <= 5
    manager.check_invariants()


def test_reset_prefix_cache_hands_out_lowest_ids_first(manager: BlockManager):
    seq = make_seq(list(range(16)))
    admit(manager, seq)
    compute_all(manager, seq)
    manager.free(seq)  # four full blocks stay cached, free
    manager.reset_prefix_cache()
    other = make_seq(list(range(500, 508)))
    admit(manager, other)
    assert other.block_table == [0, 1]
    manager.check_invariants()


def test_cannot_allocate_beyond_free_blocks(manager: BlockManager):
    big = make_seq(list(range(4 * 8 + 1)))
    assert not manager.can_allocate(big, big.num_tokens)
    with pytest.raises(RuntimeError):
        manager.allocate(big, big.num_tokens)
    assert big.block_table == [] and manager.num_used_blocks == 0
    seq = make_seq(list(range(4 * 7)))
    admit(manager, seq)
    seq.num_computed_tokens = seq.num_tokens
    assert manager.can_append_slots(seq, 4) and not manager.can_append_slots(seq, 5)
    with pytest.raises(RuntimeError):
        manager.append_slots(seq, 5)
    manager.free(seq)


def test_prefix_hit_reuses_full_blocks_and_counts_tokens(manager: BlockManager):
    first = make_seq(list(range(10)))
    admit(manager, first)
    compute_all(manager, first)  # blocks 0 and 1 are full: registered
    assert manager.num_cached_blocks == 2
    manager.free(first)
    assert manager.num_used_blocks == 0 and manager.num_free_blocks == 8

    second = make_seq(list(range(9)) + [99, 100])
    assert admit(manager, second) == 8
    assert second.block_table[:2] == manager.match_prefix(first)
    assert manager.prefix_cache_queries == 10 + 11
    assert manager.prefix_cache_hits == 8
    manager.free(second)
    manager.check_invariants()


def test_hit_leaves_the_last_token_to_compute(manager: BlockManager):
    seq = make_seq(list(range(8)))
    admit(manager, seq)
    compute_all(manager, seq)
    manager.free(seq)
    same = make_seq(list(range(8)))
    # Both blocks are cached, but the last token must run to produce logits.
    assert admit(manager, same) == 4
    assert same.num_computed_tokens == 4
    manager.free(same)


def test_shared_block_ref_counts(manager: BlockManager):
    a, b = make_seq(list(range(9))), make_seq(list(range(9)))
    admit(manager, a)
    compute_all(manager, a)
    admit(manager, b)
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared
    assert [manager.ref_count(i) for i in shared] == [2, 2]
    assert manager.num_used_blocks == 4  # 2 shared + one partial block each
    manager.free(a)
    assert [manager.ref_count(i) for i in shared] == [1, 1]
    manager.free(b)
    assert manager.num_used_blocks == 0
    manager.check_invariants()


def test_same_block_content_after_a_different_prefix_is_not_a_hit(manager: BlockManager):
    seq = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(manager, seq)
    compute_all(manager, seq)
    manager.free(seq)
    # Block 1's tokens (5..8) match, but block 0 differs: chained hashes tell them apart.
    other = make_seq([0, 0, 0, 0, 5, 6, 7, 8, 9])
    assert manager.match_prefix(other) == []
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [1, 2, 3, 5])
    assert hash_block(hash_block(None, [1]), [2]) != hash_block(hash_block(None, [2]), [2])


def test_partial_and_uncomputed_blocks_are_not_registered(manager: BlockManager):
    seq = make_seq(list(range(10)))
    admit(manager, seq)
    seq.num_computed_tokens = 7  # block 0 full, block 1 not yet computed
    manager.cache_full_blocks(seq)
    assert manager.num_cached_blocks == 1
    manager.free(seq)
    assert len(manager.match_prefix(make_seq(list(range(10))))) == 1


def test_duplicate_content_keeps_one_registered_block(manager: BlockManager):
    a, b = make_seq(list(range(5))), make_seq(list(range(5)))
    admit(manager, a)
    admit(manager, b)  # nothing cached yet: both compute the same block
    compute_all(manager, a)
    compute_all(manager, b)
    assert manager.num_cached_blocks == 1
    manager.free(a)
    manager.free(b)
    assert manager.num_used_blocks == 0
    manager.check_invariants()


def test_uncached_blocks_go_before_cached_ones_then_lru():
    manager = BlockManager(num_blocks=4, block_size=2)
    old, new = make_seq([1, 2, 3, 4, 5]), make_seq([7, 8, 9])
    admit(manager, old)
    compute_all(manager, old)  # blocks [1,2] and [3,4] cached
    manager.free(old)
    admit(manager, new)
    compute_all(manager, new)  # block [7,8] cached
    manager.free(new)
    assert manager.num_cached_blocks == 3 and manager.num_free_blocks == 4
    # One uncached block is left; a second one evicts the LRU block: the tail of `old`.
    filler = make_seq([50, 51, 52])
    admit(manager, filler)
    assert manager.num_cached_blocks == 2
    assert len(manager.match_prefix(make_seq([1, 2, 3, 4, 5]))) == 1  # head survived
    assert len(manager.match_prefix(make_seq([7, 8, 9]))) == 1
    manager.free(filler)
    manager.check_invariants()


def test_can_allocate_counts_revived_cached_blocks():
    manager = BlockManager(num_blocks=3, block_size=2)
    seq = make_seq([1, 2, 3, 4, 5])
    admit(manager, seq)
    compute_all(manager, seq)
    manager.free(seq)  # 3 free blocks, 2 of them cached
    again = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    cached = manager.match_prefix(again)
    assert len(cached) == 2
    # 4 blocks needed: 2 cached + 2 new, but reviving the cached ones leaves only 1 free.
    assert not manager.can_allocate(again, 8, cached)
    assert manager.can_allocate(again, 6, cached)


def test_reset_prefix_cache(manager: BlockManager):
    seq = make_seq(list(range(9)))
    admit(manager, seq)
    compute_all(manager, seq)
    running = make_seq(list(range(9)))
    admit(manager, running)
    manager.free(seq)
    assert manager.reset_prefix_cache()
    assert manager.num_cached_blocks == 0
    assert manager.match_prefix(make_seq(list(range(9)))) == []
    manager.check_invariants()
    manager.free(running)
    assert manager.num_used_blocks == 0
    manager.check_invariants()


def test_disabled_prefix_caching():
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    seq = make_seq(list(range(9)))
    admit(manager, seq)
    compute_all(manager, seq)
    manager.free(seq)
    assert manager.match_prefix(make_seq(list(range(9)))) == []
    assert manager.num_cached_blocks == 0
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (0, 0)


def test_allocate_twice_is_an_error(manager: BlockManager):
    seq = make_seq([1, 2])
    admit(manager, seq)
    with pytest.raises(ValueError):
        manager.allocate(seq, 2)
    manager.free(seq)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admit/grow/compute/free/reset keeping every invariant.

    A shadow "KV cache" records which token each block slot holds, so a prefix hit on a
    block with other content, or a write into a block someone else reads, is caught.
    Tokens come from a tiny alphabet so prefixes are shared often.
    """

    def __init__(self) -> None:
        super().__init__()
        self.manager = BlockManager(num_blocks=12, block_size=2)
        self.live: list[Sequence] = []
        self.content: dict[int, list[int | None]] = {}  # block id -> slots

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=12), chunk=st.integers(1, 12))
    def admit(self, tokens: list[int], chunk: int) -> None:
        seq = make_seq(tokens)
        cached = self.manager.match_prefix(seq)
        num_cached = len(cached) * self.manager.block_size
        assert num_cached < seq.num_tokens
        for index, block_id in enumerate(cached):
            start = index * self.manager.block_size
            assert self.content[block_id] == tokens[start : start + self.manager.block_size]
        total = min(seq.num_tokens, num_cached + chunk)
        if not self.manager.can_allocate(seq, total, cached):
            return
        free_before = self.manager.num_free_blocks
        self.manager.allocate(seq, total, cached)
        seq.num_computed_tokens = num_cached
        revived = sum(1 for b in cached if self.manager.ref_count(b) == 1)
        fresh = len(seq.block_table) - len(cached)
        assert self.manager.num_free_blocks == free_before - revived - fresh
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), num_new=st.integers(1, 6), new_tokens=st.integers(0, 3))
    def compute(self, data: st.DataObject, num_new: int, new_tokens: int) -> None:
        """Grow a live sequence (maybe appending sampled tokens) and compute a chunk."""
        seq = data.draw(st.sampled_from(self.live))
        seq.output_token_ids.extend([1] * new_tokens)
        num_new = min(num_new, seq.num_tokens - seq.num_computed_tokens)
        if num_new <= 0 or not self.manager.can_append_slots(seq, num_new):
            return
        self.manager.append_slots(seq, num_new)
        size = self.manager.block_size
        for position in range(seq.num_computed_tokens, seq.num_computed_tokens + num_new):
            block_id = seq.block_table[position // size]
            # Only this sequence may hold a block it writes into.
            assert self.manager.ref_count(block_id) == 1
            slots = self.content.setdefault(block_id, [None] * size)
            slots[position % size] = seq.all_token_ids[position]
        seq.num_computed_tokens += num_new
        self.manager.cache_full_blocks(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.manager.free(seq)
        self.manager.free(seq)
        assert seq.block_table == []

    @rule()
    def reset(self) -> None:
        assert self.manager.reset_prefix_cache()

    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        self.manager.check_invariants()
        holders: dict[int, int] = {}
        for seq in self.live:
            for block_id in seq.block_table:
                holders[block_id] = holders.get(block_id, 0) + 1
        for block_id in range(self.manager.num_blocks):
            assert self.manager.ref_count(block_id) == holders.get(block_id, 0)
        assert self.manager.num_used_blocks == len(holders)
        assert self.manager.num_free_blocks + self.manager.num_used_blocks == 12

    @invariant()
    def computed_blocks_hold_their_tokens(self) -> None:
        size = self.manager.block_size
        for seq in self.live:
            tokens = seq.all_token_ids
            for position in range(seq.num_computed_tokens):
                block_id = seq.block_table[position // size]
                assert self.content[block_id][position % size] == tokens[position]

    def teardown(self) -> None:
        for seq in self.live:
            self.manager.free(seq)
        assert self.manager.num_used_blocks == 0
        self.manager.check_invariants()


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@pytest.mark.parametrize("hash_token_kinds", [False, True])
def test_token_kinds_in_the_hash_keep_generated_kv_from_prompts(hash_token_kinds):
    """With fp16 weights a generated token's K/V differ from the same token's as a prompt
    token: a prompt repeating another sequence's output may then reuse only the blocks
    that were prompt in both (and, the other way round, a recomputed sequence's output
    must not reuse another prompt's blocks)."""
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE, hash_token_kinds=hash_token_kinds)
    first = make_seq(list(range(6)))  # blocks: [0-3] prompt, [4-7] 2 prompt + 2 generated
    admit(manager, first)
    first.output_token_ids += [6, 7, 8, 9, 10]
    manager.append_slots(first, 5)
    compute_all(manager, first)
    follow_up = make_seq(list(range(11)) + [11, 12])  # its prompt repeats first's output
    expected_blocks = 1 if hash_token_kinds else 2  # first has 2 full blocks
    assert len(manager.match_prefix(follow_up)) == expected_blocks
    assert manager.match_prefix(follow_up) == first.block_table[:expected_blocks]
    recomputed = make_seq(list(range(6)))
    recomputed.output_token_ids += [6, 7, 8, 9, 10]
    assert len(manager.match_prefix(recomputed)) == 2  # its own kinds: the same blocks
    prompt_only = make_seq(list(range(13)))
    admit(manager, prompt_only)
    compute_all(manager, prompt_only)
    preempted = make_seq(list(range(4)))  # as if preempted after generating 4..12
    preempted.output_token_ids += list(range(4, 13))
    assert len(manager.match_prefix(preempted)) == (1 if hash_token_kinds else 3)
    manager.check_invariants()
