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


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_prefix_caching_reuses_shared_prefix(
    make_core, corpus_ids, parity_prompts, hf_model, hf_references
):
    # 8 prompts of 5 to 500 tokens, all starting with the same text: the 500-token one
    # (served first, so the cache holds its 31 full blocks of 16), six prefixes of it,
    # and one of 403 tokens that parts from it after a 320-token shared head.
    prompts = [corpus_ids[:length] for length in (5, 19, 64, 121, 200, 287)]
    prompts += [corpus_ids[:320] + corpus_ids[420:503], corpus_ids[:500]]
    assert [len(p) for p in prompts] == [5, 19, 64, 121, 200, 287, 403, 500]
    # The first and last are parity prompts (0, 5) and (0, 500): references computed.
    assert prompts[0] == parity_prompts[0] and prompts[-1] == parity_prompts[-1]
    middle = [hf_greedy(hf_model, prompt) for prompt in prompts[1:-1]]
    expected = [hf_references[0], *middle, hf_references[-1]]
    core = make_core()
    first = prompts[-1]
    assert drive(core, {0: [("first", first)]})["first"] == expected[-1]
    hits_before = core.block_manager.prefix_cache_hits
    # Then all 8 together (the first prompt again among them): each finds its leading
    # full blocks in the cache, up to where it parts from the first prompt, short of its
    # last token (which must be computed for its logits).
    got = drive(core, {0: [(f"p{i}", p) for i, p in enumerate(prompts)]})
    size = core.block_manager.block_size
    reusable = sum(min(_common_prefix_len(p, first), len(p) - 1) // size * size for p in prompts)
    hits = core.block_manager.prefix_cache_hits - hits_before
    assert hits >= reusable, f"prefix cache served only {hits} of {reusable} tokens"
    for i, want in enumerate(expected):
        assert got[f"p{i}"] == want, i


def test_preemption_under_a_tiny_cache(make_core, parity_prompts, hf_references):
    # The 8 prompts and their 32 new tokens need 120 blocks of 16 together; give them
    # 48, which still holds the longest alone (500 + 32 tokens: 34 blocks).
    core = make_core(num_blocks=48)
    assert core.block_manager.num_blocks_for(len(parity_prompts[-1]) + 32) <= 48
    got = drive(core, {0: list(zip(_ids(8), parity_prompts))})
    assert core.scheduler.num_preemptions > 0, "the test did not force preemption"
    for request_id, expected in zip(_ids(8), hf_references):
        assert got[request_id] == expected, request_id


def test_chunked_prefill_with_a_small_token_budget(make_core, parity_prompts, hf_references):
    core = make_core(max_num_batched_tokens=48)
    got = drive(core, {0: list(zip(_ids(8), parity_prompts))})
    for request_id, expected in zip(_ids(8), hf_references):
        assert got[request_id] == expected, request_id
