"""Stopping criteria, each alone, and the stop-string helpers."""

from __future__ import annotations

import pytest

from app.core import FinishReason, SamplingParams, Sequence
from app.engine.stopping import (
    ContextLengthCriterion,
    MaxTokensCriterion,
    StopDecision,
    StopTokenCriterion,
    check_stop,
    default_criteria,
    find_stop_string,
    matched_stop_token,
    partial_stop_length,
)

EOS = 2


def make_seq(outputs: list[int], prompt_len: int = 3, max_tokens: int = 100, **params) -> Sequence:
    seq = Sequence("r", list(range(10, 10 + prompt_len)), SamplingParams(**params), max_tokens)
    seq.output_token_ids = list(outputs)
    return seq


def test_eos_stops_with_no_stop_reason():
    assert StopTokenCriterion(frozenset({EOS}))(make_seq([5, EOS])) == StopDecision(
        FinishReason.STOP, None
    )


def test_eos_only_counts_as_the_newest_token():
    assert StopTokenCriterion(frozenset({EOS}))(make_seq([EOS, 5])) is None
    assert StopTokenCriterion(frozenset({EOS}))(make_seq([])) is None


def test_eos_ignored_with_ignore_eos():
    assert StopTokenCriterion(frozenset({EOS}))(make_seq([EOS], ignore_eos=True)) is None


def test_stop_token_id_reports_itself_even_with_ignore_eos():
    seq = make_seq([7, 42], stop_token_ids=(42,), ignore_eos=True)
    assert StopTokenCriterion(frozenset({EOS}))(seq) == StopDecision(FinishReason.STOP, 42)


@pytest.mark.parametrize("num_outputs, stops", [(1, False), (2, False), (3, True), (4, True)])
def test_min_tokens_delays_eos_and_stop_ids(num_outputs: int, stops: bool):
    outputs = [5] * (num_outputs - 1) + [EOS]
    assert (StopTokenCriterion(frozenset({EOS}))(make_seq(outputs, min_tokens=3)) is not None) == (
        stops
    )
    outputs = [5] * (num_outputs - 1) + [9]
    decision = StopTokenCriterion(frozenset())(make_seq(outputs, min_tokens=3, stop_token_ids=(9,)))
    assert (decision is not None) == stops


def test_matched_stop_token_prefers_the_users_stop_id():
    params = SamplingParams(stop_token_ids=(EOS,))
    assert matched_stop_token(EOS, 1, params, frozenset({EOS})) == (True, EOS)
    assert matched_stop_token(EOS, 1, SamplingParams(), frozenset({EOS})) == (True, None)
    assert matched_stop_token(5, 1, SamplingParams(), frozenset({EOS})) == (False, None)


def test_max_tokens():
    assert MaxTokensCriterion()(make_seq([5, 6], max_tokens=3)) is None
    assert MaxTokensCriterion()(make_seq([5, 6, 7], max_tokens=3)) == StopDecision(
        FinishReason.LENGTH
    )


def test_context_length():
    criterion = ContextLengthCriterion(max_model_len=6)
    assert criterion(make_seq([5, 6], prompt_len=3)) is None
    assert criterion(make_seq([5, 6, 7], prompt_len=3)) == StopDecision(FinishReason.LENGTH)


def test_check_stop_prefers_stop_token_over_length():
    criteria = default_criteria(frozenset({EOS}), max_model_len=100)
    seq = make_seq([5, EOS], max_tokens=2)
    assert check_stop(seq, criteria) == StopDecision(FinishReason.STOP)
    seq = make_seq([5, 6], max_tokens=2)
    assert check_stop(seq, criteria) == StopDecision(FinishReason.LENGTH)
    assert check_stop(make_seq([5]), criteria) is None


def test_find_stop_string_picks_the_earliest():
    assert find_stop_string("hello world", ["world", "lo"]) == (3, "lo")
    assert find_stop_string("hello world", ["xyz"]) is None
    assert find_stop_string("abcabc", ["abc"], start=1) == (3, "abc")


@pytest.mark.parametrize(
    "text, stops, expected",
    [
        ("hello wor", ["world"], 3),
        ("hello", ["world"], 0),
        ("hello w", ["world", "wx"], 1),
        ("aaa", ["aab"], 2),
        ("world", ["world"], 0),  # a whole match is not a *proper* prefix
        ("", ["x"], 0),
        ("ab", ["abcd", "b"], 2),
    ],
)
def test_partial_stop_length(text: str, stops: list[str], expected: int):
    assert partial_stop_length(text, stops) == expected
