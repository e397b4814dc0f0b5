"""Greedy outputs with speculative decoding on equal transformers' and the outputs with
it off, token for token, on the default model: under batching, staggered arrivals,
prefix caching, preemption and chunked prefill (the scenarios of test_greedy_parity).

Besides the parity prompts (ordinary text, where prompt lookup guesses now and then),
one prompt repeats a passage, so the model copies it and most drafts are accepted.
"""

from __future__ import annotations

from app.core import SamplingParams
from tests.engine.conftest import drive

SPECULATIVE = dict(speculative="ngram", speculative_max_batch=64, speculative_ngram_min=1)


def _check(core, got, cases) -> None:
    for request_id, _, expected in cases:
        assert got[request_id] == expected, request_id
    stats = core.scheduler.speculator.stats
    assert stats.num_accepted_tokens > 0, "no draft token was accepted: nothing was tested"
    assert stats.num_accepted_tokens < stats.num_draft_tokens, "no draft was rejected"


def test_together_with_prefix_caching_and_chunked_prefill(make_core, cases):
    core = make_core(max_num_batched_tokens=48, **SPECULATIVE)
    # The repeating prompt first: its blocks are cached, then everyone arrives (it again).
    _, prompt, expected = cases[-1]
    assert drive(core, {0: [("first", prompt)]})["first"] == expected
    hits_before = core.block_manager.prefix_cache_hits
    got = drive(core, {0: [(rid, p) for rid, p, _ in cases]})
    assert core.block_manager.prefix_cache_hits > hits_before
    _check(core, got, cases)


def test_staggered_arrivals_and_preemption(make_core, cases):
    # Admitted, the 4 prompts hold 23 blocks of 16; grown by 32 tokens each they need
    # 31. Give them 25, which still holds the longest alone (250 + 32 tokens: 18 blocks).
    core = make_core(num_blocks=25, **SPECULATIVE)
    arrivals = {0: [(rid, prompt) for rid, prompt, _ in cases[:3]], 1: [cases[3][:2]]}
    got = drive(core, arrivals)
    assert core.scheduler.num_preemptions > 0, "the test did not force preemption"
    _check(core, got, cases)


def test_seeded_sampling_gives_the_same_tokens(make_core, cases):
    """A seeded draw depends on (seed, choice, position) only: with a point-mass draft,
    accepting it iff the token sampled at its position equals it is rejection sampling,
    and keeps every token the one sampled without speculation."""
    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.95, seed=1234)
    arrivals = {0: [(rid, prompt) for rid, prompt, _ in cases]}
    plain = drive(make_core(), arrivals, params)
    core = make_core(**SPECULATIVE)
    assert drive(core, arrivals, params) == plain
    assert core.scheduler.speculator.stats.num_accepted_tokens > 0
