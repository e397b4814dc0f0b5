"""The OpenAI dialects: /v1/completions and /v1/chat/completions (see driver.py).

Both tell the same story (`OpenAIDialect`): chunks with id/created/model, a plain-text
token written from a template (sse.TextFrames), anything with logprobs or a finish
reason through the pydantic chunk models, the usage chunk, `data: [DONE]`. A dialect
says only how its choices look, in chunks and in the final answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from app.api.constraints import request_constraint
from app.api.driver import ChoiceResult, Dialect
from app.api.params import chat_inputs, completion_inputs
from app.api.prompt_logprobs import completion_logprobs, joined, vllm_prompt_logprobs
from app.api.prompts import named_prompts
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
    DeltaToolCall,
    FinishReasonName,
    PromptTokensDetails,
    UsageInfo,
)
from app.api.sse import DONE, TextFrames, finite, sse_event
from app.api.state import Serving
from app.api.tool_calls import ToolCallStreams, answer_message
from app.core import FinishReason, TokenDelta, TokenLogprob


def finish_name(reason: FinishReason | None, num_calls: int = 0) -> FinishReasonName | None:
    """OpenAI's finish_reason; "tool_calls" for a chat answer with calls that ended as its
    grammar or EOS allowed."""
    if reason is FinishReason.STOP:
        return "tool_calls" if num_calls else "stop"
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


def chat_logprobs(
    logprobs: Sequence[TokenLogprob], token_bytes: Callable[[int], bytes]
) -> ChatLogprobs:
    """Chat logprobs; `bytes` are each token's own bytes (part of a character for some
    tokens, whose text alone is U+FFFD), from the tokenizer's vocabulary."""
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=entry.text,
                logprob=finite(entry.logprob),
                bytes=list(token_bytes(entry.token_id)),
                top_logprobs=[
                    ChatTopLogprob(
                        token=text, logprob=finite(logprob), bytes=list(token_bytes(token_id))
                    )
                    for token_id, text, logprob in entry.top
                ],
            )
            for entry in logprobs
        ]
    )


class OpenAIDialect(Dialect):
    """What both OpenAI routes share; a subclass gives its models and its choices."""

    chunk_model: ClassVar[type[CompletionChunk] | type[ChatCompletionChunk]]
    response_model: ClassVar[type[CompletionResponse] | type[ChatCompletionResponse]]

    def __init__(self, *inputs: Any, body: Any, serving: Serving) -> None:
        """`inputs`: Dialect's (request id, prompts, params, n, stream)."""
        super().__init__(*inputs)
        self.model = serving.model.name
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.want_logprobs = self.params[0].logprobs is not None
        self.token_bytes = serving.tokenizer.token_bytes
        self.prompt_top = body.prompt_logprobs  # vLLM's `prompt_logprobs`, or None
        self.calls: ToolCallStreams | None = None  # chat with tools: each choice's parser
        self.text_frames = TextFrames(
            lambda index, text: self._chunk([self.chunk_choice(index, text)])
        )

    def chunk_choice(
        self,
        index: int,
        text: str,
        logprobs: Any = None,
        delta: TokenDelta | None = None,
        calls: list[DeltaToolCall] | None = None,
    ) -> Any:
        """The choice of a chunk; `delta` gives the finish reason when it is the last one;
        `calls`: tool-call fragments (chat with tools)."""
        raise NotImplementedError

    def delta_logprobs(self, index: int, delta: TokenDelta) -> Any:
        raise NotImplementedError

    def final_choice(self, result: ChoiceResult) -> Any:
        raise NotImplementedError

    def _chunk(self, choices: list[Any], usage: UsageInfo | None = None) -> Any:
        return self.chunk_model(
            id=self.response_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
        )

    def render_delta(self, index: int, delta: TokenDelta) -> Iterable[bytes]:
        text, calls = delta.text, []
        if self.calls is not None:  # chat with tools: the parser splits text from calls
            text, calls = self.calls.feed(index, delta.text, delta.finished)
        logprobs = None
        if self.want_logprobs and delta.logprobs:
            logprobs = self.delta_logprobs(index, delta)
        if not (text or calls or logprobs or delta.finished):
            return ()  # held back (half a character, a possible stop string or call)
        if logprobs is None and not calls and not delta.finished:  # the common case
            return (self.text_frames.frame(index, text),)
        choice = self.chunk_choice(index, text, logprobs, delta, calls)
        return (sse_event(self._chunk([choice])),)

    def closing(self, usage: Usage) -> Iterable[bytes]:
        if self.include_usage:
            yield sse_event(self._chunk([], usage_info(usage)))
        yield DONE

    def render_final(self, results: list[ChoiceResult], usage: Usage) -> Any:
        return self.response_model(
            id=self.response_id,
            created=self.created,
            model=self.model,
            choices=[self.final_choice(result) for result in results],
            usage=usage_info(usage),
            **self.response_fields(results),
        )

    def response_fields(self, results: list[ChoiceResult]) -> dict[str, Any]:
        """Fields of the whole answer beyond id, created, model, choices and usage."""
        return {}


class CompletionDialect(OpenAIDialect):
    id_prefix = "cmpl"
    chunk_model = CompletionChunk
    response_model = CompletionResponse

    def __init__(self, body: CompletionRequest, serving: Serving, request_id: str, stream: bool):
        prompts, params, n = completion_inputs(body, serving.limits, serving.tokenizer)
        super().__init__(request_id, prompts, params, n, stream, body=body, serving=serving)
        self.constraint = request_constraint(body.model_extra)
        self.echo: list[str] | None = None  # per prompt, with `echo`: as sent, or decoded
        if body.echo:
            decode = serving.tokenizer.decode
            self.echo = [
                sent if isinstance(sent, str) else decode(ids, skip_special_tokens=False)
                for (_, sent), ids in zip(named_prompts(body.prompt, "prompt"), self.prompts)
            ]
        # `echo` with `logprobs`: the prompt's tokens lead the logprobs (their top-N too)
        self.echo_logprobs = bool(body.echo) and body.logprobs is not None
        self.num_top = body.logprobs or 0
        self.token_text = serving.tokenizer.token_text
        self.offsets = [0] * self.num_choices  # text offset of each choice (logprobs)

    def opening(self) -> Iterable[bytes]:
        if not self.echo or self.echo_logprobs:  # then: with the prompt's logprobs
            return
        for index in range(self.num_choices):
            text = self.echo[index // self.n]
            self.offsets[index] = len(text)
            yield sse_event(self._chunk([CompletionChunkChoice(index=index, text=text)]))

    def render_delta(self, index: int, delta: TokenDelta) -> Iterable[bytes]:
        if not delta.prompt_logprobs:
            return super().render_delta(index, delta)
        prompt = CompletionChunkChoice(index=index, text="", **self._prompt_fields(index, delta))
        if self.echo_logprobs:
            prompt.text = self.echo[index // self.n]
            self.offsets[index] = len(prompt.text)
        return (sse_event(self._chunk([prompt])), *super().render_delta(index, delta))

    def _prompt_fields(self, index: int, result: TokenDelta | ChoiceResult) -> dict[str, Any]:
        """The choice's `logprobs` for its prompt (with `echo`) and `prompt_logprobs`."""
        fields: dict[str, Any] = {}
        entries = result.prompt_logprobs
        if self.echo_logprobs:
            first_text = self.token_text(self.prompts[index // self.n][0])
            fields["logprobs"], _ = completion_logprobs(entries, 0, self.num_top, first_text)
        if self.prompt_top is not None:
            fields["prompt_logprobs"] = vllm_prompt_logprobs(entries, self.prompt_top)
        return fields

    def chunk_choice(
        self,
        index: int,
        text: str,
        logprobs: Any = None,
        delta: TokenDelta | None = None,
        calls: list[DeltaToolCall] | None = None,
    ) -> CompletionChunkChoice:
        return CompletionChunkChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=finish_name(delta.finish_reason) if delta else None,
            stop_reason=delta.stop_reason if delta else None,
        )

    def delta_logprobs(self, index: int, delta: TokenDelta) -> CompletionLogprobs:
        logprobs, self.offsets[index] = completion_logprobs(delta.logprobs, self.offsets[index])
        return logprobs

    def final_choice(self, result: ChoiceResult) -> CompletionChoice:
        prefix = self.echo[result.index // self.n] if self.echo else ""
        prompt_fields = self._prompt_fields(result.index, result)
        logprobs = None
        if self.want_logprobs:
            logprobs, _ = completion_logprobs(result.logprobs, len(prefix))
            if self.echo_logprobs:
                logprobs = joined(prompt_fields["logprobs"], logprobs)
        return CompletionChoice(
            index=result.index,
            text=prefix + result.text,
            logprobs=logprobs,
            prompt_logprobs=prompt_fields.get("prompt_logprobs"),
            finish_reason=finish_name(result.finish_reason),
            stop_reason=result.stop_reason,
        )


class ChatDialect(OpenAIDialect):
    id_prefix = "chatcmpl"
    chunk_model = ChatCompletionChunk
    response_model = ChatCompletionResponse

    def __init__(
        self, body: ChatCompletionRequest, serving: Serving, request_id: str, stream: bool
    ) -> None:
        prompts, params, n, tools = chat_inputs(body, serving.limits, serving.tokenizer)
        super().__init__(request_id, prompts, params, n, stream, body=body, serving=serving)
        self.tools = tools
        self.constraint = tools.joined_with(request_constraint(body.model_extra))
        if tools.parses_calls:
            self.calls = ToolCallStreams(self.num_choices, tools.call_format)

    def response_fields(self, results: list[ChoiceResult]) -> dict[str, Any]:
        if self.prompt_top is None or not results:
            return {}
        # One prompt: every choice computed the same values; vLLM shows them once.
        entries = results[0].prompt_logprobs
        return {"prompt_logprobs": vllm_prompt_logprobs(entries, self.prompt_top)}

    def opening(self) -> Iterable[bytes]:
        # The first chunk of each choice carries the role, before any token is ready.
        for index in range(self.num_choices):
            delta = ChatDelta(role="assistant", content="")
            yield sse_event(self._chunk([ChatChunkChoice(index=index, delta=delta)]))

    def chunk_choice(
        self,
        index: int,
        text: str,
        logprobs: Any = None,
        delta: TokenDelta | None = None,
        calls: list[DeltaToolCall] | None = None,
    ) -> ChatChunkChoice:
        num_calls = self.calls.num_calls(index) if self.calls is not None else 0
        return ChatChunkChoice(
            index=index,
            delta=ChatDelta(content=text or None, tool_calls=calls or None),
            logprobs=logprobs,
            finish_reason=finish_name(delta.finish_reason, num_calls) if delta else None,
            stop_reason=delta.stop_reason if delta else None,
        )

    def delta_logprobs(self, index: int, delta: TokenDelta) -> ChatLogprobs:
        return chat_logprobs(delta.logprobs, self.token_bytes)

    def final_choice(self, result: ChoiceResult) -> ChatChoice:
        message = ChatResponseMessage(content=result.text)
        num_calls = 0
        if self.calls is not None:
            message = answer_message(result.text, self.tools.call_format)
            num_calls = len(message.tool_calls or ())
        return ChatChoice(
            index=result.index,
            message=message,
            logprobs=(
                chat_logprobs(result.logprobs, self.token_bytes) if self.want_logprobs else None
            ),
            finish_reason=finish_name(result.finish_reason, num_calls),
            stop_reason=result.stop_reason,
        )
