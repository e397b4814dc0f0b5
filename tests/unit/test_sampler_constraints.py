"""The batched sampler's grammar masks: forbidden tokens never drawn, only the rows that
carry a constraint touched, masks before every other stage, raw logprobs kept."""

from __future__ import annotations

import torch

from app.core import SamplingParams
from app.model.constraint_masks import TokenBitmask
from app.model.sampler import Sampler, SamplingRequest, apply_token_bitmask

EOS = 2


def words_allowing(allowed_per_row: list[list[int]], vocab: int) -> torch.Tensor:
    """Reference bitmask built bit by bit: [R, ceil(vocab / 32)] int32."""
    num_words = (vocab + 31) // 32
    rows = []
    for allowed in allowed_per_row:
        words = [0] * num_words
        for token in allowed:
            words[token // 32] |= 1 << (token % 32)
        rows.append([w - (1 << 32) if w >= 1 << 31 else w for w in words])  # as int32
    return torch.tensor(rows, dtype=torch.int32)


def request(output=(), **params) -> SamplingRequest:
    return SamplingRequest(SamplingParams(**params), [5], list(output))


def test_apply_token_bitmask_matches_a_token_by_token_reference():
    vocab = 70  # not a multiple of 32: the last word is partly beyond the vocabulary
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=generator)
    allowed = [[0, 31, 32, 63, 69], list(range(vocab)), [5]]
    masked = apply_token_bitmask(logits, words_allowing(allowed, vocab))
    for row, tokens in enumerate(allowed):
        for token in range(vocab):
            expected = logits[row, token] if token in tokens else float("-inf")
            assert masked[row, token] == expected


def test_greedy_rows_take_the_best_allowed_token_and_free_rows_are_untouched():
    logits = torch.tensor([[0.0, 1.0, 0.5, 9.0, 2.0]] * 3)
    bitmask = TokenBitmask([0, 2], words_allowing([[1, 4], [0]], 5))
    outputs = Sampler(frozenset({EOS}))(logits, [request(temperature=0.0)] * 3, bitmask)
    assert [o.token_id for o in outputs] == [4, 3, 0]


def test_random_rows_never_draw_a_forbidden_token():
    num_rows = 2000
    logits = torch.zeros(num_rows, 40)  # uniform: every token equally likely unmasked
    allowed = [3, 17, 33]
    bitmask = TokenBitmask(list(range(num_rows)), words_allowing([allowed] * num_rows, 40))
    requests = [request(temperature=1.0, top_k=30, top_p=0.9)] * num_rows
    drawn = {o.token_id for o in Sampler(frozenset({EOS}))(logits, requests, bitmask)}
    assert drawn == set(allowed)


def test_the_mask_comes_before_penalties_and_bias():
    logits = torch.tensor([[5.0, 4.0, 0.0, 1.0]])
    # A bias cannot revive the forbidden token 0; the penalty still applies to the
    # allowed ones: token 1 (already in the output) falls from 4 to 0, below token 3.
    params = {"temperature": 0.0, "logit_bias": ((0, 100.0),), "presence_penalty": 4.0}
    bitmask = TokenBitmask([0], words_allowing([[1, 3]], 4))
    outputs = Sampler(frozenset({EOS}))(logits, [request(output=[1], **params)], bitmask)
    assert outputs[0].token_id == 3


def test_grammar_wins_over_min_tokens_when_only_eos_is_allowed():
    logits = torch.tensor([[1.0, 2.0, 0.0, 3.0]])
    bitmask = TokenBitmask([0], words_allowing([[EOS]], 4))
    outputs = Sampler(frozenset({EOS}))(logits, [request(temperature=0.0, min_tokens=5)], bitmask)
    assert outputs[0].token_id == EOS


def test_logprobs_stay_those_of_the_raw_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    bitmask = TokenBitmask([0], words_allowing([[1]], 4))
    (output,) = Sampler(frozenset({EOS}))(logits, [request(temperature=0.0, logprobs=1)], bitmask)
    raw = torch.log_softmax(logits[0], dim=-1)
    assert output.token_id == 1
    assert output.logprob == raw[1].item()
    assert output.top_logprobs[0].token_id == 3
