"""Scheduler with the FakeRunner: budgets, chunked prefill, preemption, prefix reuse, stops."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from app.core import (
    FinishReason,
    SampleOutput,
    SamplingParams,
    ScheduledBatch,
    Sequence,
    SequenceStatus,
)
from app.engine.block_manager import BlockManager
from app.engine.scheduler import Scheduler, SeqUpdate, fair_order
from tests.unit.fakes import FakeRunner, FakeTokenizer

EOS = FakeTokenizer.EOS

MakeScheduler = Callable[..., tuple[Scheduler, FakeRunner]]


def build(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 32,
    max_model_len: int = 256,
    prefix_caching: bool = True,
    **runner_kwargs,
) -> tuple[Scheduler, FakeRunner]:
    manager = BlockManager(num_blocks, block_size, prefix_caching)
    scheduler = Scheduler(
        manager,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        eos_token_ids=frozenset({EOS}),
    )
    runner = FakeRunner(
        block_size=block_size, num_blocks=num_blocks, max_model_len=max_model_len, **runner_kwargs
    )
    return scheduler, runner


@pytest.fixture
def make() -> Iterator[MakeScheduler]:
    """Builds schedulers; afterwards, every one must hold no block (ref count > 0)."""
    built: list[Scheduler] = []

    def factory(**kwargs) -> tuple[Scheduler, FakeRunner]:
        scheduler, runner = build(**kwargs)
        built.append(scheduler)
        return scheduler, runner

    yield factory
    for scheduler in built:
        assert scheduler.block_manager.num_used_blocks == 0
        scheduler.block_manager.check_invariants()


def make_seq(
    prompt: list[int] | int, max_tokens: int = 8, request_id: str = "r", index: int = 0, **params
) -> Sequence:
    tokens = list(range(10, 10 + prompt)) if isinstance(prompt, int) else prompt
    return Sequence(request_id, tokens, SamplingParams(**params), max_tokens, index=index)


def check_batch(scheduler: Scheduler, batch: ScheduledBatch) -> None:
    assert batch.num_batched_tokens <= scheduler.max_num_batched_tokens
    assert batch.num_batched_tokens == sum(s.num_new_tokens for s in batch.seqs)
    assert scheduler.num_running <= scheduler.max_num_seqs
    manager = scheduler.block_manager
    for scheduled in batch.seqs:
        seq = scheduled.seq
        assert seq.status is SequenceStatus.RUNNING and seq in scheduler.running
        end = seq.num_computed_tokens + scheduled.num_new_tokens
        # Lazy allocation: exactly the blocks this step needs, no more.
        assert len(seq.block_table) == manager.num_blocks_for(end)
    for seq in scheduler.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    for seq in batch.preempted:
        assert seq.status is SequenceStatus.WAITING and seq.block_table == []


def step(scheduler: Scheduler, runner: FakeRunner) -> tuple[ScheduledBatch, list[SeqUpdate]]:
    batch = scheduler.schedule()
    check_batch(scheduler, batch)
    outputs = runner.execute(batch) if batch.seqs else []
    updates = scheduler.update(batch, outputs)
    scheduler.block_manager.check_invariants()
    for update in updates:
        if update.finish_reason is not None:
            assert update.seq.is_finished and update.seq.block_table == []
    return batch, updates


def run_to_completion(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 5000) -> int:
    for num_steps in range(max_steps):
        if not scheduler.has_unfinished():
            return num_steps
        step(scheduler, runner)
    raise AssertionError("the scheduler did not finish: deadlock or livelock")


def scripted(tokens: list[int]) -> Callable[[list[int], Sequence], int]:
    """Next-token function replaying `tokens` by output position."""
    return lambda context, seq: tokens[len(seq.output_token_ids)]


# ------------------------------------------------------------ chunked prefill
def test_long_prompt_is_chunked_and_samples_at_the_end(make: MakeScheduler):
    scheduler, runner = make(max_num_batched_tokens=4)
    seq = make_seq(10, max_tokens=2)
    scheduler.add(seq)
    plan = []
    for _ in range(3):
        batch, updates = step(scheduler, runner)
        plan.append((batch.seqs[0].num_new_tokens, batch.seqs[0].sample, len(updates)))
    assert plan == [(4, False, 0), (4, False, 0), (2, True, 1)]
    assert seq.num_computed_tokens == 10 and len(seq.output_token_ids) == 1
    batch, _ = step(scheduler, runner)  # decode: one token
    assert [(s.num_new_tokens, s.sample) for s in batch.seqs] == [(1, True)]
    assert seq.is_finished and seq.finish_reason is FinishReason.LENGTH


def test_running_first_then_waiting_in_fifo_order(make: MakeScheduler):
    scheduler, runner = make(max_num_batched_tokens=8)
    first = make_seq(3, request_id="a")
    scheduler.add(first)
    step(scheduler, runner)  # first's prompt: now decoding
    second, third = make_seq(10, request_id="b"), make_seq(2, request_id="c")
    scheduler.add(second)
    scheduler.add(third)
    batch, _ = step(scheduler, runner)
    assert [(s.seq.request_id, s.num_new_tokens) for s in batch.seqs] == [("a", 1), ("b", 7)]
    assert list(scheduler.waiting) == [third]
    batch, _ = step(scheduler, runner)
    assert [(s.seq.request_id, s.num_new_tokens) for s in batch.seqs] == [
        ("a", 1),
        ("b", 3),
        ("c", 2),
    ]
    run_to_completion(scheduler, runner)


def test_max_num_seqs_bounds_admission(make: MakeScheduler):
    scheduler, runner = make(max_num_seqs=2)
    seqs = [make_seq(3, max_tokens=3, request_id=str(i)) for i in range(5)]
    for seq in seqs:
        scheduler.add(seq)
    batch, _ = step(scheduler, runner)
    assert [s.seq for s in batch.seqs] == seqs[:2]
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 3)
    run_to_completion(scheduler, runner)
    assert all(len(s.output_token_ids) == 3 for s in seqs)


def test_free_blocks_bound_admission(make: MakeScheduler):
    scheduler, runner = make(num_blocks=4, block_size=4)
    big, small = make_seq(12, max_tokens=1, request_id="big"), make_seq(6, request_id="small")
    scheduler.add(big)
    scheduler.add(small)
    batch, _ = step(scheduler, runner)  # big takes 3 blocks, small would need 2
    assert [s.seq for s in batch.seqs] == [big]
    batch, _ = step(scheduler, runner)  # big finished and freed its blocks
    assert [s.seq for s in batch.seqs] == [small]
    run_to_completion(scheduler, runner)


# ------------------------------------------------------------------ preemption
def test_preempts_the_most_recently_admitted_and_recovers(make: MakeScheduler):
    scheduler, runner = make(num_blocks=6, block_size=2, max_num_batched_tokens=64)
    seqs = [make_seq([20 + i, 30 + i, 40 + i], max_tokens=6, request_id=str(i)) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    step(scheduler, runner)  # 3 prompts of 3 tokens: 2 blocks each, the cache is full
    step(scheduler, runner)  # position 3 still fits in each second block
    assert scheduler.block_manager.num_free_blocks == 0
    newcomer = make_seq([1, 2], max_tokens=2, request_id="new")
    scheduler.add(newcomer)
    batch, _ = step(scheduler, runner)  # position 4 needs a third block each
    last = seqs[2]
    assert batch.preempted == [last]
    assert [s.seq for s in batch.seqs] == seqs[:2]
    # Back to the front of the queue, ahead of requests that never ran.
    assert last.status is SequenceStatus.WAITING and list(scheduler.waiting) == [last, newcomer]
    assert (last.num_computed_tokens, len(last.output_token_ids)) == (0, 2)
    assert (last.num_preemptions, scheduler.num_preemptions) == (1, 1)
    outputs_before = list(last.output_token_ids)
    run_to_completion(scheduler, runner)
    assert last.output_token_ids[:2] == outputs_before
    assert outputs_of([*seqs, newcomer]) == reference_outputs([*seqs, newcomer])


def test_preemption_takes_several_victims_newest_first(make: MakeScheduler):
    scheduler, runner = make(num_blocks=8, block_size=2, max_num_batched_tokens=64)
    seqs = [make_seq([50 + i, 60 + i], max_tokens=5, request_id=str(i)) for i in range(3)]
    old = make_seq([7, 8, 9, 10, 11], max_tokens=8, request_id="old")
    scheduler.add(old)
    step(scheduler, runner)
    for seq in seqs:
        scheduler.add(seq)
    preempted: list[Sequence] = []
    while scheduler.has_unfinished():
        batch, _ = step(scheduler, runner)
        preempted.extend(batch.preempted)
        if batch.preempted:
            # No admission in a step that preempted: freed blocks go to the running ones.
            assert not any(s.seq in batch.preempted for s in batch.seqs)
    assert old.num_preemptions == 0  # the oldest is never the victim while others run
    assert scheduler.pop_failed() == []
    assert preempted and scheduler.num_preemptions == len(preempted)
    assert outputs_of([old, *seqs]) == reference_outputs([old, *seqs])


def test_preempted_sequence_reuses_its_cached_blocks(make: MakeScheduler):
    scheduler, runner = make(num_blocks=8, block_size=2, max_num_batched_tokens=64)
    first = make_seq([1, 2], max_tokens=6, request_id="a")
    second = make_seq([9] * 8, max_tokens=5, request_id="b")
    scheduler.add(first)
    scheduler.add(second)
    hits_before = scheduler.block_manager.prefix_cache_hits
    while second.num_preemptions == 0 and scheduler.has_unfinished():
        step(scheduler, runner)
    assert second.num_preemptions == 1 and second.num_computed_tokens == 0
    while second.num_computed_tokens == 0:
        step(scheduler, runner)
    # Readmitted: its own full blocks, still cached, are reused instead of recomputed.
    assert scheduler.block_manager.prefix_cache_hits - hits_before == 8
    assert second.num_computed_tokens > 8
    run_to_completion(scheduler, runner)
    assert second.num_cached_tokens == 0  # usage counts the first admission only


# ------------------------------------------------------------ prefix caching
def test_prefix_reuse_across_requests(make: MakeScheduler):
    scheduler, runner = make(block_size=4)
    prompt = list(range(100, 110))
    first = make_seq(prompt, max_tokens=2, request_id="a")
    scheduler.add(first)
    run_to_completion(scheduler, runner)
    manager = scheduler.block_manager
    queries, hits = manager.prefix_cache_queries, manager.prefix_cache_hits
    second = make_seq([*prompt[:9], 77, 78, 79], max_tokens=2, request_id="b")
    scheduler.add(second)
    batch, _ = step(scheduler, runner)
    assert second.num_cached_tokens == 8
    assert batch.seqs[0].num_new_tokens == 12 - 8
    assert (manager.prefix_cache_queries - queries, manager.prefix_cache_hits - hits) == (12, 8)
    run_to_completion(scheduler, runner)
    # Identical prompt: all but the last (partial) block is served; the last token runs.
    third = make_seq(list(prompt[:8]), max_tokens=1, request_id="c")
    scheduler.add(third)
    batch, _ = step(scheduler, runner)
    assert (third.num_cached_tokens, batch.seqs[0].num_new_tokens) == (4, 4)


def test_n_choices_share_the_prompt_blocks(make: MakeScheduler):
    scheduler, runner = make(block_size=4, max_num_batched_tokens=16)
    prompt = list(range(200, 210))
    parent = make_seq(prompt, max_tokens=4, request_id="n", index=0)
    children = [make_seq(prompt, max_tokens=4, request_id="n", index=i) for i in (1, 2)]
    for child in children:
        child.wait_for_seq = parent
    other = make_seq(3, max_tokens=2, request_id="other")
    for seq in [parent, *children, other]:
        scheduler.add(seq)
    batch, _ = step(scheduler, runner)
    # The children wait for the parent's prompt; a later request may go ahead meanwhile.
    assert [s.seq for s in batch.seqs] == [parent, other]
    batch, _ = step(scheduler, runner)
    assert [s.seq for s in batch.seqs] == [parent, other, *children]
    assert [s.num_new_tokens for s in batch.seqs[2:]] == [2, 2]
    shared = parent.block_table[:2]
    for child in children:
        assert child.num_cached_tokens == 8 and child.block_table[:2] == shared
    assert [scheduler.block_manager.ref_count(b) for b in shared] == [3, 3]
    run_to_completion(scheduler, runner)
    # Different choice indices sample differently (the fake runner mixes the index in).
    assert len({tuple(s.output_token_ids) for s in [parent, *children]}) > 1


def test_n_choices_without_prefix_caching_do_not_wait(make: MakeScheduler):
    scheduler, runner = make(prefix_caching=False)
    parent = make_seq(10, request_id="n")
    child = make_seq(10, request_id="n", index=1)
    child.wait_for_seq = parent
    scheduler.add(parent)
    scheduler.add(child)
    batch, _ = step(scheduler, runner)
    assert [s.seq for s in batch.seqs] == [parent, child]
    run_to_completion(scheduler, runner)


def test_child_of_a_finished_parent_is_admitted(make: MakeScheduler):
    scheduler, runner = make()
    parent = make_seq(10, request_id="n")
    child = make_seq(10, request_id="n", index=1)
    child.wait_for_seq = parent
    scheduler.add(parent)
    scheduler.add(child)
    scheduler.finish(parent, FinishReason.ERROR)
    batch, _ = step(scheduler, runner)
    assert [s.seq for s in batch.seqs] == [child]
    run_to_completion(scheduler, runner)


# ---------------------------------------------------------- abort and finish
def test_abort_frees_every_block_of_the_request(make: MakeScheduler):
    scheduler, runner = make(max_num_seqs=2, max_num_batched_tokens=8)
    mine = [make_seq(6, request_id="x", index=i) for i in range(3)]
    theirs = make_seq(4, max_tokens=3, request_id="y")
    for seq in [*mine, theirs]:
        scheduler.add(seq)
    step(scheduler, runner)  # two of "x" running (one mid-prefill), the rest waiting
    assert scheduler.block_manager.num_used_blocks > 0
    aborted = scheduler.abort_request("x")
    assert set(map(id, aborted)) == set(map(id, mine))
    for seq in mine:
        assert seq.is_finished and seq.finish_reason is FinishReason.ABORT
        assert seq.block_table == []
    assert scheduler.block_manager.num_used_blocks == 0
    assert scheduler.abort_request("x") == [] and scheduler.abort_request("nope") == []
    run_to_completion(scheduler, runner)
    assert theirs.finish_reason is FinishReason.LENGTH


def test_finish_is_idempotent_and_frees(make: MakeScheduler):
    scheduler, runner = make()
    seq = make_seq(5)
    scheduler.add(seq)
    step(scheduler, runner)
    scheduler.finish(seq, FinishReason.STOP)  # e.g. a stop string matched
    scheduler.finish(seq, FinishReason.ERROR)
    assert seq.finish_reason is FinishReason.STOP and seq.block_table == []
    assert not scheduler.has_unfinished()


def test_update_skips_a_sequence_finished_after_schedule(make: MakeScheduler):
    scheduler, runner = make()
    seq = make_seq(5)
    scheduler.add(seq)
    batch = scheduler.schedule()
    outputs = runner.execute(batch)
    scheduler.finish(seq, FinishReason.ABORT)
    assert scheduler.update(batch, outputs) == []
    assert seq.output_token_ids == []


def test_update_rejects_mismatched_outputs(make: MakeScheduler):
    scheduler, _ = make()
    scheduler.add(make_seq(5))
    batch = scheduler.schedule()
    with pytest.raises(ValueError):
        scheduler.update(batch, [])
    with pytest.raises(ValueError):
        scheduler.update(batch, [None])
    scheduler.abort_request("r")


# ------------------------------------------------------------------ too big
def test_prompt_larger_than_the_cache_fails_without_blocking_others(make: MakeScheduler):
    scheduler, runner = make(num_blocks=4, block_size=4)
    huge = make_seq(17, request_id="huge")
    fine = make_seq(5, max_tokens=2, request_id="fine")
    scheduler.add(huge)
    scheduler.add(fine)
    batch, _ = step(scheduler, runner)
    assert [s.seq for s in batch.seqs] == [fine]
    assert scheduler.pop_failed() == [huge] and scheduler.pop_failed() == []
    assert huge.finish_reason is FinishReason.ERROR and huge.is_finished
    run_to_completion(scheduler, runner)
    assert fine.finish_reason is FinishReason.LENGTH


def test_sequence_outgrowing_the_whole_cache_fails(make: MakeScheduler):
    scheduler, runner = make(num_blocks=2, block_size=4)
    seq = make_seq(6, max_tokens=20)
    scheduler.add(seq)
    run_to_completion(scheduler, runner)
    assert scheduler.pop_failed() == [seq]
    assert seq.finish_reason is FinishReason.ERROR
    assert len(seq.output_token_ids) == 3  # positions 0..7 fit; the 9th token cannot


# ------------------------------------------------------------------- stops
@pytest.mark.parametrize(
    "script, params, max_tokens, expected",
    [
        ([5, 6, EOS, 7], {}, 8, (3, FinishReason.STOP, None)),
        ([5, EOS, EOS, 7], {"min_tokens": 3}, 8, (3, FinishReason.STOP, None)),
        ([EOS, EOS, 7, 8], {"ignore_eos": True}, 4, (4, FinishReason.LENGTH, None)),
        ([5, 42, 7], {"stop_token_ids": (42,)}, 8, (2, FinishReason.STOP, 42)),
        ([5, 6, 7, 8], {}, 3, (3, FinishReason.LENGTH, None)),
        ([5, 6, EOS], {}, 3, (3, FinishReason.STOP, None)),
    ],
)
def test_token_level_stops(make: MakeScheduler, script, params, max_tokens, expected):
    scheduler, runner = make(next_token=scripted(script))
    seq = make_seq(4, max_tokens=max_tokens, **params)
    scheduler.add(seq)
    updates: list[SeqUpdate] = []
    while scheduler.has_unfinished():
        updates.extend(step(scheduler, runner)[1])
    assert [u.output.token_id for u in updates] == script[: expected[0]]
    assert all(u.finish_reason is None for u in updates[:-1])
    last = updates[-1]
    assert (len(seq.output_token_ids), last.finish_reason, last.stop_reason) == expected
    assert seq.finish_reason is expected[1]


def test_context_window_full_is_length(make: MakeScheduler):
    scheduler, runner = make(max_model_len=12)
    seq = make_seq(9, max_tokens=100)
    scheduler.add(seq)
    run_to_completion(scheduler, runner)
    assert (seq.num_tokens, seq.finish_reason) == (12, FinishReason.LENGTH)


def test_add_rejects_a_sequence_that_is_not_waiting(make: MakeScheduler):
    scheduler, _ = make()
    seq = make_seq(3)
    seq.status = SequenceStatus.FINISHED
    with pytest.raises(ValueError):
        scheduler.add(seq)


# ------------------------------------------------------------- randomized
def reference_outputs(
    seqs: list[Sequence], eos_one_in: int = 0
) -> dict[tuple[str, int], list[int]]:
    """Each sequence run alone with a big cache and no prefix caching."""
    result = {}
    for seq in seqs:
        scheduler, runner = build(num_blocks=256, prefix_caching=False, eos_one_in=eos_one_in)
        alone = Sequence(seq.request_id, list(seq.prompt_token_ids), seq.params, seq.max_tokens)
        alone.index = seq.index
        scheduler.add(alone)
        run_to_completion(scheduler, runner)
        result[(seq.request_id, seq.index)] = alone.output_token_ids
    return result


def outputs_of(seqs: list[Sequence]) -> dict[tuple[str, int], list[int]]:
    return {(s.request_id, s.index): s.output_token_ids for s in seqs}


request_strategy = st.tuples(
    st.lists(st.integers(3, 5), min_size=1, max_size=24),  # prompt: tiny alphabet, shared prefixes
    st.integers(1, 16),  # max_tokens
    st.integers(1, 3),  # n
    st.integers(0, 6),  # arrival step
)


@settings(max_examples=150, deadline=None)
@given(
    requests=st.lists(request_strategy, min_size=1, max_size=8),
    block_size=st.sampled_from([1, 2, 4, 8]),
    extra_blocks=st.integers(0, 6),
    max_num_seqs=st.integers(1, 6),
    max_num_batched_tokens=st.integers(1, 40),
    prefix_caching=st.booleans(),
    abort_index=st.one_of(st.none(), st.integers(0, 7)),
)
def test_random_workloads_finish_with_the_same_outputs(
    requests,
    block_size,
    extra_blocks,
    max_num_seqs,
    max_num_batched_tokens,
    prefix_caching,
    abort_index,
):
    longest = max(len(prompt) + max_tokens for prompt, max_tokens, _, _ in requests)
    num_blocks = -(-longest // block_size) + extra_blocks  # the largest sequence always fits
    scheduler, runner = build(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        prefix_caching=prefix_caching,
        eos_one_in=7,
    )
    seqs: list[Sequence] = []
    for step_index in range(5000):
        for req_index, (prompt, max_tokens, n, arrival) in enumerate(requests):
            if arrival == step_index:
                seqs.extend(add_request(scheduler, f"req{req_index}", prompt, max_tokens, n))
        if step_index == 3 and abort_index is not None:
            scheduler.abort_request(f"req{abort_index}")
        if not scheduler.has_unfinished() and step_index > 6:
            break
        step(scheduler, runner)
    assert not scheduler.has_unfinished()
    assert scheduler.pop_failed() == []
    assert scheduler.block_manager.num_used_blocks == 0
    scheduler.block_manager.check_invariants()
    done = [s for s in seqs if s.finish_reason is not FinishReason.ABORT]
    reference = reference_outputs(done, eos_one_in=7)
    assert outputs_of(done) == reference
    for seq in done:
        assert seq.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert seq.num_cached_tokens < seq.num_prompt_tokens
    # Coverage of the interesting paths (see --hypothesis-show-statistics).
    event(f"preempted: {scheduler.num_preemptions > 0}")
    event(f"prefix hits: {scheduler.block_manager.prefix_cache_hits > 0}")
    event(f"chunked: {any(len(s.prompt_token_ids) > max_num_batched_tokens for s in seqs)}")


def add_request(
    scheduler: Scheduler, request_id: str, prompt: list[int], max_tokens: int, n: int
) -> list[Sequence]:
    seqs = []
    for index in range(n):
        seq = make_seq(list(prompt), max_tokens, request_id, index)
        seq.wait_for_seq = seqs[0] if seqs else None
        scheduler.add(seq)
        seqs.append(seq)
    return seqs


def test_sample_output_type_is_what_update_appends(make: MakeScheduler):
    scheduler, _ = make()
    seq = make_seq(2)
    scheduler.add(seq)
    batch = scheduler.schedule()
    (update,) = scheduler.update(batch, [SampleOutput(token_id=9, logprob=-0.5)])
    assert update.output.logprob == -0.5 and seq.output_token_ids == [9]
    scheduler.finish(seq, FinishReason.STOP)


# ------------------------------------------------------------ turns between clients
def test_fair_order_takes_turns_between_clients_fewest_running_first():
    def seqs_of(client: str, count: int) -> list[Sequence]:
        made = [make_seq(2, request_id=f"{client}{i}") for i in range(count)]
        for seq in made:
            seq.client = client
        return made

    a, b, c = seqs_of("a", 3), seqs_of("b", 2), seqs_of("c", 1)
    waiting = [*a, *b, *c]
    assert fair_order(waiting, []) == [a[0], b[0], c[0], a[1], b[1], a[2]]
    # a runs two sequences already: b and c go first, then everyone has two
    running = seqs_of("a", 2)
    assert fair_order(waiting, running) == [b[0], c[0], b[1], a[0], a[1], a[2]]
    assert fair_order(a, running) == a  # one client: its own order
    assert fair_order([*b, *a], []) == [b[0], a[0], b[1], a[1], a[2]]  # ties: first come


def test_a_small_request_of_another_client_gets_the_next_free_slot(make: MakeScheduler):
    scheduler, runner = make(max_num_seqs=2)
    flood = []
    for i in range(6):  # client a: six sequences, two run, four wait; a0 ends first
        (seq,) = add_request(scheduler, f"a{i}", [11, 12, 13], max_tokens=5 if i == 0 else 40, n=1)
        seq.client = "a"
        flood.append(seq)
    step(scheduler, runner)
    (small,) = add_request(scheduler, "b", [14], max_tokens=1, n=1)
    small.client = "b"
    while not flood[0].is_finished:
        step(scheduler, runner)
        assert small.status is SequenceStatus.WAITING  # no free slot yet
    step(scheduler, runner)  # one slot is free: b's turn (a runs one), not a2's
    assert small.is_finished and flood[2].status is SequenceStatus.WAITING
    run_to_completion(scheduler, runner)
