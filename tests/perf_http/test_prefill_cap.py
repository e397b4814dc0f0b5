"""The scheduler's decode-first policy, counted in tokens per step (no clock, no model).

While some sequence decodes, a step carries at most `max_prefill_tokens_while_decoding`
prompt tokens, so its duration stays near a decode step's; a long prompt still makes
progress every step and gets its first token; with nobody decoding, prefill gets the
whole budget; and a prefill chunk never takes the tokens of decodes listed after it.
"""

from __future__ import annotations

import random

import pytest

from app.config import load_settings
from app.core import SamplingParams, ScheduledBatch, Sequence
from app.engine.block_manager import BlockManager
from app.engine.engine_core import EngineCore
from app.engine.scheduler import Scheduler, is_decoding
from tests.unit.fakes import FakeRunner, FakeTokenizer

BLOCK_SIZE = 4


def build(cap: int | None, budget: int = 64, num_blocks: int = 512, max_num_seqs: int = 16):
    manager = BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=True)
    scheduler = Scheduler(
        manager,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=1024,
        eos_token_ids=frozenset({FakeTokenizer.EOS}),
        max_prefill_tokens_while_decoding=cap,
    )
    runner = FakeRunner(block_size=BLOCK_SIZE, num_blocks=num_blocks, max_model_len=1024)
    return scheduler, runner


def new_seq(num_prompt: int, max_tokens: int, request_id: str, first_token: int = 10) -> Sequence:
    prompt = list(range(first_token, first_token + num_prompt))
    return Sequence(request_id, prompt, SamplingParams(ignore_eos=True), max_tokens)


def split_tokens(batch: ScheduledBatch) -> tuple[int, int]:
    """(decode tokens, prefill tokens) of a planned batch, before update() runs."""
    num_decode = sum(1 for s in batch.seqs if is_decoding(s.seq))
    return num_decode, batch.num_batched_tokens - num_decode


def run_step(scheduler: Scheduler, runner: FakeRunner) -> ScheduledBatch:
    batch = scheduler.schedule()
    scheduler.update(batch, runner.execute(batch) if batch.seqs else [])
    return batch


@pytest.mark.parametrize("cap", [1, 7, 16, 40])
def test_no_step_with_decodes_carries_more_than_the_cap_of_prefill(cap: int):
    scheduler, runner = build(cap)
    rng = random.Random(cap)
    num_capped_steps = 0
    for step in range(400):
        if step % 9 == 0:  # a steady trickle of arrivals, some with long prompts
            num_prompt = rng.choice([3, 17, 90, 200])
            scheduler.add(new_seq(num_prompt, rng.randint(1, 30), f"r{step}", 10 + step))
        decoding = {seq.seq_id for seq in scheduler.running if is_decoding(seq)}
        batch = scheduler.schedule()
        _, num_prefill = split_tokens(batch)
        if decoding:
            assert num_prefill <= cap, f"step {step}: {num_prefill} prefill tokens"
            num_capped_steps += 1
        # Every decode runs (or was preempted for blocks): prefill never crowds it out.
        advanced = {s.seq.seq_id for s in batch.seqs} | {seq.seq_id for seq in batch.preempted}
        assert decoding <= advanced
        scheduler.update(batch, runner.execute(batch) if batch.seqs else [])
    assert num_capped_steps > 100  # the workload really mixed decodes and prefills
    while scheduler.has_unfinished():
        run_step(scheduler, runner)


def test_a_long_prompt_progresses_every_step_and_gets_its_first_token():
    cap, num_prompt = 16, 100
    scheduler, runner = build(cap)
    decoders = [new_seq(5, 200, f"d{i}", 10 + i) for i in range(4)]
    for seq in decoders:
        scheduler.add(seq)
    run_step(scheduler, runner)  # their prompts; from now on they decode
    long = new_seq(num_prompt, 4, "long", 500)
    scheduler.add(long)
    chunks = []
    while not long.output_token_ids:
        batch = run_step(scheduler, runner)
        decoded = {s.seq.request_id for s in batch.seqs if s.num_new_tokens == 1}
        assert {seq.request_id for seq in decoders} <= decoded, "a decode was skipped"
        chunks.extend(s.num_new_tokens for s in batch.seqs if s.seq is long)
    assert chunks == [cap] * (num_prompt // cap) + [num_prompt % cap]
    assert all(len(seq.output_token_ids) == 1 + len(chunks) for seq in decoders)


def test_a_short_prompt_does_not_wait_for_every_chunk_of_a_long_one():
    cap = 32
    scheduler, runner = build(cap)
    decoder = new_seq(4, 300, "d")
    scheduler.add(decoder)
    run_step(scheduler, runner)
    long = new_seq(300, 4, "long", 100)
    scheduler.add(long)
    run_step(scheduler, runner)  # alone in line: the whole capped budget
    assert long.num_computed_tokens == cap
    short = new_seq(10, 4, "short", 600)
    scheduler.add(short)
    batch = run_step(scheduler, runner)
    chunks = {s.seq.request_id: s.num_new_tokens for s in batch.seqs}
    assert chunks == {"d": 1, "long": cap // 2, "short": 10}
    assert short.output_token_ids  # its first token, one step after it arrived
    batch = run_step(scheduler, runner)  # nobody waits any more: long gets the whole cap
    assert {s.seq.request_id: s.num_new_tokens for s in batch.seqs}["long"] == cap
    for seq in (decoder, long, short):
        scheduler.abort_request(seq.request_id)


def test_without_decodes_prefill_takes_the_whole_budget():
    scheduler, runner = build(cap=8, budget=64)
    seqs = [new_seq(40, 2, f"r{i}", 10 + 50 * i) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    batch = run_step(scheduler, runner)
    assert [s.num_new_tokens for s in batch.seqs] == [40, 24]
    # seqs[0] now decodes: seqs[1]'s remaining chunk and seqs[2] share the cap.
    batch = run_step(scheduler, runner)
    assert split_tokens(batch) == (1, 8)


def test_no_cap_keeps_the_plain_token_budget():
    scheduler, runner = build(cap=None, budget=32)
    decoder = new_seq(4, 50, "d")
    scheduler.add(decoder)
    run_step(scheduler, runner)
    scheduler.add(new_seq(100, 2, "long", 300))
    batch = run_step(scheduler, runner)
    assert split_tokens(batch) == (1, 31)


def test_a_prefill_chunk_leaves_the_budget_of_decodes_listed_after_it():
    scheduler, runner = build(cap=None, budget=8)
    decoders = [new_seq(2, 50, f"d{i}", 10 + 5 * i) for i in range(3)]
    for seq in decoders:
        scheduler.add(seq)
    run_step(scheduler, runner)
    long = new_seq(60, 2, "long", 300)
    scheduler.add(long)
    run_step(scheduler, runner)  # long's first chunk: 8 - 3 decodes = 5 tokens
    assert long.num_computed_tokens == 5
    # Put the half-computed prompt first in line, as if admitted before the decoders.
    scheduler.running.remove(long)
    scheduler.running.insert(0, long)
    batch = run_step(scheduler, runner)
    assert [(s.seq.request_id, s.num_new_tokens) for s in batch.seqs] == [
        ("long", 5),
        ("d0", 1),
        ("d1", 1),
        ("d2", 1),
    ]
    for seq in [*decoders, long]:
        scheduler.abort_request(seq.request_id)
    assert scheduler.block_manager.num_used_blocks == 0


def test_the_cap_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        build(cap=0)


@pytest.mark.parametrize(("setting", "expected"), [(None, 256), (64, 64), (0, None)])
def test_the_setting_reaches_the_scheduler(setting: int | None, expected: int | None):
    overrides = {} if setting is None else {"max_prefill_tokens_while_decoding": setting}
    settings = load_settings(environ={}, **overrides)
    runner = FakeRunner(block_size=BLOCK_SIZE, num_blocks=64, max_model_len=256)
    core = EngineCore(runner, FakeTokenizer(), settings)
    assert core.scheduler.max_prefill_tokens_while_decoding == expected


def test_the_environment_variable_sets_the_cap():
    environ = {"LAMINA_MAX_PREFILL_TOKENS_WHILE_DECODING": "96"}
    assert load_settings(environ=environ).max_prefill_tokens_while_decoding == 96
