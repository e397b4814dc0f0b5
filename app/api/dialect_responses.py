"""The Responses API dialect: POST /v1/responses on the one route driver (driver.py).

parse: `previous_response_id`'s stored conversation, then `instructions` (a system
message) and `input` -> chat messages -> the chat template's prompt (with the function
tools, as /v1/chat/completions renders them); `max_output_tokens`, `temperature`,
`top_p` -> SamplingParams; `text.format` or the tools' grammar -> the constraint.

Streamed, the answer is OpenAI's typed events (`event: <type>` + `data:`, numbered by
`sequence_number`): response.created, response.in_progress, the items' events
(response_output.py), then response.completed, or response.incomplete (max_output_tokens
reached), or response.failed (an error; a cancel ends it the same way with status
"cancelled"). No `data: [DONE]`.

With `store` (the default) the response is kept in the replica's ResponseStore from its
start: GET and cancel see it while it runs, a follow-up continues it once it is done.
The response id is random (`resp_` + 32 hex digits), not the request id: it is a URL
path segment and must stay unique when a client repeats its X-Request-Id.
"""

from __future__ import annotations

import secrets
from typing import Any

from app.api.driver import ChoiceResult, Dialect, Run
from app.api.errors import APIError, invalid_request, not_found
from app.api.params import at_most, fit_to_context, nucleus_top_p, sampling_temperature
from app.api.prompts import encode_chat
from app.api.request_record import Usage
from app.api.response_output import EventWriter, OutputItems
from app.api.response_store import ResponseStore, StoredResponse
from app.api.responses_fields import conversation_fields
from app.api.responses_input import (
    check_metadata,
    input_messages,
    output_messages,
    response_tools,
    text_format_constraint,
)
from app.api.schemas import ChatMessage
from app.api.schemas_responses import (
    IncompleteDetails,
    InputTokensDetails,
    ResponseError,
    ResponseLifecycleEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from app.api.state import Serving
from app.api.unimplemented import RESPONSES_NOT_IMPLEMENTED, refuse_unimplemented
from app.core import FinishReason, SamplingParams, TokenDelta


class ResponseCancelled(APIError):
    """What stops a run that POST /v1/responses/{id}/cancel cancelled."""

    def __init__(self) -> None:
        super().__init__(
            499, "the response was cancelled", type="invalid_request_error", code="cancelled"
        )


def response_not_found(response_id: str, param: str | None = None) -> APIError:
    return not_found(f"no stored response has the id '{response_id}'", param, "response_not_found")


def new_response_id() -> str:
    return "resp_" + secrets.token_hex(16)


def stored_conversation(store: ResponseStore, previous_id: str | None) -> list[ChatMessage]:
    """The conversation `previous_response_id` continues ([] without one)."""
    if previous_id is None:
        return []
    stored = store.get(previous_id)
    if stored is None:
        raise response_not_found(previous_id, "previous_response_id")
    if stored.running:
        raise invalid_request(
            f"the response '{previous_id}' is still in progress; continue it once it is done",
            "previous_response_id",
        )
    return list(stored.messages)


class ResponsesDialect(Dialect):
    id_prefix = "resp"

    def __init__(self, body: ResponsesRequest, serving: Serving, request_id: str, stream: bool):
        refuse_unimplemented(body.model_extra, RESPONSES_NOT_IMPLEMENTED)
        limits, settings = serving.limits, serving.limits.settings
        self.metadata = check_metadata(body.metadata)
        tools = response_tools(
            body.tools, body.tool_choice, body.parallel_tool_calls,
            serving.tokenizer.tool_call_format,
        )  # fmt: skip
        stored = stored_conversation(serving.responses, body.previous_response_id)
        inputs, input_sources = input_messages(body.input)
        self.conversation = stored + inputs
        system = (
            [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
        )
        fields = conversation_fields(system, stored, input_sources)
        prompt = encode_chat(
            system + self.conversation, serving.tokenizer, True, tools.prompt_tools, fields
        )
        max_tokens = at_most(body.max_output_tokens, settings.max_tokens_limit, "max_output_tokens")
        max_tokens = fit_to_context(
            len(prompt), max_tokens, limits,
            prompt_param="input", max_tokens_param="max_output_tokens",
        )  # fmt: skip
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=sampling_temperature(body.temperature),
            top_p=nucleus_top_p(body.top_p),
        )
        super().__init__(request_id, [prompt], [params], 1, stream)
        self.constraint = tools.joined_with(text_format_constraint(body.text))
        self.response_id = new_response_id()
        self.body = body
        self.model = serving.model.name
        # A store of no entries (LAMINA_RESPONSES_STORE_MAX_ENTRIES=0) keeps nothing: the
        # response then says `store: false`.
        keeps = body.store is not False and serving.responses.max_entries > 0
        self.store = serving.responses if keeps else None
        self.tool_choice = tools.choice
        self.tools_shown = [tool["function"] for tool in tools.tools]
        self.writer = EventWriter(keep=self.stream)
        # With tools, the text goes through the served model's call parser.
        parser = tools.call_format.new_parser() if tools.parses_calls else None
        self.items = OutputItems(self.writer, parser)
        self.run: Run | None = None
        self.stored: StoredResponse | None = None
        self.status = "in_progress"
        self.end_status = "completed"  # or "incomplete", once the last delta says so

    # --- the response object and the store ----------------------------------------------

    def snapshot(self, usage: Usage | None = None, error: str | None = None) -> ResponseObject:
        body = self.body
        usage_out = None
        if usage is not None:
            usage_out = ResponseUsage(
                input_tokens=usage.prompt_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens),
                output_tokens=usage.completion_tokens,
                total_tokens=usage.prompt_tokens + usage.completion_tokens,
            )
        incomplete = self.status == "incomplete"
        tool_choice: Any = self.tool_choice
        if self.tool_choice == "named":
            tool_choice = body.tool_choice
        return ResponseObject(
            id=self.response_id,
            created_at=self.created,
            status=self.status,  # type: ignore[arg-type]
            model=self.model,
            output=[item.model_copy(deep=True) for item in self.items.items],
            usage=usage_out,
            error=ResponseError(message=error) if error is not None else None,
            incomplete_details=IncompleteDetails(reason="max_output_tokens")
            if incomplete
            else None,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            metadata=self.metadata,
            parallel_tool_calls=body.parallel_tool_calls is not False,
            previous_response_id=body.previous_response_id,
            store=self.store is not None,
            temperature=self.params[0].temperature,
            top_p=self.params[0].top_p,
            text={"format": (body.text or {}).get("format") or {"type": "text"}},
            tool_choice=tool_choice,
            tools=[{"type": "function", **tool} for tool in self.tools_shown],
            user=body.user,
        )

    def _finish(self, status: str, usage: Usage | None, error: str | None = None) -> ResponseObject:
        """The response's end: its final snapshot, stored (with the conversation a
        follow-up continues) unless it was deleted or evicted meanwhile."""
        self.status = status
        if status in ("cancelled", "failed"):
            self.items.cut()
        response = self.snapshot(usage, error)
        stored = self.stored
        if stored is not None and self.store is not None:
            stored.response = response
            stored.cancel = None
            stored.messages = self.conversation + output_messages(response.output)
            if self.store.get(self.response_id) is stored:
                self.store.put(stored)
        return response

    def on_start(self, run: Run) -> None:
        self.run = run
        if self.store is None:
            return
        self.stored = StoredResponse(self.snapshot(), list(self.conversation), self.cancel)
        self.store.put(self.stored)

    def cancel(self) -> None:
        """Stop the run now (POST /v1/responses/{id}/cancel); it ends "cancelled"."""
        if self.run is not None:
            self.run.stop(ResponseCancelled())
        if self.status == "in_progress":
            self._finish("cancelled", None)

    def on_end(self) -> None:
        # Ended without its last delta and no failure rendered: the client left.
        if self.status == "in_progress" and self.run is not None and not self.run.delivered:
            self._finish("failed", self.run.usage, "the client left before the response ended")

    def _end_status(self, finish_reason: FinishReason | None) -> str:
        return "incomplete" if finish_reason is FinishReason.LENGTH else "completed"

    # --- not streaming ---------------------------------------------------------------------

    def render_final(self, results: list[ChoiceResult], usage: Usage) -> Any:
        (result,) = results
        status = self._end_status(result.finish_reason)
        self.items.feed(result.text, finished=True, status=status)
        return self._finish(status, usage)

    def _failed(self, error: APIError) -> ResponseObject:
        """The response's end by `error`: "cancelled" after a cancel, else "failed"."""
        usage = self.run.usage if self.run else None
        if isinstance(error, ResponseCancelled):
            return self._finish("cancelled", usage)
        return self._finish("failed", usage, error.message)

    def failed_answer(self, error: APIError) -> Any:
        response = self._failed(error)
        if response.status != "cancelled":
            raise error
        return response

    # --- streaming ---------------------------------------------------------------------------

    def _lifecycle(self, event_type: str, response: ResponseObject | None = None) -> None:
        """A `response.*` event carrying `response` (default: the response as it is now)."""
        self.writer.emit(ResponseLifecycleEvent, event_type, response=response or self.snapshot())

    def opening(self) -> list[bytes]:
        self._lifecycle("response.created")
        self._lifecycle("response.in_progress")
        return self.writer.take()

    def render_delta(self, choice_index: int, delta: TokenDelta) -> list[bytes]:
        if delta.finished:
            self.end_status = self._end_status(delta.finish_reason)
        self.items.feed(delta.text, delta.finished, self.end_status)
        return self.writer.take()

    def closing(self, usage: Usage) -> list[bytes]:
        response = self._finish(self.end_status, usage)
        event = "response.incomplete" if response.status == "incomplete" else "response.completed"
        self._lifecycle(event, response)
        return self.writer.take()

    def stream_failure(self, error: APIError, tgi: bool) -> bytes:
        self._lifecycle("response.failed", self._failed(error))
        return b"".join(self.writer.take())
