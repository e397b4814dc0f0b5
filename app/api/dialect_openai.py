"""The OpenAI dialects: /v1/completions and /v1/chat/completions (see driver.py).

A plain-text token is written from a template (stream_frames.py); anything with
logprobs, and the usage chunk, goes through the pydantic chunk models.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from app.api.driver import ChoiceResult, Dialect
from app.api.params import chat_inputs, check_model, completion_inputs
from app.api.request_record import Usage
from app.api.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FinishReasonName,
    PromptTokensDetails,
    UsageInfo,
)
from app.api.sse import DONE, sse_event
from app.api.state import Serving
from app.api.stream_frames import ChatFrames, CompletionFrames, finite
from app.core import FinishReason, TokenDelta, TokenLogprob


def finish_name(reason: FinishReason | None) -> FinishReasonName | None:
    """OpenAI's finish_reason; also the templates' (stream_frames.py)."""
    if reason is FinishReason.STOP:
        return "stop"
    if reason is FinishReason.LENGTH:
        return "length"
    return None


def usage_info(usage: Usage) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def completion_logprobs(
    logprobs: Sequence[TokenLogprob], text_offset: int
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


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> ChatLogprobs:
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


class OpenAIDialect(Dialect):
    """What both OpenAI routes share: chunks with id/created/model, the usage chunk."""

    chunk_model: ClassVar[type[CompletionChunk] | type[ChatCompletionChunk]]

    def __init__(self, *args: Any, model: str, include_usage: bool, logprobs: bool) -> None:
        super().__init__(*args)
        self.model = model
        self.include_usage = include_usage
        self.want_logprobs = logprobs

    @staticmethod
    def user(body: CompletionRequest | ChatCompletionRequest) -> str | None:
        return body.user

    def chunk(self, choices: list[Any], usage: UsageInfo | None = None) -> bytes:
        return sse_event(
            self.chunk_model(
                id=self.response_id,
                created=self.created,
                model=self.model,
                choices=choices,
                usage=usage,
            )
        )

    def closing(self, usage: Usage) -> Iterable[bytes]:
        if self.include_usage:
            yield self.chunk([], usage_info(usage))
        yield DONE


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


class CompletionDialect(OpenAIDialect):
    id_prefix = "cmpl"
    chunk_model = CompletionChunk

    @classmethod
    def parse(
        cls, body: CompletionRequest, serving: Serving, request_id: str, stream: bool
    ) -> CompletionDialect:
        check_model(body.model, serving.model.name)
        prompts, params, n = completion_inputs(body, serving.limits, serving.tokenizer)
        dialect = cls(
            request_id,
            prompts,
            params,
            n,
            stream,
            model=serving.model.name,
            include_usage=_include_usage(body),
            logprobs=params[0].logprobs is not None,
        )
        dialect.echo = _echo_texts(body, prompts, serving) if body.echo else None
        return dialect

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.echo: list[str] | None = None  # per prompt, with `echo`
        self.offsets = [0] * self.num_choices  # text offset of each choice (logprobs)
        self.frames = CompletionFrames(self.response_id, self.created, self.model)

    def opening(self) -> Iterable[bytes]:
        if not self.echo:
            return
        for index in range(self.num_choices):
            text = self.echo[index // self.n]
            self.offsets[index] = len(text)
            yield self.chunk([CompletionChunkChoice(index=index, text=text)])

    def render_delta(self, index: int, delta: TokenDelta) -> Iterable[bytes]:
        logprobs = None
        if self.want_logprobs and delta.logprobs:
            logprobs, self.offsets[index] = completion_logprobs(delta.logprobs, self.offsets[index])
        if not (delta.text or logprobs or delta.finished):
            return ()  # text held back (half a character, a possible stop string)
        finish = finish_name(delta.finish_reason)
        if logprobs is None:  # the common case: a template, no pydantic model
            return (self.frames.text(index, delta.text, finish, delta.stop_reason),)
        choice = CompletionChunkChoice(
            index=index,
            text=delta.text,
            logprobs=logprobs,
            finish_reason=finish,
            stop_reason=delta.stop_reason,
        )
        return (self.chunk([choice]),)

    def render_final(self, results: list[ChoiceResult], usage: Usage) -> CompletionResponse:
        choices = []
        for result in results:
            prefix = self.echo[result.index // self.n] if self.echo else ""
            logprobs = None
            if self.want_logprobs:
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
            id=self.response_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage_info(usage),
        )


def _echo_texts(body: CompletionRequest, prompts: list[list[int]], serving: Serving) -> list[str]:
    if isinstance(body.prompt, str):
        return [body.prompt]
    if all(isinstance(item, str) for item in body.prompt):
        return [str(item) for item in body.prompt]
    return [serving.tokenizer.decode(prompt, skip_special_tokens=False) for prompt in prompts]


class ChatDialect(OpenAIDialect):
    id_prefix = "chatcmpl"
    chunk_model = ChatCompletionChunk

    @classmethod
    def parse(
        cls, body: ChatCompletionRequest, serving: Serving, request_id: str, stream: bool
    ) -> ChatDialect:
        check_model(body.model, serving.model.name)
        prompt, params, n = chat_inputs(body, serving.limits, serving.tokenizer)
        return cls(
            request_id,
            [prompt],
            [params],
            n,
            stream,
            model=serving.model.name,
            include_usage=_include_usage(body),
            logprobs=params.logprobs is not None,
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frames = ChatFrames(self.response_id, self.created, self.model)

    def opening(self) -> Iterable[bytes]:
        # The first chunk of each choice carries the role, before any token is ready.
        for index in range(self.num_choices):
            yield self.chunk(
                [ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))]
            )

    def render_delta(self, index: int, delta: TokenDelta) -> Iterable[bytes]:
        logprobs = None
        if self.want_logprobs and delta.logprobs:
            logprobs = chat_logprobs(delta.logprobs)
        if not (delta.text or logprobs or delta.finished):
            return ()
        finish = finish_name(delta.finish_reason)
        if logprobs is None:  # the common case: a template, no pydantic model
            return (self.frames.content(index, delta.text or None, finish, delta.stop_reason),)
        choice = ChatChunkChoice(
            index=index,
            delta=ChatDelta(content=delta.text or None),
            logprobs=logprobs,
            finish_reason=finish,
            stop_reason=delta.stop_reason,
        )
        return (self.chunk([choice]),)

    def render_final(self, results: list[ChoiceResult], usage: Usage) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=result.index,
                message=ChatResponseMessage(content=result.text),
                logprobs=chat_logprobs(result.logprobs) if self.want_logprobs else None,
                finish_reason=finish_name(result.finish_reason),
                stop_reason=result.stop_reason,
            )
            for result in results
        ]
        return ChatCompletionResponse(
            id=self.response_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage_info(usage),
        )
