"""Speculative decoding with the FakeRunner: drafts, verification, rollback, identity.

The FakeRunner samples from the context it reads back through the block table, so a
draft position left stale after a rollback, a block registered with unconfirmed tokens
or a block table too short fails loudly; outputs depend only on each sequence's tokens,
so speculation on and off must give the same tokens, token for token.
"""

from __future__ import annotations

import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from app.config import load_settings
from app.core import FinishReason, SampleOutput, SamplingParams, Sequence
from app.engine.block_manager import BlockManager
from app.engine.engine_core import EngineCore
from app.engine.scheduler import Scheduler, is_decoding
from app.engine.speculative import NgramIndex, NgramSpeculator, accepted_prefix
from tests.unit.fakes import FakeRunner, FakeTokenizer

EOS = FakeTokenizer.EOS
PERIOD = 7


def copy_with_edits(context: list[int], seq: Sequence) -> int:
    """The token PERIOD positions back, except about one position in five (a hash of
    the context decides): a text repeated with edits, where prompt lookup guesses well
    but not always."""
    digest = zlib.crc32(repr(context[-6:] + [len(context)]).encode())
    if digest % 5 == 0:
        return 10 + digest % 50
    return context[-PERIOD] if len(context) >= PERIOD else context[0]


# --------------------------------------------------------------------- drafting
def test_ngram_index_prefers_the_longest_match_then_the_latest():
    index = NgramIndex(1, 3)
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 1, 9, 7, 2, 6, 7]  # ends in (6, 7): earlier at 1..2 (then 1)
    assert index.propose(tokens, 3) == [1, 9, 7]
    # (7,) alone last occurred at 5 (followed by 2), but the 2-gram match wins above;
    # with only 1-grams the latest occurrence is taken.
    assert NgramIndex(1, 1).propose(tokens, 2) == [2, 6]
    assert NgramIndex(2, 3).propose([1, 2, 3], 4) == []  # nothing repeats
    # Grows incrementally: the suffix never matches itself.
    tokens += [1]
    assert index.propose(tokens, 2) == [9, 7]


def test_accepted_prefix_keeps_samples_while_drafts_match():
    def sample(token_id: int, *following: int) -> SampleOutput:
        return SampleOutput(token_id, after_drafts=tuple(SampleOutput(t) for t in following))

    ids = lambda kept: [s.token_id for s in kept]  # noqa: E731
    assert ids(accepted_prefix((4, 5, 6), sample(4, 5, 6, 7))) == [4, 5, 6, 7]
    assert ids(accepted_prefix((4, 5, 6), sample(4, 9, 6, 7))) == [4, 9]
    assert ids(accepted_prefix((4, 5, 6), sample(3, 5, 6, 7))) == [3]


def test_low_acceptance_pauses_a_sequence_then_probes_again():
    speculator = NgramSpeculator(4, 1, 2, 8, min_verifies=3, reprobe_interval=5)
    seq = Sequence("r", [1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(), 100)
    seq.output_token_ids = [3]
    for _ in range(3):
        assert speculator.propose(seq, 4) == (1, 2, 3, 1)
        speculator.record(seq, 4, 0)
    paused = [speculator.propose(seq, 4) for _ in range(5)]
    assert paused == [()] * 5
    assert speculator.propose(seq, 4) == (1, 2, 3, 1)  # the probe
    speculator.record(seq, 4, 4)
    assert speculator.propose(seq, 4) == (1, 2, 3, 1)  # it did well: on again
    assert seq.num_draft_tokens == 16 and seq.num_accepted_draft_tokens == 4


# --------------------------------------------------------------- the scheduler
def _run(
    prompts: list[list[int]],
    speculative: bool,
    *,
    num_blocks: int = 64,
    max_num_batched_tokens: int = 32,
    prefix_caching: bool = True,
    max_tokens: int = 24,
    eos_one_in: int = 0,
    num_spec_tokens: int = 4,
) -> tuple[dict[str, list[int]], Scheduler]:
    manager = BlockManager(num_blocks, 4, prefix_caching)
    speculator = NgramSpeculator(num_spec_tokens, 1, 3, 64) if speculative else None

    def rolled_back(scheduler: Scheduler) -> None:  # no block past the confirmed tokens
        for seq in scheduler.running:
            assert len(seq.block_table) == manager.num_blocks_for(seq.num_computed_tokens)

    return run_scheduler(
        manager, speculator, prompts, max_num_batched_tokens, max_tokens, eos_one_in, rolled_back
    )


def run_scheduler(
    manager: BlockManager,
    speculator,
    prompts: list[list[int]],
    max_num_batched_tokens: int,
    max_tokens: int,
    eos_one_in: int,
    after_step,
) -> tuple[dict[str, list[int]], Scheduler]:
    """Greedy requests through a Scheduler and a FakeRunner (the target) to the end, the
    books checked after every step (then `after_step(scheduler)`); each request's
    output tokens and the scheduler. Shared by the prompt-lookup and draft-model tests."""
    scheduler = Scheduler(
        manager,
        max_num_seqs=8,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=256,
        eos_token_ids=frozenset({EOS}),
        speculator=speculator,
    )
    runner = FakeRunner(
        block_size=manager.block_size,
        num_blocks=manager.num_blocks,
        next_token=copy_with_edits,
        eos_one_in=eos_one_in,
    )
    seqs = [
        Sequence(f"r{i}", prompt, SamplingParams(temperature=0), max_tokens)
        for i, prompt in enumerate(prompts)
    ]
    for seq in seqs:
        scheduler.add(seq)
    for _ in range(5000):
        if not scheduler.has_unfinished():
            break
        batch = scheduler.schedule()
        assert batch.num_batched_tokens <= max_num_batched_tokens
        outputs = runner.execute(batch) if batch.seqs else []
        scheduler.update(batch, outputs)
        manager.check_invariants()
        after_step(scheduler)
    assert not scheduler.has_unfinished()
    assert manager.num_used_blocks == 0
    return {seq.request_id: seq.output_token_ids for seq in seqs}, scheduler


def _prompts(lengths: list[int]) -> list[list[int]]:
    base = [10 + (i * 3) % PERIOD for i in range(PERIOD)]  # a short repeating pattern
    return [(base * 40)[:length] for length in lengths]


def test_speculation_gives_the_same_tokens_in_fewer_steps():
    prompts = _prompts([12, 30, 5, 21])
    plain, _ = _run(prompts, speculative=False)
    fast, scheduler = _run(prompts, speculative=True)
    assert fast == plain
    stats = scheduler.speculator.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # some right, some wrong
    assert stats.accepted_per_position[0] >= stats.accepted_per_position[-1] > 0


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    num_blocks=st.integers(14, 64),
    budget=st.integers(16, 48),
    prefix_caching=st.booleans(),
    eos_one_in=st.sampled_from([0, 9]),
    num_spec_tokens=st.integers(1, 6),
)
def test_identity_under_preemption_chunking_caching_and_stops(
    lengths, num_blocks, budget, prefix_caching, eos_one_in, num_spec_tokens
):
    prompts = _prompts(lengths)
    kwargs = dict(
        num_blocks=num_blocks,
        max_num_batched_tokens=budget,
        prefix_caching=prefix_caching,
        eos_one_in=eos_one_in,
    )
    plain, _ = _run(prompts, speculative=False, **kwargs)
    fast, _ = _run(prompts, speculative=True, num_spec_tokens=num_spec_tokens, **kwargs)
    assert fast == plain


def test_no_draft_beyond_max_tokens_or_the_step_budget():
    prompts = _prompts([30])
    _, scheduler = _run(prompts, speculative=True, max_tokens=3, max_num_batched_tokens=16)
    # 3 tokens: the first comes from the prompt's step, so drafts cover at most 1 more
    assert scheduler.speculator.stats.num_draft_tokens <= 2


def test_a_large_batch_does_not_speculate():
    prompts = _prompts([20, 20, 20, 8])
    speculator = NgramSpeculator(4, 1, 3, max_batch=3)
    assert speculator.step_allows(3) and not speculator.step_allows(4)
    manager = BlockManager(64, 4)
    scheduler = Scheduler(
        manager,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=256,
        eos_token_ids=frozenset({EOS}),
        speculator=speculator,
    )
    runner = FakeRunner(block_size=4, num_blocks=64, next_token=copy_with_edits)
    for i, prompt in enumerate(prompts):
        scheduler.add(Sequence(f"r{i}", prompt, SamplingParams(temperature=0), 8))
    num_drafts_by_width = {True: 0, False: 0}
    num_wide_steps = 0
    while scheduler.has_unfinished():
        wide = sum(is_decoding(seq) for seq in scheduler.running) > 3
        num_wide_steps += wide
        batch = scheduler.schedule()
        num_drafts_by_width[wide] += sum(bool(s.draft_token_ids) for s in batch.seqs)
        scheduler.update(batch, runner.execute(batch))
    assert num_wide_steps > 0 and num_drafts_by_width[True] == 0
    assert num_drafts_by_width[False] > 0


# --------------------------------------------------------------- the engine
def _engine_tokens(speculative: str, params: SamplingParams) -> dict[str, tuple]:
    tokenizer = FakeTokenizer()
    runner = FakeRunner(block_size=4, num_blocks=64, max_model_len=256, next_token=copy_with_edits)
    settings = load_settings(environ={}, speculative=speculative, speculative_ngram_min=1)
    core = EngineCore(runner, tokenizer, settings)
    prompt = tokenizer.encode("abcdefgabcdefgabcdefgabcdefg")
    assert core.add_request("r", prompt, params) == []
    text, token_ids, finish = "", [], None
    while core.has_unfinished():
        for delta in core.step():
            assert delta.error is None
            text += delta.text
            token_ids += delta.token_ids
            if delta.finished:
                finish = (delta.finish_reason, delta.stop_reason, delta.usage)
    assert core.block_manager.num_used_blocks == 0
    return {"text": text, "token_ids": tuple(token_ids), "finish": finish}


def test_engine_stop_strings_and_usage_are_the_same_with_speculation():
    plain = _engine_tokens("off", SamplingParams(temperature=0, max_tokens=40))
    text = plain["text"]
    assert len(text) == 40
    for stop in (text[9:12], text[25:27]):  # a stop string in the middle of a draft
        params = SamplingParams(temperature=0, max_tokens=40, stop=(stop,))
        want = _engine_tokens("off", params)
        got = _engine_tokens("ngram", params)
        assert got == want
        assert want["finish"][0] is FinishReason.STOP and want["finish"][1] == stop


def test_engine_stats_carry_the_counters_to_prometheus():
    from prometheus_client import CollectorRegistry, generate_latest

    from app.metrics import EngineStatsCollector, read_engine_counters

    tokenizer = FakeTokenizer()
    runner = FakeRunner(block_size=4, num_blocks=64, max_model_len=256, next_token=copy_with_edits)
    settings = load_settings(environ={}, speculative="ngram", speculative_ngram_min=1)
    core = EngineCore(runner, tokenizer, settings)
    core.add_request("r", tokenizer.encode("abcdefgabcdefgabcdefg"), SamplingParams(temperature=0))
    deltas = []
    while core.has_unfinished():
        deltas += core.step()
    spec = core.stats().speculation
    assert 0 < spec.num_accepted_tokens <= spec.num_draft_tokens
    timings = deltas[-1].timings  # the per-request figures, for the access line
    assert (timings.num_draft_tokens, timings.num_accepted_draft_tokens) == (
        spec.num_draft_tokens,
        spec.num_accepted_tokens,
    )
    registry = CollectorRegistry()
    engine = type("Engine", (), {"stats": core.stats, "is_alive": True})()
    registry.register(EngineStatsCollector("m", lambda: read_engine_counters(engine)))
    text = generate_latest(registry).decode()
    series = 'lamina:spec_decode_num_accepted_tokens_total{model_name="m"}'
    assert f"{series} {spec.num_accepted_tokens:.1f}" in text
    assert (
        'lamina:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0"}' in text
    )
    assert "lamina:spec_decode_num_drafts_total" in text
    assert "lamina:spec_decode_num_draft_tokens_total" in text
