"""Request priority in the scheduler (app/engine/priority.py), with the FakeRunner and a
fake clock: start order, turns within a level, preemption for priority, ageing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.core import FinishReason, Sequence, SequenceStatus
from app.engine.priority import effective_priority, preemption_victims
from app.engine.scheduler import Scheduler
from tests.unit.fakes import FakeRunner
from tests.unit.test_scheduler import (
    add_request,
    build,
    check_batch,
    make_seq,
    outputs_of,
    reference_outputs,
    request_strategy,
)


def seq_of(
    name: str, priority: int, prompt: int | list[int] = 3, max_tokens: int = 4, **fields
) -> Sequence:
    seq = make_seq(prompt, max_tokens=max_tokens, request_id=name)
    seq.priority = priority
    for key, value in fields.items():
        setattr(seq, key, value)
    return seq


def step_at(scheduler: Scheduler, runner: FakeRunner, now: float) -> list[str]:
    """One step at engine time `now`; the request ids it scheduled."""
    batch = scheduler.schedule(now)
    check_batch(scheduler, batch)
    outputs = runner.execute(batch) if batch.seqs else []
    scheduler.update(batch, outputs)
    scheduler.block_manager.check_invariants()
    return [s.seq.request_id for s in batch.seqs]


def run_all(scheduler: Scheduler, runner: FakeRunner, now: float = 0.0) -> None:
    for _ in range(1000):
        if not scheduler.has_unfinished():
            return
        step_at(scheduler, runner, now)
    raise AssertionError("did not finish")


def started_order(seqs: list[Sequence]) -> list[str]:
    return [s.request_id for s in sorted(seqs, key=lambda s: s.first_scheduled_time or 0)]


def test_waiting_sequences_start_by_priority_then_arrival() -> None:
    scheduler, runner = build(max_num_seqs=1)
    seqs = [seq_of("low", 5), seq_of("high", 0), seq_of("mid", 3), seq_of("high2", 0)]
    for seq in seqs:
        scheduler.add(seq)
    order = []
    for _ in range(200):
        for name in step_at(scheduler, runner, now=0.0):
            if name not in order:
                order.append(name)
        if not scheduler.has_unfinished():
            break
    assert order == ["high", "high2", "mid", "low"]
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)


def test_clients_take_turns_within_a_level_only() -> None:
    """Client a holds one of two slots for long; the other slot goes to the most urgent
    first, then in turns: b, which runs nothing, before a's others."""
    scheduler, runner = build(max_num_seqs=2)
    scheduler.add(seq_of("a0", 1, max_tokens=40, client="a"))
    step_at(scheduler, runner, now=0.0)
    waiting = [seq_of(f"a{i}", 1, client="a") for i in (1, 2)]
    waiting += [seq_of("b0", 1, client="b"), seq_of("c0", 0, client="c")]
    for seq in waiting:
        scheduler.add(seq)
    order: list[str] = []
    while scheduler.has_unfinished():
        for name in step_at(scheduler, runner, now=0.0):
            if name not in order:
                order.append(name)
    assert order == ["a0", "c0", "b0", "a1", "a2"]


def test_a_full_cache_preempts_a_lower_priority_for_a_higher_one() -> None:
    # 6 blocks of 2 tokens: three 3-token prompts fill the cache.
    scheduler, runner = build(num_blocks=6, block_size=2, max_num_batched_tokens=64)
    low = [seq_of(f"low{i}", 5, max_tokens=6) for i in range(3)]
    for seq in low:
        scheduler.add(seq)
    step_at(scheduler, runner, 0.0)
    assert scheduler.block_manager.num_free_blocks == 0
    high = seq_of("high", 0, prompt=[90, 91, 92], max_tokens=3)  # no prefix shared
    scheduler.add(high)
    batch = scheduler.schedule(0.0)
    assert batch.preempted == [low[2]]  # the most recently started of the lowest
    assert high in [s.seq for s in batch.seqs] and low[2].status is SequenceStatus.WAITING
    outputs = runner.execute(batch)
    scheduler.update(batch, outputs)
    run_all(scheduler, runner)
    assert all(s.finish_reason is FinishReason.LENGTH for s in [*low, high])
    assert low[2].num_preemptions >= 1 and len(low[2].output_token_ids) == 6


def test_no_preemption_among_equals() -> None:
    scheduler, runner = build(max_num_seqs=2)
    for name in ("r0", "r1"):
        scheduler.add(seq_of(name, 1, max_tokens=6))
    step_at(scheduler, runner, 0.0)
    scheduler.add(seq_of("equal", 1))
    batch = scheduler.schedule(0.0)
    assert batch.preempted == [] and scheduler.num_waiting == 1  # it waits its turn
    scheduler.update(batch, runner.execute(batch))
    run_all(scheduler, runner)


def test_no_preemption_when_it_would_not_make_room() -> None:
    # 6 blocks of 2 tokens, all held; the urgent prompt needs 5, its one victim frees 2.
    scheduler, runner = build(num_blocks=6, block_size=2, max_num_batched_tokens=64)
    scheduler.add(seq_of("r0", 9, prompt=[60, 61, 62], max_tokens=2))
    for name in ("r1", "r2"):
        scheduler.add(seq_of(name, 0, max_tokens=2))  # as urgent as the newcomer
    step_at(scheduler, runner, 0.0)
    assert scheduler.block_manager.num_free_blocks == 0
    scheduler.add(seq_of("huge", 0, prompt=list(range(70, 79))))
    batch = scheduler.schedule(0.0)
    assert batch.preempted == [] and scheduler.num_running == 3
    scheduler.update(batch, runner.execute(batch))
    run_all(scheduler, runner)


def test_a_running_slot_is_freed_for_a_higher_priority() -> None:
    scheduler, runner = build(max_num_seqs=2)
    low = [seq_of("low0", 4, max_tokens=20), seq_of("low1", 4, max_tokens=20)]
    for seq in low:
        scheduler.add(seq)
    step_at(scheduler, runner, 0.0)
    scheduler.add(seq_of("high", 0))
    batch = scheduler.schedule(0.0)
    assert batch.preempted == [low[1]]
    assert [s.request_id for s in scheduler.running] == ["high", "low0"]  # most urgent first
    scheduler.update(batch, runner.execute(batch))
    run_all(scheduler, runner)


def test_ageing_improves_a_waiting_priority_by_one_per_period() -> None:
    seq = seq_of("s", 3, waiting_since=10.0)
    assert [effective_priority(seq, now, 2.0) for now in (10.0, 11.9, 12.0, 14.5)] == [3, 3, 2, 1]
    assert effective_priority(seq, 100.0, 2.0, best=2) == 2  # aged up to the best waiting
    assert effective_priority(seq, 100.0, None) == 3  # no ageing
    assert effective_priority(seq, None, 2.0) == 3  # no clock given


def test_ageing_bounds_how_long_a_low_priority_waits_behind_a_stream_of_high() -> None:
    """One slot; a new priority-0 request arrives every second, each running one second
    (three steps: its prompt and two decodes).
    The priority-3 request, aged by 1 per second, starts once it waited 3 s (a tie at
    level 0, where it is the oldest)."""
    scheduler, runner = build(max_num_seqs=1)
    scheduler.priority_ageing_s = 1.0
    low = seq_of("low", 3, max_tokens=2)
    scheduler.add(low)
    started_at = None
    for second in range(10):
        now = float(second)
        scheduler.add(seq_of(f"high{second}", 0, max_tokens=3, arrival_time=now))
        for _ in range(3):
            if "low" in step_at(scheduler, runner, now) and started_at is None:
                started_at = now
        if started_at is not None:
            break
    assert started_at == 3.0
    assert low.running_priority == 0
    run_all(scheduler, runner, now=20.0)
    assert low.finish_reason is FinishReason.LENGTH


def test_ageing_keeps_one_priority_at_one_level_so_clients_still_take_turns() -> None:
    """A's flood waited 100 s, B's request just came: at one priority, B gets the next
    free slot (A already runs one), as without ageing."""
    scheduler, runner = build(max_num_seqs=2)
    scheduler.priority_ageing_s = 1.0
    scheduler.add(seq_of("a0", 0, max_tokens=30, client="a"))
    scheduler.add(seq_of("a1", 0, max_tokens=3, client="a"))
    step_at(scheduler, runner, 0.0)
    for name in ("a2", "a3"):
        scheduler.add(seq_of(name, 0, client="a"))
    scheduler.add(seq_of("b0", 0, client="b", arrival_time=100.0))
    order: list[str] = []
    while scheduler.has_unfinished():
        for name in step_at(scheduler, runner, now=100.0):
            if name not in order:
                order.append(name)
    assert order == ["a0", "a1", "b0", "a2", "a3"]


def test_ageing_never_preempts() -> None:
    """Requests of one priority that waited for ages preempt nobody; nor does an aged
    low-priority one preempt the work it caught up with."""
    scheduler, runner = build(max_num_seqs=1)
    scheduler.priority_ageing_s = 1.0
    for name, priority in (("first", 0), ("second", 0), ("low", 4)):
        scheduler.add(seq_of(name, priority, max_tokens=8))
    now = 0.0
    while scheduler.has_unfinished():
        now += 100.0  # every waiting sequence ages by 100 levels a step
        step_at(scheduler, runner, now)
    assert scheduler.num_preemptions == 0


def test_a_sequence_keeps_the_priority_it_started_with() -> None:
    """An aged sequence is not preempted by the work it overtook: it runs at the
    effective priority it started with; preempted, it ages anew from then."""
    aged = seq_of("aged", 5, running_priority=0)
    fresh = seq_of("fresh", 0, running_priority=0)
    assert preemption_victims([aged, fresh], priority=0) == []
    assert preemption_victims([aged, fresh], priority=-1) == [fresh, aged]
    lowest_first = [seq_of("a", 0, running_priority=2), seq_of("b", 0, running_priority=7)]
    assert preemption_victims(lowest_first, priority=1) == lowest_first[::-1]


@settings(max_examples=100, deadline=None)
@given(
    requests=st.lists(
        st.tuples(request_strategy, st.integers(-2, 4)), min_size=1, max_size=8
    ),  # (request, priority)
    block_size=st.sampled_from([1, 2, 4]),
    extra_blocks=st.integers(0, 6),
    max_num_seqs=st.integers(1, 6),
    max_num_batched_tokens=st.integers(1, 40),
    ageing_s=st.one_of(st.none(), st.sampled_from([0.5, 2.0])),
)
def test_random_prioritized_workloads_finish_with_the_same_outputs(
    requests, block_size, extra_blocks, max_num_seqs, max_num_batched_tokens, ageing_s
):
    """Priorities, preemption for them and ageing (0.1 s per step) never deadlock nor
    livelock, and change no sequence's tokens."""
    longest = max(len(prompt) + max_tokens for (prompt, max_tokens, _, _), _ in requests)
    scheduler, runner = build(
        num_blocks=-(-longest // block_size) + extra_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        eos_one_in=7,
    )
    scheduler.priority_ageing_s = ageing_s
    seqs: list[Sequence] = []
    for step_index in range(5000):
        now = step_index * 0.1
        for req_index, ((prompt, max_tokens, n, arrival), priority) in enumerate(requests):
            if arrival == step_index:
                added = add_request(scheduler, f"req{req_index}", prompt, max_tokens, n)
                for seq in added:
                    seq.priority = priority
                    seq.waiting_since = seq.arrival_time = now
                seqs.extend(added)
        if not scheduler.has_unfinished() and step_index > 6:
            break
        step_at(scheduler, runner, now)
    assert not scheduler.has_unfinished() and scheduler.pop_failed() == []
    assert scheduler.block_manager.num_used_blocks == 0
    assert outputs_of(seqs) == reference_outputs(seqs, eos_one_in=7)
