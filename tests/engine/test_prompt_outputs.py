"""Prompt outputs through the engine on the default model (fp32, CPU): prompt
log-probabilities and pooled embeddings.

They equal transformers' (log-softmax of its logits, its final hidden states) within
1e-4; they are bitwise the same alone, in a mixed batch, chunked, after a preemption,
and with a warm prefix cache; and the prefix cache keeps serving everyone else.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from app.core import SamplingParams, TokenDelta
from tests.engine.conftest import assert_ok

pytestmark = pytest.mark.slow

LOGPROBS = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=5)
LAST = SamplingParams(max_tokens=0, pooling="last")
MEAN = SamplingParams(max_tokens=0, pooling="mean")
DECODE = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
TOLERANCE = 1e-4

Arrival = tuple[str, list[int], SamplingParams]


def run(core, arrivals: dict[int, list[Arrival]]) -> dict[str, list[TokenDelta]]:
    """Add requests at the given step numbers, step until all finish; deltas by request."""
    deltas: dict[str, list[TokenDelta]] = defaultdict(list)
    for step in range(100_000):
        for request_id, prompt, params in arrivals.pop(step, []):
            assert core.add_request(request_id, prompt, params) == []
        if not arrivals and not core.has_unfinished():
            return dict(deltas)
        for delta in core.step():
            assert_ok(delta)
            deltas[delta.request_id].append(delta)
    raise AssertionError("the engine did not finish")


def prompt_part(deltas: list[TokenDelta]) -> tuple:
    """The prompt outputs of one choice: on its first delta, never on a later one."""
    first, *rest = deltas
    assert all(not d.prompt_logprobs and d.embedding is None for d in rest)
    return first.prompt_logprobs, first.embedding


@pytest.fixture(scope="module")
def prompts(corpus_ids) -> list[list[int]]:
    """5, 64 (four full blocks) and 150 tokens."""
    return [corpus_ids[:5], corpus_ids[40:104], corpus_ids[100:250]]


KINDS = {"logprobs": LOGPROBS, "last": LAST, "mean": MEAN}


@pytest.fixture(scope="module")
def alone(runner, tokenizer, engine_settings, prompts) -> dict[str, tuple]:
    """The long prompt's outputs of each kind, each request alone in a fresh engine."""
    from app.engine.engine_core import EngineCore

    results = {}
    for name, params in KINDS.items():
        core = EngineCore(runner, tokenizer, engine_settings)
        results[name] = prompt_part(run(core, {0: [(name, prompts[2], params)]})[name])
    return results


def hf_prompt_logprobs(hf_model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)  # [L, vocab]


def hf_hidden(hf_model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model.model(torch.tensor([prompt])).last_hidden_state[0]  # [L, hidden]


def test_prompt_logprobs_match_transformers(make_core, hf_model, prompts):
    # A step budget of 48 tokens chunks the longer prompts.
    core = make_core(max_num_batched_tokens=48)
    arrivals = [(f"p{i}", prompt, LOGPROBS) for i, prompt in enumerate(prompts)]
    got = run(core, {0: arrivals})
    for i, prompt in enumerate(prompts):
        (deltas,) = [got[f"p{i}"]]
        assert len(deltas) == 1 and deltas[0].token_ids == ()  # max_tokens 0: none sampled
        entries, _ = prompt_part(deltas)
        assert len(entries) == len(prompt) and entries[0] is None
        reference = hf_prompt_logprobs(hf_model, prompt)
        for position in range(1, len(prompt)):
            entry, row = entries[position], reference[position - 1]
            assert entry.token_id == prompt[position]
            assert abs(entry.logprob - row[prompt[position]].item()) < TOLERANCE
            top_values, _ = row.topk(5)
            assert [t[2] for t in entry.top] == pytest.approx(top_values.tolist(), abs=TOLERANCE)
            for token_id, _text, logprob in entry.top:
                assert abs(row[token_id].item() - logprob) < TOLERANCE
            chosen = row[prompt[position]]
            rank_range = (
                int((row > chosen + slack).sum()) + 1 for slack in (TOLERANCE, -TOLERANCE)
            )
            lowest, highest = rank_range
            assert lowest <= entry.rank <= highest


def test_embeddings_match_transformers(make_core, hf_model, prompts):
    core = make_core(max_num_batched_tokens=48)
    arrivals = [
        (f"{name}{i}", p, KINDS[name]) for name in ("last", "mean") for i, p in enumerate(prompts)
    ]
    got = run(core, {0: arrivals})
    for i, prompt in enumerate(prompts):
        hidden = hf_hidden(hf_model, prompt).double()
        for pooling, reference in (("last", hidden[-1]), ("mean", hidden.mean(dim=0))):
            _, pooled = prompt_part(got[f"{pooling}{i}"])
            assert (torch.tensor(pooled) - reference).abs().max().item() < TOLERANCE


def test_alone_and_in_a_mixed_batch_bitwise(make_core, prompts, corpus_ids, alone):
    """The same prompt's outputs alone, and among decodes, other prompts and chunking."""
    core = make_core(max_num_batched_tokens=40)
    others = [(f"d{i}", corpus_ids[7 * i : 7 * i + 20 + i], DECODE) for i in range(6)]
    arrivals = {
        0: others[:3],
        2: [("logprobs", prompts[2], LOGPROBS), *others[3:]],
        3: [("last", prompts[2], LAST), ("x", prompts[1], LOGPROBS)],
        5: [("mean", prompts[2], MEAN), ("y", prompts[0], MEAN)],
    }
    got = run(core, arrivals)
    for name in KINDS:
        assert prompt_part(got[name]) == alone[name], name


def test_embedding_alone_equals_in_a_batch_of_32(make_core, corpus_ids):
    text = corpus_ids[3:40]
    for params in (LAST, MEAN):
        alone = prompt_part(run(make_core(), {0: [("alone", text, params)]})["alone"])
        batch = [(f"b{i}", corpus_ids[i : i + 10 + i % 17], params) for i in range(31)]
        batch.insert(13, ("same", text, params))
        got = run(make_core(), {0: batch})
        assert prompt_part(got["same"]) == alone


def test_warm_prefix_cache_gives_the_same_answer_and_still_serves_others(make_core, prompts, alone):
    prompt = prompts[2]
    core = make_core()
    run(core, {0: [("warm", prompt, DECODE)]})  # the prompt's full blocks now cached
    reusable = (len(prompt) - 1) // 16 * 16
    for name, params in KINDS.items():
        deltas = run(core, {0: [(name, prompt, params)]})[name]
        assert prompt_part(deltas) == alone[name], name
        # Logprobs and mean pooling recompute every position; last-token pooling
        # needs only the last one, so it takes the cached prefix.
        expected_cached = reusable if name == "last" else 0
        assert deltas[-1].usage.cached_tokens == expected_cached, name
    after = run(core, {0: [("after", prompt, DECODE)]})["after"]
    assert after[-1].usage.cached_tokens == reusable


def test_logprobs_with_a_sampled_token_and_after_preemption(make_core, prompts, corpus_ids, alone):
    """max_tokens 1 (what lm-eval asks): the prompt outputs come with the first token;
    under a cache so small that sequences are preempted, they are the same."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=5)
    # 12 blocks of 16 tokens: three decoding sequences take 9, then grow into the blocks
    # of the 150-token prompt being computed in chunks, which is preempted and recomputed.
    core = make_core(num_blocks=12, max_num_batched_tokens=32)
    others = [(f"d{i}", corpus_ids[9 * i : 9 * i + 44], DECODE) for i in range(3)]
    got = run(core, {0: others, 1: [("a", prompts[2], params)]})
    assert core.scheduler.num_preemptions > 0
    (delta,) = got["a"]
    assert len(delta.token_ids) == 1
    assert prompt_part(got["a"]) == alone["logprobs"]  # top 5 either way
