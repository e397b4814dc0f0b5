"""Log-probabilities in the OpenAI dialects' shapes: the legacy completions `logprobs`
object (generated tokens, and with `echo` the prompt's) and vLLM's `prompt_logprobs`.

The engine hands each choice's prompt log-probabilities over once, with its first
delta: one entry per prompt token, None for the first (nothing predicts it). Two shapes
show them: completions' `echo` with `logprobs` (the legacy `logprobs` object, prompt
tokens first, as evaluation harnesses such as lm-eval read it) and vLLM's
`prompt_logprobs` (token id -> logprob, rank, decoded token, per position).
"""

from __future__ import annotations

from collections.abc import Sequence

from app.api.schemas import CompletionLogprobs, PromptLogprobs, PromptTokenLogprob
from app.api.sse import finite
from app.core import PromptTokenLogprob as EngineEntry
from app.core import TokenLogprob


def completion_logprobs(
    entries: Sequence[TokenLogprob | EngineEntry | None],
    text_offset: int,
    num_top: int | None = None,
    unpredicted_text: str = "",
) -> tuple[CompletionLogprobs, int]:
    """The legacy completions `logprobs` object of these tokens, generated or (with
    `echo`) the prompt's: each token's text, log-probability and top alternatives (the
    token itself among them; at most `num_top` others), and the text offset after them.
    A None entry is the prompt's first token, which nothing predicts: its text is
    `unpredicted_text`, its log-probability and alternatives null."""
    result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for entry in entries:
        top: dict[str, float] | None = None
        if entry is None:
            text, logprob = unpredicted_text, None
        else:
            text, logprob = entry.text, finite(entry.logprob)
            top = {text: logprob}
            for _token_id, alternative, alternative_logprob in entry.top[:num_top]:
                top.setdefault(alternative, finite(alternative_logprob))
        result.tokens.append(text)
        result.token_logprobs.append(logprob)
        result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(text)
    return result, text_offset


def joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    """Two runs of a choice's logprobs (prompt, then generated tokens) as one."""
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=first.top_logprobs + then.top_logprobs,
        text_offset=first.text_offset + then.text_offset,
    )


def vllm_prompt_logprobs(entries: Sequence[EngineEntry | None], num_top: int) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: per prompt position, the prompt token and the top
    `num_top` alternatives by token id, each with its logprob and rank."""
    result: PromptLogprobs = []
    for entry in entries:
        if entry is None:
            result.append(None)
            continue
        position = {
            str(entry.token_id): PromptTokenLogprob(
                logprob=finite(entry.logprob), rank=entry.rank, decoded_token=entry.text
            )
        }
        for rank, (token_id, text, logprob) in enumerate(entry.top[:num_top], start=1):
            position.setdefault(
                str(token_id),
                PromptTokenLogprob(logprob=finite(logprob), rank=rank, decoded_token=text),
            )
        result.append(position)
    return result
