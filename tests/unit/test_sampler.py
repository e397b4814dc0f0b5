"""Batched sampler: greedy, temperature, masks, penalties, bias, min_tokens, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from app.core import SamplingParams
from app.model import sampler as sampler_module
from app.model.sampler import (
    Sampler,
    SamplingRequest,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    sample_from_probs,
)

EOS = 2
VOCAB = 8


def request(prompt=(5,), output=(), index=0, **params) -> SamplingRequest:
    return SamplingRequest(SamplingParams(**params), list(prompt), list(output), index)


def sample(logits, requests, seed=0):
    return Sampler(frozenset({EOS}), seed=seed)(torch.as_tensor(logits).float(), requests)


def ids(outputs) -> list[int]:
    return [o.token_id for o in outputs]


def frequencies(logits_row, num_draws=4000, **params) -> torch.Tensor:
    """Empirical token frequencies from num_draws identical unseeded rows in one batch."""
    logits = torch.tensor(logits_row).float().expand(num_draws, -1)
    drawn = ids(sample(logits, [request(**params)] * num_draws))
    return torch.bincount(torch.tensor(drawn), minlength=len(logits_row)).float() / num_draws


def test_greedy_takes_each_rows_argmax():
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(0))
    assert ids(sample(logits, [request(temperature=0)] * 5)) == logits.argmax(-1).tolist()


def test_temperature_sampling_follows_softmax():
    logits = [2.0, 1.0, 0.0, -1.0]
    for temperature in (0.5, 1.0, 2.0):
        expected = torch.softmax(torch.tensor(logits) / temperature, -1)
        observed = frequencies(logits, temperature=temperature)
        assert (observed - expected).abs().max() < 0.03, temperature


def test_greedy_and_random_rows_share_a_batch():
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0]] * 2 + [[0.0] * 4] * 200)
    requests = [request(temperature=0)] * 2 + [request(temperature=1.0)] * 200
    out = ids(sample(logits, requests))
    assert out[:2] == [1, 1]
    assert len(set(out[2:])) == 4  # uniform rows draw every token


def test_top_k_keeps_only_the_k_best():
    observed = frequencies([3.0, 2.5, 2.0, 1.0, 0.5], top_k=2)
    assert observed[2:].sum() == 0 and observed[:2].min() > 0.3
    masked = apply_top_k(torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]]), [1, 0])
    assert torch.isinf(masked[0]).tolist() == [True, False, True]
    assert torch.isfinite(masked[1]).all()  # k = 0: disabled


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = torch.isfinite(apply_top_p(logits, torch.tensor([0.7])))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.7
    kept = torch.isfinite(apply_top_p(logits, torch.tensor([0.4])))
    assert kept.tolist() == [[True, False, False, False]]  # the best token always stays
    observed = frequencies(logits[0].tolist(), top_p=0.7)
    assert observed[2:].sum() == 0
    assert abs(observed[0] - 0.5 / 0.8) < 0.03  # renormalized inside the nucleus


def test_top_p_applies_only_to_its_rows():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(400, -1)
    requests = [request(top_p=1.0)] * 200 + [request(top_p=0.5)] * 200
    drawn = ids(sample(logits, requests))
    assert set(drawn[:200]) == {0, 1, 2, 3}
    assert set(drawn[200:]) == {0}


def reference_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Straightforward full-sort nucleus, row by row."""
    out = logits.clone()
    for row in out:
        probs, order = row.softmax(-1).sort(descending=True)
        before = probs.cumsum(-1) - probs
        row[order[before >= top_p]] = float("-inf")
    return out


@pytest.mark.parametrize("tiers", [(4,), (4, 16), (128, 1024), ()])
def test_top_p_candidates_and_sort_fallback_agree_with_a_full_sort(tiers):
    generator = torch.Generator().manual_seed(3)
    peaked = torch.randn(3, 300, generator=generator) * 6  # small nuclei
    flat = torch.randn(3, 300, generator=generator) * 0.1  # nuclei of ~270 tokens
    logits = torch.cat([peaked, flat])
    top_ps = torch.tensor([0.9, 0.5, 0.99, 0.9, 0.5, 0.99])
    ours = apply_top_p(logits, top_ps, candidate_tiers=tiers)
    for row in range(6):
        expected = reference_top_p(logits[row : row + 1], top_ps[row].item())
        assert torch.equal(torch.isfinite(ours[row]), torch.isfinite(expected[0])), row


def test_inverse_cdf_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    uniforms = torch.tensor([0.0, 0.4999, 0.5, 1.0 - 2**-24])
    assert sample_from_probs(probs, uniforms).tolist() == [1, 1, 3, 3]


def test_min_p_drops_tokens_far_below_the_best():
    probs = torch.tensor([[0.6, 0.3, 0.08, 0.02]])
    kept = apply_min_p(probs, torch.tensor([0.1])) > 0
    assert kept.tolist() == [[True, True, True, False]]  # 0.02 < 0.1 * 0.6
    observed = frequencies(probs[0].log().tolist(), min_p=0.2)
    assert observed[2:].sum() == 0


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    out = apply_penalties(logits, [request(prompt=[0], output=[1], repetition_penalty=2.0)])
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0, 1.0]]  # prompt and output tokens only


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 5)
    req = request(prompt=[4], output=[0, 0, 0, 1], presence_penalty=0.5, frequency_penalty=0.25)
    assert apply_penalties(logits, [req]).tolist() == [[-1.25, -0.75, 0.0, 0.0, 0.0]]


def test_penalties_apply_per_row_and_change_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]] * 2)
    requests = [
        request(output=[0], temperature=0, frequency_penalty=1.0),
        request(output=[0], temperature=0),
    ]
    assert ids(sample(logits, requests)) == [1, 0]


def test_logit_bias_shifts_logits_and_ignores_unknown_ids():
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    out = sample(logits, [request(temperature=0, logit_bias=((2, 5.0), (99, 100.0)))])
    assert ids(out) == [2]
    banned = sample(
        logits.expand(50, -1), [request(temperature=1.0, logit_bias=((0, -100.0),))] * 50
    )
    assert 0 not in ids(banned)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_ids_until_reached(ignore_eos):
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0, 1.0]])  # EOS (2) best, stop id 3 second
    params = dict(temperature=0, min_tokens=2, stop_token_ids=(3,), ignore_eos=ignore_eos)
    assert ids(sample(logits, [request(output=[0], **params)])) == [4]
    assert ids(sample(logits, [request(output=[0, 1], **params)])) == [2]  # reached


def test_seeded_rows_do_not_depend_on_batch_mates_or_position():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=generator)
    target = request(output=[1, 2, 3], seed=1234, temperature=1.0)
    alone = ids(sample(logits[:1], [target], seed=0))[0]
    mates = [request(temperature=1.0), request(seed=7, temperature=0.7, top_p=0.9)]
    mate_rows = logits[3:5]
    for position in range(3):
        batch = [*mates]
        batch.insert(position, target)
        rows = torch.cat([mate_rows[:position], logits[:1], mate_rows[position:]])
        out = ids(sample(rows, batch, seed=position + 10))  # different global RNG, too
        assert out[position] == alone


def test_seeded_draws_vary_with_output_position_and_choice_index():
    logits = torch.zeros(1, 1000)  # uniform: any repeat would be a coincidence
    by_position = {ids(sample(logits, [request(output=[0] * k, seed=3)]))[0] for k in range(8)}
    by_choice = {ids(sample(logits, [request(index=i, seed=3)]))[0] for i in range(8)}
    assert len(by_position) > 4 and len(by_choice) > 4


def test_unseeded_sampling_is_reproducible_from_the_sampler_seed():
    logits = torch.zeros(64, 1000)
    requests = [request()] * 64
    assert ids(sample(logits, requests, seed=5)) == ids(sample(logits, requests, seed=5))
    assert ids(sample(logits, requests, seed=5)) != ids(sample(logits, requests, seed=6))


def test_logprobs_are_from_the_raw_distribution_with_sorted_alternatives():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0, 0.0]])
    raw = torch.log_softmax(logits, -1)[0]
    params = dict(temperature=0, logprobs=3, repetition_penalty=5.0, logit_bias=((4, 10.0),))
    (out,) = sample(logits, [request(prompt=[1], **params)])
    assert out.token_id == 4  # the bias decided the sample...
    assert math.isclose(out.logprob, raw[4].item(), rel_tol=1e-6)  # ...not the logprobs
    assert [t.token_id for t in out.top_logprobs] == [1, 3, 2]
    for alt in out.top_logprobs:
        assert math.isclose(alt.logprob, raw[alt.token_id].item(), rel_tol=1e-6)


def test_logprobs_per_row():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(2))
    out = sample(logits, [request(temperature=0, logprobs=0), request(), request(logprobs=5)])
    assert out[0].logprob is not None and out[0].top_logprobs == ()
    assert out[1].logprob is None
    assert len(out[2].top_logprobs) == 5
    values = [t.logprob for t in out[2].top_logprobs]
    assert values == sorted(values, reverse=True)
    assert math.isclose(
        out[2].logprob, torch.log_softmax(logits[2], -1)[out[2].token_id].item(), rel_tol=1e-6
    )


def test_unneeded_stages_are_skipped(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("this stage should have been skipped")

    for name in ("apply_top_k", "apply_top_p", "apply_min_p", "apply_penalties"):
        monkeypatch.setattr(sampler_module, name, forbidden)
    logits = torch.randn(4, VOCAB)
    out = sample(logits, [request(temperature=0), request(temperature=0.8)] * 2)
    assert len(out) == 4 and all(o.logprob is None for o in out)


def test_rows_and_requests_must_match():
    with pytest.raises(ValueError, match="2 rows of logits for 1 requests"):
        sample(torch.zeros(2, VOCAB), [request()])


def test_bf16_logits_are_accepted():
    logits = torch.tensor([[0.0, 1.0, 0.5]], dtype=torch.bfloat16)
    assert ids(Sampler(frozenset({EOS}))(logits, [request(temperature=0)])) == [1]


def test_nan_logits_raise_so_the_engine_can_fail_that_request_alone():
    from app.model.sampler import NonFiniteLogitsError

    logits = torch.zeros(2, VOCAB)
    logits[1, 3] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"rows \[1\]"):
        sample(logits, [request(temperature=0.0), request(temperature=0.7)])


def test_infinite_logits_without_nan_are_not_rejected():
    """+inf and -inf in one batch sum to NaN; that alone must not fail a request."""
    logits = torch.zeros(2, VOCAB)
    logits[0, 3], logits[1, 5] = float("inf"), float("-inf")
    assert ids(sample(logits, [request(temperature=0.0), request(temperature=0.0)]))[0] == 3


def test_a_row_without_probability_mass_still_yields_a_valid_id():
    probs = torch.tensor([[0.0, 0.0, 0.0], [float("nan"), 0.5, 0.5]])
    ids = sample_from_probs(probs, torch.tensor([0.99, 0.3]))
    assert ids.tolist()[0] in (0, 1, 2) and ids.tolist()[1] in (1, 2)
