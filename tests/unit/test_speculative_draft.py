"""Speculative decoding with a draft model, the draft being a FakeRunner of its own.

Both FakeRunners sample from the context they read back through the block table, so
a draft shadow whose K/V was not rolled back to the confirmed tokens, or whose block
table is short, fails loudly in the draft's runner; outputs depend only on each
sequence's tokens, so speculation on and off must give the same tokens.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.config import SettingsError, load_settings
from app.core import SamplingParams, Sequence
from app.engine.block_manager import BlockManager
from app.engine.engine_core import speculator_from
from app.engine.scheduler import Scheduler
from app.engine.speculative_draft import DraftModelSpeculator
from tests.unit.fakes import FakeRunner, FakeTokenizer
from tests.unit.test_speculative import PERIOD, _prompts, run_scheduler

EOS = FakeTokenizer.EOS
BLOCK_SIZE = 4


def copy_without_edits(context: list[int], seq: Sequence) -> int:
    """The draft: the target's rule without its edits, so it is right about 4 in 5."""
    return context[-PERIOD] if len(context) >= PERIOD else context[0]


def _run(
    prompts: list[list[int]],
    speculative: bool,
    *,
    num_blocks: int = 64,
    num_draft_blocks: int = 64,
    max_num_batched_tokens: int = 32,
    prefix_caching: bool = True,
    max_tokens: int = 24,
    eos_one_in: int = 0,
    num_spec_tokens: int = 4,
    draft_fails_on: int | None = None,
    max_pass_tokens: int = 512,
    draft_prefix_caching: bool | None = None,
) -> tuple[dict[str, list[int]], Scheduler]:
    manager = BlockManager(num_blocks, BLOCK_SIZE, prefix_caching)
    draft_runner = FakeRunner(
        block_size=BLOCK_SIZE,
        num_blocks=num_draft_blocks,
        next_token=copy_without_edits,
        fail_token_id=draft_fails_on,
    )
    speculator = None
    if speculative:
        speculator = DraftModelSpeculator(
            draft_runner,
            num_spec_tokens,
            64,
            max_pass_tokens=max_pass_tokens,
            prefix_caching=prefix_caching if draft_prefix_caching is None else draft_prefix_caching,
        )

    def shadows_checked(scheduler: Scheduler) -> None:
        if speculator is not None:
            _check_shadows(speculator, scheduler)

    outputs, scheduler = run_scheduler(
        manager, speculator, prompts, max_num_batched_tokens, max_tokens, eos_one_in,
        shadows_checked,
    )  # fmt: skip
    if speculator is not None:
        # A draft whose K/V are not its tokens fails in its FakeRunner, which turns
        # speculation off without changing any output: the identity checks alone would pass
        if draft_fails_on is None:
            assert speculator.max_batch >= 0, "the draft model failed: see the log"
        assert speculator.block_manager.num_used_blocks == 0, "a draft block leaked"
        assert not speculator._shadows, "a draft shadow outlived its sequence"
    return outputs, scheduler


def _check_shadows(speculator: DraftModelSpeculator, scheduler: Scheduler) -> None:
    """After a step: the draft's books balance, every shadow belongs to a running
    sequence, holds only confirmed tokens and no block past its computed ones."""
    draft_manager = speculator.block_manager
    draft_manager.check_invariants()
    running = {seq.seq_id: seq for seq in scheduler.running}
    for seq_id, shadow in speculator._shadows.items():
        assert seq_id in running, "a shadow of a sequence that is not running"
        seq = running[seq_id]
        assert shadow.num_computed_tokens < seq.num_tokens
        assert (
            shadow.all_token_ids[: shadow.num_computed_tokens]
            == (seq.all_token_ids[: shadow.num_computed_tokens])
        )
        assert len(shadow.block_table) <= draft_manager.num_blocks_for(shadow.num_tokens)


def test_draft_model_gives_the_same_tokens_in_fewer_steps():
    prompts = _prompts([12, 30, 5, 21])
    plain, plain_scheduler = _run(prompts, speculative=False)
    fast, scheduler = _run(prompts, speculative=True)
    assert fast == plain
    stats = scheduler.speculator.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # some right, some wrong
    assert stats.accepted_per_position[0] >= stats.accepted_per_position[-1] > 0


def test_a_step_drafts_for_every_sequence_in_one_pass_per_position():
    prompts = _prompts([12, 13, 14])
    _, scheduler = _run(prompts, speculative=True, num_spec_tokens=3, max_tokens=8)
    speculator = scheduler.speculator
    batch_sizes = speculator.runner.batch_sizes  # (sequences, tokens) per draft pass
    # Each draft token is sampled at one row of one pass; the 3 sequences share passes.
    assert sum(num_seqs for num_seqs, _ in batch_sizes) == speculator.stats.num_draft_tokens
    assert max(num_seqs for num_seqs, _ in batch_sizes) == 3
    assert speculator.num_forward_passes == len(batch_sizes) < speculator.stats.num_draft_tokens


def test_a_short_draft_cache_drafts_less_never_wrong():
    # 6 blocks of 4 tokens: one 20-token sequence's shadow at most, never three
    prompts = _prompts([18, 19, 20])
    plain, _ = _run(prompts, speculative=False)
    fast, scheduler = _run(prompts, speculative=True, num_draft_blocks=6)
    assert fast == plain
    assert scheduler.speculator.stats.num_drafts > 0


def test_a_long_prompt_is_caught_up_in_chunks_not_in_one_pass():
    # The draft's first pass after a 40-token prompt held all of it (41 tokens)
    prompts = _prompts([40, 3, 37])
    plain, _ = _run(prompts, speculative=False)
    fast, scheduler = _run(prompts, speculative=True, max_pass_tokens=8)
    assert fast == plain
    speculator = scheduler.speculator
    assert max(num_tokens for _, num_tokens in speculator.runner.batch_sizes) <= 8
    assert speculator.stats.num_accepted_tokens > 0


def test_a_shared_prompt_prefix_is_drafted_once():
    # Three 40-token prompts sharing their first 36 tokens; the served model's prefix
    # cache on in both runs, the draft's on in one. A shadow started after another one
    # registered the prefix's draft blocks starts from them: the draft computes that many
    # tokens fewer, and every token is still the one without speculation.
    prompts = [prompt[:36] + [70 + i] * 4 for i, prompt in enumerate(_prompts([40] * 3))]
    runs = {
        caching: _run(
            prompts, speculative=True, draft_prefix_caching=caching, max_num_batched_tokens=16
        )
        for caching in (False, True)
    }
    assert runs[True][0] == runs[False][0] == _run(prompts, speculative=False)[0]
    computed = {
        caching: sum(tokens for _, tokens in scheduler.speculator.runner.batch_sizes)
        for caching, (_, scheduler) in runs.items()
    }
    hits = runs[True][1].speculator.block_manager.prefix_cache_hits
    assert hits >= 32  # at least one later shadow found 8 or 9 of the prefix's blocks
    assert computed[True] == computed[False] - hits


@pytest.mark.parametrize("splits_rows", [False, True])
def test_a_draft_that_splits_rows_by_kind_shares_no_generated_kv_with_prompts(splits_rows):
    # A draft with fp16 weights computes prompt and generated tokens with different
    # kernels (splits_rows): a shadow whose prompt repeats another's output may then
    # start only from the blocks that were prompt in both, as the served model's cache.
    draft_runner = FakeRunner(block_size=BLOCK_SIZE, num_blocks=16)
    draft_runner.splits_rows = splits_rows
    speculator = DraftModelSpeculator(draft_runner, 4, 64)
    first = Sequence("r", list(range(6)), SamplingParams(), max_tokens=100)
    shadow = speculator._shadow(first)  # blocks [0-3] prompt, [4-7] 2 prompt + 2 generated
    shadow.output_token_ids += [6, 7, 8, 9, 10]
    speculator.block_manager.append_slots(shadow, shadow.num_tokens)
    shadow.num_computed_tokens = shadow.num_tokens
    speculator.block_manager.cache_full_blocks(shadow)
    follow_up = Sequence("r", list(range(13)), SamplingParams(), max_tokens=100)
    num_shared_blocks = 1 if splits_rows else 2
    assert speculator._shadow(follow_up).num_computed_tokens == num_shared_blocks * BLOCK_SIZE


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    num_blocks=st.integers(14, 64),
    num_draft_blocks=st.integers(1, 64),
    budget=st.integers(16, 48),
    prefix_caching=st.booleans(),
    eos_one_in=st.sampled_from([0, 9]),
    num_spec_tokens=st.integers(1, 6),
    max_pass_tokens=st.integers(1, 48),
)
def test_identity_under_preemption_chunking_caching_and_stops(
    lengths,
    num_blocks,
    num_draft_blocks,
    budget,
    prefix_caching,
    eos_one_in,
    num_spec_tokens,
    max_pass_tokens,
):
    prompts = _prompts(lengths)
    kwargs = dict(
        num_blocks=num_blocks,
        max_num_batched_tokens=budget,
        prefix_caching=prefix_caching,
        eos_one_in=eos_one_in,
    )
    plain, _ = _run(prompts, speculative=False, **kwargs)
    fast, fast_scheduler = _run(
        prompts,
        speculative=True,
        num_spec_tokens=num_spec_tokens,
        num_draft_blocks=num_draft_blocks,
        max_pass_tokens=max_pass_tokens,
        **kwargs,
    )
    assert fast == plain
    batch_sizes = fast_scheduler.speculator.runner.batch_sizes
    assert all(num_tokens <= max_pass_tokens for _, num_tokens in batch_sizes)


def test_draft_speculation_needs_a_draft_model():
    with pytest.raises(SettingsError, match="LAMINA_SPECULATIVE_MODEL"):
        load_settings(environ={"LAMINA_SPECULATIVE": "draft"})
    settings = load_settings(
        environ={"LAMINA_SPECULATIVE": "draft", "LAMINA_SPECULATIVE_MODEL": "/models/small"}
    )
    with pytest.raises(ValueError, match="loaded no draft model"):
        speculator_from(settings, FakeRunner())  # the runner was built without one


def test_a_failing_draft_model_turns_speculation_off_and_changes_nothing(caplog):
    prompts = _prompts([12, 30, 5, 21])
    plain, _ = _run(prompts, speculative=False)
    # The draft raises at its first pass: every prompt holds that token
    fast, scheduler = _run(prompts, speculative=True, draft_fails_on=prompts[1][-1])
    assert fast == plain
    speculator = scheduler.speculator
    assert not speculator.step_allows(1)
    assert "the draft model failed" in caplog.text


def test_speculative_settings_the_mode_ignores_are_named():
    draft_model = {"LAMINA_SPECULATIVE_MODEL": "/models/small"}
    assert (
        load_settings(environ={**draft_model, "LAMINA_SPECULATIVE": "draft"}).ignored_settings()
        == []
    )
    ngram = load_settings(
        environ={**draft_model, "LAMINA_SPECULATIVE": "ngram", "LAMINA_SPECULATIVE_TOKENS": "6"}
    )
    assert ngram.ignored_settings() == [
        "LAMINA_SPECULATIVE_MODEL is set but ignored: LAMINA_SPECULATIVE=ngram does not use it"
    ]
    off = load_settings(environ={"LAMINA_SPECULATIVE_WEIGHT_DTYPE": "int4"})
    assert off.ignored_settings() == [
        "LAMINA_SPECULATIVE_WEIGHT_DTYPE is set but ignored: LAMINA_SPECULATIVE=off does not use it"
    ]
    draft = load_settings(
        environ={**draft_model, "LAMINA_SPECULATIVE": "draft", "LAMINA_SPECULATIVE_NGRAM_MAX": "3"}
    )
    assert [line.split()[0] for line in draft.ignored_settings()] == [
        "LAMINA_SPECULATIVE_NGRAM_MAX"
    ]
