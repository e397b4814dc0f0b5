"""Greedy outputs of the engine equal transformers' generate, token for token (fp32, CPU).

Each scenario drives EngineCore step by step, so arrivals are exactly reproducible:
(a) one at a time, (b) all together, (c) staggered arrivals while others decode,
(d) prefix caching with shared prefixes, (e) preemption under a tiny KV cache,
(f) prefill chunked by a small token budget.
"""

from __future__ import annotations

from tests.engine.conftest import drive, hf_greedy


def _ids(n: int) -> list[str]:
    return [f"r{i}" for i in range(n)]


def test_one_at_a_time(make_core, parity_prompts, hf_references):
    core = make_core()
    for request_id, prompt, expected in zip(_ids(8), parity_prompts, hf_references):
        got = drive(core, {0: [(request_id, prompt)]})
        assert got[request_id] == expected, request_id


def test_all_submitted_together(make_core, parity_prompts, hf_references):
    core = make_core()
    got = drive(core, {0: list(zip(_ids(8), parity_prompts))})
    for request_id, expected in zip(_ids(8), hf_references):
        assert got[request_id] == expected, request_id


def test_staggered_arrivals_while_others_decode(make_core, parity_prompts, hf_references):
    core = make_core(max_num_batched_tokens=256)
    arrivals = {
        3 * i: [(rid, prompt)] for i, (rid, prompt) in enumerate(zip(_ids(8), parity_prompts))
    }
    got = drive(core, arrivals)
    for request_id, expected in zip(_ids(8), hf_references):
        assert got[request_id] == expected, request_id


def test_prefix_caching_reuses_shared_prefix(make_core, corpus_ids, hf_model):
    shared = corpus_ids[:320]  # 20 full blocks of 16 tokens
    prompts = [shared + corpus_ids[400 + 9 * i : 400 + 9 * i + 7] for i in range(4)]
    expected = [hf_greedy(hf_model, prompt) for prompt in prompts]
    core = make_core()
    drive(core, {0: [("first", prompts[0])]})
    hits_before = core.block_manager.prefix_cache_hits
    # The first prompt again, then the others arriving together: all share its blocks.
    got = drive(core, {0: [("again", prompts[0])] + [(f"p{i}", p) for i, p in enumerate(prompts)]})
    hits = core.block_manager.prefix_cache_hits - hits_before
    assert hits >= 4 * 320, f"prefix cache served only {hits} tokens"
    assert got["again"] == expected[0]
    for i, want in enumerate(expected):
        assert got[f"p{i}"] == want, i


def test_preemption_under_a_tiny_cache(make_core, parity_prompts, hf_references):
    # 8 prompts of up to 532 tokens need ~110 blocks together; give them 48.
    core = make_core(num_blocks=48)
    got = drive(core, {0: list(zip(_ids(8), parity_prompts[:7]))})
    assert core.scheduler.num_preemptions > 0, "the test did not force preemption"
    for request_id, expected in zip(_ids(7), hf_references[:7]):
        assert got[request_id] == expected, request_id


def test_chunked_prefill_with_a_small_token_budget(make_core, parity_prompts, hf_references):
    core = make_core(max_num_batched_tokens=48)
    got = drive(core, {0: list(zip(_ids(8), parity_prompts))})
    for request_id, expected in zip(_ids(8), hf_references):
        assert got[request_id] == expected, request_id
