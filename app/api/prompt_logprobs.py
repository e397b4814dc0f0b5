"""Prompt log-probabilities in the OpenAI dialects' shapes.

The engine hands each choice's prompt log-probabilities over once, with its first
delta: one entry per prompt token, None for the first (nothing predicts it). Two shapes
show them: completions' `echo` with `logprobs` (the legacy `logprobs` object, prompt
tokens first, as evaluation harnesses such as lm-eval read it) and vLLM's
`prompt_logprobs` (token id -> logprob, rank, decoded token, per position).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from app.api.schemas import CompletionLogprobs, PromptLogprobs, PromptTokenLogprob
from app.api.sse import finite
from app.core import PromptTokenLogprob as EngineEntry


def echo_logprobs(
    prompt_ids: Sequence[int],
    entries: Sequence[EngineEntry | None],
    num_top: int,
    token_text: Callable[[int], str],
) -> tuple[CompletionLogprobs, int]:
    """The prompt's part of an echoed completion's `logprobs`: each prompt token's text,
    log-probability (null for the first) and top `num_top` alternatives (with the token
    itself, as for generated tokens); and the text offset after the prompt's tokens."""
    result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = 0
    for token_id, entry in zip(prompt_ids, entries):
        if entry is None:
            text = token_text(token_id)
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            text = entry.text
            result.token_logprobs.append(finite(entry.logprob))
            top = {text: finite(entry.logprob)}
            for _id, alternative, logprob in entry.top[:num_top]:
                top.setdefault(alternative, finite(logprob))
            result.top_logprobs.append(top)
        result.tokens.append(text)
        result.text_offset.append(offset)
        offset += len(text)
    return result, offset


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
