"""Stopping criteria: small callables, each unit-tested alone.

Token-level criteria look at a sequence right after its newest token was appended and
say whether it ends there (the scheduler runs them in `update`). Stop *strings* work on
text, so they live in the detokenizer, which uses the two string helpers at the bottom.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import Protocol

from app.core import FinishReason, SamplingParams, Sequence


@dataclass(frozen=True)
class StopDecision:
    reason: FinishReason
    stop_token_id: int | None = None  # the stop_token_ids entry that matched, if any


class StopCriterion(Protocol):
    def __call__(self, seq: Sequence) -> StopDecision | None: ...


def min_tokens_reached(params: SamplingParams, num_output_tokens: int) -> bool:
    """EOS and stop token ids only count once min_tokens outputs exist (this one included)."""
    return num_output_tokens >= params.min_tokens


def matched_stop_token(
    token_id: int,
    num_output_tokens: int,
    params: SamplingParams,
    eos_token_ids: frozenset[int],
) -> tuple[bool, int | None]:
    """Whether `token_id`, the newest of `num_output_tokens` outputs, ends the sequence
    as a stop token: (matched, the stop_token_ids entry or None for EOS).

    Shared by the scheduler (finish) and the detokenizer (hide the stop token's text).
    A token in both sets reports the user's stop_token_ids entry, the more specific one.
    """
    if not min_tokens_reached(params, num_output_tokens):
        return False, None
    if token_id in params.stop_token_ids:
        return True, token_id
    if not params.ignore_eos and token_id in eos_token_ids:
        return True, None
    return False, None


class StopTokenCriterion:
    """EOS (unless ignore_eos) or one of params.stop_token_ids -> STOP, after min_tokens."""

    def __init__(self, eos_token_ids: frozenset[int]) -> None:
        self.eos_token_ids = eos_token_ids

    def __call__(self, seq: Sequence) -> StopDecision | None:
        if not seq.output_token_ids:
            return None
        matched, stop_id = matched_stop_token(
            seq.output_token_ids[-1], len(seq.output_token_ids), seq.params, self.eos_token_ids
        )
        return StopDecision(FinishReason.STOP, stop_id) if matched else None


class MaxTokensCriterion:
    """seq.max_tokens outputs generated -> LENGTH."""

    def __call__(self, seq: Sequence) -> StopDecision | None:
        if len(seq.output_token_ids) >= seq.max_tokens:
            return StopDecision(FinishReason.LENGTH)
        return None


class ContextLengthCriterion:
    """The context window is full (prompt + output == max_model_len) -> LENGTH."""

    def __init__(self, max_model_len: int) -> None:
        self.max_model_len = max_model_len

    def __call__(self, seq: Sequence) -> StopDecision | None:
        if seq.num_tokens >= self.max_model_len:
            return StopDecision(FinishReason.LENGTH)
        return None


def default_criteria(eos_token_ids: frozenset[int], max_model_len: int) -> list[StopCriterion]:
    """In priority order: a stop token wins over a length limit hit by the same token."""
    return [
        StopTokenCriterion(eos_token_ids),
        MaxTokensCriterion(),
        ContextLengthCriterion(max_model_len),
    ]


def check_stop(seq: Sequence, criteria: Iterable[StopCriterion]) -> StopDecision | None:
    """The first criterion that fires, or None if the sequence goes on."""
    for criterion in criteria:
        decision = criterion(seq)
        if decision is not None:
            return decision
    return None


# ---------------------------------------------------------------- stop strings
def find_stop_string(
    text: str, stop_strings: SequenceOf[str], start: int = 0
) -> tuple[int, str] | None:
    """The earliest stop string occurring in text[start:]: (its index in text, it)."""
    best: tuple[int, str] | None = None
    for stop in stop_strings:
        index = text.find(stop, start)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def partial_stop_length(text: str, stop_strings: SequenceOf[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string.

    That suffix must be held back: the next token may complete the stop string, and text
    that belongs to a stop string must never reach the client.
    """
    longest = 0
    for stop in stop_strings:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
