"""OpenAI-compatible generation routes: /v1/completions and /v1/chat/completions.

Every check (schema, model, limits, tokenization, context window) runs before a stream
opens, so a bad streaming request still gets a real 4xx status.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from fastapi import APIRouter, Request

from app.api.deps import ServingDep, check_model
from app.api.errors import ERROR_RESPONSES
from app.api.generation import ChoiceResult, Generation, new_request_id, unless_disconnected
from app.api.openai_format import (
    chat_logprobs,
    completion_logprobs,
    finish_name,
    usage_info,
)
from app.api.params import (
    chat_max_tokens,
    chat_params,
    check_n,
    check_num_prompts,
    completion_params,
    fit_to_context,
    with_max_tokens,
)
from app.api.prompts import encode_chat, encode_completion_prompts
from app.api.request_record import note_user
from app.api.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
)
from app.api.sse import DONE, EventStreamResponse, pump_events, sse_event
from app.api.stream_frames import ChatFrames, CompletionFrames
from app.core import TokenDelta

router = APIRouter(tags=["OpenAI"])


@dataclass(frozen=True)
class ResponseHeader:
    """The fields every response object and chunk of one request shares."""

    id: str
    created: int
    model: str


def _header(prefix: str, model: str) -> ResponseHeader:
    return ResponseHeader(id=new_request_id(prefix), created=int(time.time()), model=model)


async def _collect(request: Request, generation: Generation) -> list[ChoiceResult]:
    try:
        return await unless_disconnected(request, generation.collect())
    finally:
        await generation.aclose()


# --- /v1/completions -----------------------------------------------------------------------


def _echo_texts(
    body: CompletionRequest, prompts: list[list[int]], serving: ServingDep
) -> list[str]:
    if isinstance(body.prompt, str):
        return [body.prompt]
    if all(isinstance(item, str) for item in body.prompt):
        return [str(item) for item in body.prompt]
    return [serving.tokenizer.decode(prompt, skip_special_tokens=False) for prompt in prompts]


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=ERROR_RESPONSES,
    summary="Complete a prompt (streams server-sent events when `stream` is true)",
)
async def create_completion(body: CompletionRequest, request: Request, serving: ServingDep):
    note_user(body.user)  # first: a request refused below still logs who sent it
    check_model(body.model, serving)
    limits = serving.limits
    n = check_n(body.n, limits)
    check_num_prompts(body.prompt, limits)
    params = completion_params(body, limits)
    prompts = encode_completion_prompts(body.prompt, serving.tokenizer)
    several = len(prompts) > 1
    per_prompt = [
        with_max_tokens(
            params,
            fit_to_context(
                len(prompt),
                params.max_tokens,
                limits,
                prompt_param=f"prompt[{i}]" if several else "prompt",
            ),
        )
        for i, prompt in enumerate(prompts)
    ]
    echo = _echo_texts(body, prompts, serving) if body.echo else None
    header = _header("cmpl", serving.model.name)
    generation = Generation(serving.engine, header.id, prompts, per_prompt, n)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _completion_events(
            generation,
            header,
            echo,
            include_usage,
            params.logprobs is not None,
            serving.keepalive_interval_s,
        )
        return EventStreamResponse(events)
    results = await _collect(request, generation)
    choices = []
    for result in results:
        prefix = echo[result.index // n] if echo else ""
        logprobs = None
        if params.logprobs is not None:
            logprobs, _ = completion_logprobs(result.logprobs, len(prefix))
        choices.append(
            CompletionChoice(
                index=result.index,
                text=prefix + result.text,
                logprobs=logprobs,
                finish_reason=finish_name(result.finish_reason),
                stop_reason=result.stop_reason,
            )
        )
    return CompletionResponse(
        id=header.id,
        created=header.created,
        model=header.model,
        choices=choices,
        usage=usage_info(generation.usage),
    )


def _completion_events(
    generation: Generation,
    header: ResponseHeader,
    echo: list[str] | None,
    include_usage: bool,
    want_logprobs: bool,
    keepalive_s: float,
):
    offsets = [0] * generation.num_choices

    def chunk(choices: list[CompletionChunkChoice], usage=None) -> bytes:
        return sse_event(
            CompletionChunk(
                id=header.id,
                created=header.created,
                model=header.model,
                choices=choices,
                usage=usage,
            )
        )

    def opening() -> Iterable[bytes]:
        if not echo:
            return
        for index in range(generation.num_choices):
            text = echo[index // generation.n]
            offsets[index] = len(text)
            yield chunk([CompletionChunkChoice(index=index, text=text)])

    frames = CompletionFrames(header.id, header.created, header.model)

    def render(index: int, delta: TokenDelta) -> Iterable[bytes]:
        logprobs = None
        if want_logprobs and delta.logprobs:
            logprobs, offsets[index] = completion_logprobs(delta.logprobs, offsets[index])
        if not (delta.text or logprobs or delta.finished):
            return ()  # text held back (half a character, a possible stop string)
        finish = finish_name(delta.finish_reason)
        if logprobs is None:  # the common case: a template, no pydantic model
            return (frames.text(index, delta.text, finish, delta.stop_reason),)
        choice = CompletionChunkChoice(
            index=index,
            text=delta.text,
            logprobs=logprobs,
            finish_reason=finish,
            stop_reason=delta.stop_reason,
        )
        return (chunk([choice]),)

    def closing() -> Iterable[bytes]:
        if include_usage:
            yield chunk([], usage=usage_info(generation.usage))
        yield DONE

    return pump_events(generation, keepalive_s, render, opening=opening(), closing=closing)


# --- /v1/chat/completions ----------------------------------------------------------------------


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=ERROR_RESPONSES,
    summary="Answer a conversation (streams server-sent events when `stream` is true)",
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, serving: ServingDep
):
    note_user(body.user)  # first: a request refused below still logs who sent it
    check_model(body.model, serving)
    limits = serving.limits
    n = check_n(body.n, limits)
    params = chat_params(body, limits)
    prompt = encode_chat(
        body.messages,
        serving.tokenizer,
        add_generation_prompt=body.add_generation_prompt is not False,
    )
    _, max_tokens_param = chat_max_tokens(body)
    max_tokens = fit_to_context(
        len(prompt),
        params.max_tokens,
        limits,
        prompt_param="messages",
        max_tokens_param=max_tokens_param,
    )
    header = _header("chatcmpl", serving.model.name)
    generation = Generation(
        serving.engine, header.id, [prompt], [with_max_tokens(params, max_tokens)], n
    )
    want_logprobs = params.logprobs is not None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _chat_events(
            generation, header, include_usage, want_logprobs, serving.keepalive_interval_s
        )
        return EventStreamResponse(events)
    results = await _collect(request, generation)
    choices = [
        ChatChoice(
            index=result.index,
            message=ChatResponseMessage(content=result.text),
            logprobs=chat_logprobs(result.logprobs) if want_logprobs else None,
            finish_reason=finish_name(result.finish_reason),
            stop_reason=result.stop_reason,
        )
        for result in results
    ]
    return ChatCompletionResponse(
        id=header.id,
        created=header.created,
        model=header.model,
        choices=choices,
        usage=usage_info(generation.usage),
    )


def _chat_events(
    generation: Generation,
    header: ResponseHeader,
    include_usage: bool,
    want_logprobs: bool,
    keepalive_s: float,
):
    def chunk(choices: list[ChatChunkChoice], usage=None) -> bytes:
        return sse_event(
            ChatCompletionChunk(
                id=header.id,
                created=header.created,
                model=header.model,
                choices=choices,
                usage=usage,
            )
        )

    # The first chunk of each choice carries the role, before any token is ready.
    opening = [
        chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
        for index in range(generation.num_choices)
    ]

    frames = ChatFrames(header.id, header.created, header.model)

    def render(index: int, delta: TokenDelta) -> Iterable[bytes]:
        logprobs = chat_logprobs(delta.logprobs) if want_logprobs and delta.logprobs else None
        if not (delta.text or logprobs or delta.finished):
            return ()
        finish = finish_name(delta.finish_reason)
        if logprobs is None:  # the common case: a template, no pydantic model
            return (frames.content(index, delta.text or None, finish, delta.stop_reason),)
        choice = ChatChunkChoice(
            index=index,
            delta=ChatDelta(content=delta.text or None),
            logprobs=logprobs,
            finish_reason=finish,
            stop_reason=delta.stop_reason,
        )
        return (chunk([choice]),)

    def closing() -> Iterable[bytes]:
        if include_usage:
            yield chunk([], usage=usage_info(generation.usage))
        yield DONE

    return pump_events(generation, keepalive_s, render, opening=opening, closing=closing)
