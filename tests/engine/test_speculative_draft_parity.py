"""Speculative decoding with a draft model (`LAMINA_SPECULATIVE=draft`) on the default
model: greedy outputs equal transformers' and the outputs with speculation off, token
for token, under batching, prefix caching, chunked prefill and preemption (the cases
of test_speculative_parity); seeded sampling gives the same tokens on and off; a draft
with another vocabulary is refused at start-up. The autouse fixture of conftest.py
checks that neither the served model's nor the draft's cache keeps a block.

The main draft is the default model itself with 4-bit weights (an int8 head): its
greedy tokens agree with the fp32 model's on most positions (96 % teacher-forced), so
most drafts are accepted and some rejected, and seeded sampling rejects more (a sample
is not always the argmax). The default model
cut to its first 6 of 30 layers agrees with it on a few tokens in a hundred: with it
drafts are rejected, sequences pause their speculation, probe again and catch the
draft up over the tokens it missed.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from app.core import SamplingParams
from app.model.draft import DraftModelError
from tests.engine.conftest import SizedRunner, drive
from tests.model.helpers import copy_with_another_vocabulary

SPECULATIVE = dict(speculative="draft", speculative_max_batch=64)


def _check(core, got, cases) -> None:
    for request_id, _, expected in cases:
        assert got[request_id] == expected, request_id
    stats = core.scheduler.speculator.stats
    assert stats.num_accepted_tokens > 0, "no draft token was accepted: nothing was tested"
    # a failing draft turns speculation off (logged), outputs unchanged: not a pass
    assert core.scheduler.speculator.max_batch >= 0, "the draft model failed: see the log"


@dataclass
class DraftingRunner(SizedRunner):
    """The shared runner with a draft runner beside it (what ModelRunner.from_settings
    builds for LAMINA_SPECULATIVE=draft), reporting num_blocks KV blocks."""

    draft_runner: object


def _draft_runner(runner, engine_settings, model_path, weight_dtype: str = "auto"):
    settings = engine_settings.model_copy(
        update=dict(
            speculative="draft",
            speculative_model=model_path,
            speculative_weight_dtype=weight_dtype,
        )
    )
    draft = runner.build_draft_runner(settings)
    draft.warmup()
    return draft


@pytest.fixture(scope="module")
def draft_runner(runner, engine_settings, default_model_path):
    """The default model with int4 weights."""
    return _draft_runner(runner, engine_settings, default_model_path, "int4")


@pytest.fixture(scope="module")
def shallow_draft_runner(runner, engine_settings, shallow_default_model_path):
    """The default model's first 6 layers."""
    return _draft_runner(runner, engine_settings, shallow_default_model_path)


@pytest.fixture
def make_drafting_core(runner, draft_runner, tokenizer, engine_settings):
    """An EngineCore drafting with draft_runner unless told another (checked by
    no_kv_block_left_referenced)."""
    from app.engine.engine_core import EngineCore

    def build(num_blocks: int | None = None, draft=draft_runner, **overrides) -> EngineCore:
        settings = engine_settings.model_copy(update={**overrides, **SPECULATIVE})
        wrapped = DraftingRunner(runner, num_blocks or runner.num_blocks, draft)
        return EngineCore(wrapped, tokenizer, settings)

    return build


def test_together_with_prefix_caching_and_chunked_prefill(make_drafting_core, cases):
    core = make_drafting_core(max_num_batched_tokens=48)
    _, prompt, expected = cases[-1]
    assert drive(core, {0: [("first", prompt)]})["first"] == expected
    hits_before = core.block_manager.prefix_cache_hits
    got = drive(core, {0: [(rid, p) for rid, p, _ in cases]})
    assert core.block_manager.prefix_cache_hits > hits_before
    _check(core, got, cases)
    speculator = core.scheduler.speculator  # drafts for the batch in shared passes
    assert speculator.num_forward_passes < speculator.stats.num_draft_tokens


def test_staggered_arrivals_and_preemption(make_drafting_core, cases):
    # As in test_speculative_parity: 25 blocks of 16 force preemption.
    core = make_drafting_core(num_blocks=25)
    arrivals = {0: [(rid, prompt) for rid, prompt, _ in cases[:3]], 1: [cases[3][:2]]}
    got = drive(core, arrivals)
    assert core.scheduler.num_preemptions > 0, "the test did not force preemption"
    _check(core, got, cases)


def test_seeded_sampling_gives_the_same_tokens(make_core, make_drafting_core, cases):
    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.95, seed=1234)
    arrivals = {0: [(rid, prompt) for rid, prompt, _ in cases]}
    plain = drive(make_core(), arrivals, params)
    core = make_drafting_core()
    assert drive(core, arrivals, params) == plain
    stats = core.scheduler.speculator.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_a_poor_draft_pauses_and_catches_up(make_drafting_core, shallow_draft_runner, cases):
    ordinary = cases[:3]  # not the repeating prompt, which even the cut model may copy
    core = make_drafting_core(draft=shallow_draft_runner)
    got = drive(core, {0: [(rid, prompt) for rid, prompt, _ in ordinary]})
    for request_id, _, expected in ordinary:
        assert got[request_id] == expected, request_id
    stats = core.scheduler.speculator.stats
    # 3 sequences x 31 decode steps; each pauses after 3 poor verifies, for 16 steps
    assert 0 < stats.num_drafts <= 3 * 6
    assert stats.num_accepted_tokens < stats.num_draft_tokens / 4


def test_a_draft_with_another_vocabulary_is_refused(
    runner, engine_settings, shallow_default_model_path, tmp_path
):
    # The same tokens, two of them with their ids swapped: the texts would differ.
    folder = copy_with_another_vocabulary(shallow_default_model_path, tmp_path / "vocabulary")
    settings = engine_settings.model_copy(
        update=dict(speculative="draft", speculative_model=folder)
    )
    with pytest.raises(DraftModelError, match="does not share the served model's tokenizer"):
        runner.build_draft_runner(settings)
