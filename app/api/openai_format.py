"""Engine results -> OpenAI response pieces: finish reasons, usage, logprobs."""

from __future__ import annotations

import math
from collections.abc import Sequence as SequenceOf

from app.api.generation import UsageTally
from app.api.schemas import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
    FinishReasonName,
    PromptTokensDetails,
    UsageInfo,
)
from app.core import FinishReason, TokenLogprob

# JSON has no -inf; a token the sampler masked out gets this instead (as vLLM does).
MIN_LOGPROB = -9999.0


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def finish_name(reason: FinishReason | None) -> FinishReasonName | None:
    if reason is FinishReason.STOP:
        return "stop"
    if reason is FinishReason.LENGTH:
        return "length"
    return None


def usage_info(tally: UsageTally) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=tally.prompt_tokens,
        completion_tokens=tally.completion_tokens,
        total_tokens=tally.prompt_tokens + tally.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=tally.cached_tokens),
    )


def completion_logprobs(
    logprobs: SequenceOf[TokenLogprob], text_offset: int
) -> tuple[CompletionLogprobs, int]:
    """The legacy completions logprobs object, and the text offset after these tokens."""
    result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for entry in logprobs:
        result.tokens.append(entry.text)
        result.token_logprobs.append(finite(entry.logprob))
        top = {entry.text: finite(entry.logprob)}
        for _token_id, text, logprob in entry.top:
            top.setdefault(text, finite(logprob))
        result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(entry.text)
    return result, text_offset


def chat_logprobs(logprobs: SequenceOf[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=entry.text,
                logprob=finite(entry.logprob),
                bytes=list(entry.text.encode("utf-8")),
                top_logprobs=[
                    ChatTopLogprob(
                        token=text, logprob=finite(logprob), bytes=list(text.encode("utf-8"))
                    )
                    for _token_id, text, logprob in entry.top
                ],
            )
            for entry in logprobs
        ]
    )
