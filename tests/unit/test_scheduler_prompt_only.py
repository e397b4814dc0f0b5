"""Scheduler: prompt-only sequences (max_tokens 0) and the prefix-cache rule of prompt
outputs (Sequence.needs_every_prompt_row), with the FakeRunner."""

from __future__ import annotations

from app.core import FinishReason
from tests.unit.test_scheduler import build, make_seq, run_to_completion, step


def test_prompt_only_sequence_computes_its_prompt_in_chunks_and_samples_nothing():
    scheduler, runner = build(max_num_batched_tokens=4)
    seq = make_seq(10, max_tokens=0)
    scheduler.add(seq)
    plan = []
    for _ in range(3):
        batch, updates = step(scheduler, runner)
        plan.append((batch.seqs[0].num_new_tokens, batch.seqs[0].sample, len(updates)))
    assert plan == [(4, False, 0), (4, False, 0), (2, False, 1)]
    assert updates[0].output is None and updates[0].finish_reason is FinishReason.LENGTH
    assert seq.is_finished and seq.output_token_ids == [] and seq.block_table == []
    assert not scheduler.has_unfinished()


def test_prompt_outputs_over_every_position_skip_the_prefix_cache_lookup():
    scheduler, runner = build(block_size=4)
    prompt = list(range(10, 23))  # 13 tokens: 3 full blocks may be shared
    scheduler.add(make_seq(prompt, max_tokens=1, request_id="warm"))
    run_to_completion(scheduler, runner)
    wanted = {
        "logprobs": make_seq(prompt, max_tokens=0, request_id="a", prompt_logprobs=0),
        "mean": make_seq(prompt, max_tokens=0, request_id="b", pooling="mean"),
        "last": make_seq(prompt, max_tokens=0, request_id="c", pooling="last"),
        "plain": make_seq(prompt, max_tokens=1, request_id="d"),
    }
    for seq in wanted.values():
        scheduler.add(seq)
    run_to_completion(scheduler, runner)
    cached = {name: seq.num_cached_tokens for name, seq in wanted.items()}
    # last-token pooling needs only the last position, always computed
    assert cached == {"logprobs": 0, "mean": 0, "last": 12, "plain": 12}
    # the prefix cache still serves the others
    late = make_seq(prompt, max_tokens=1, request_id="e")
    scheduler.add(late)
    run_to_completion(scheduler, runner)
    assert late.num_cached_tokens == 12
