"""Request, response and event models of the Responses API (POST /v1/responses).

Shaped as the `openai` SDK's types (openai/types/responses): the SDK parses lamina's
answers and typed stream events itself (tests/api/test_responses_*.py). `input` items,
`tools` and `text.format` arrive as plain JSON and are checked by responses_input.py,
which names the exact field of the first broken rule (`input[2].content[0].type`);
pydantic's messages for a union of a dozen item shapes would not.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictBool, StrictFloat, StrictInt

from app.api.schemas import (
    UNSET_MAX_TOKENS,
    LaminaRequest,
    ModelName,
    ParallelToolCalls,
    Priority,
    Temperature,
)

ResponseStatus = Literal["completed", "failed", "in_progress", "cancelled", "incomplete"]


class ResponsesRequest(LaminaRequest):
    """POST /v1/responses. Unknown fields are kept so the ones lamina does not implement
    are refused by name (unimplemented.RESPONSES_NOT_IMPLEMENTED)."""

    model_config = ConfigDict(extra="allow")

    model: ModelName = None
    input: str | list[dict[str, Any]] | None = Field(
        default=None,
        description="A string (one user message) or a list of input items: messages "
        "(`role`, `content` as text or `input_text`/`output_text` parts), `function_call` "
        "and `function_call_output`.",
    )
    instructions: str | None = Field(
        default=None, description="A system message before the input (not carried over)."
    )
    max_output_tokens: StrictInt | None = Field(
        default=None, ge=1, description="Most tokens to generate. " + UNSET_MAX_TOKENS
    )
    temperature: Temperature = None
    top_p: StrictFloat | None = Field(default=None, gt=0, le=1, description="Nucleus sampling.")
    stream: StrictBool | None = Field(
        default=None, description="Stream typed server-sent events (`event:` + `data:`)."
    )
    metadata: dict[str, str] | None = Field(
        default=None, description="Up to 16 key/value strings, returned with the response."
    )
    user: str | None = Field(default=None, description="End-user id, for the access line.")
    store: StrictBool | None = Field(
        default=None,
        description="Keep the response for GET, cancel and `previous_response_id` "
        "(in this replica's memory, bounded). Default true.",
    )
    previous_response_id: str | None = Field(
        default=None, description="Continue a stored response: its input and output come first."
    )
    text: dict[str, Any] | None = Field(
        default=None,
        description='`{"format": {"type": "text" | "json_object" | "json_schema", ...}}`.',
    )
    tools: list[dict[str, Any]] | None = Field(
        default=None, description='Function tools: `{"type": "function", "name", "parameters"}`.'
    )
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description='"none", "auto", "required" or {"type": "function", "name"}.'
    )
    parallel_tool_calls: ParallelToolCalls = None
    priority: Priority = None


# --- the response object ----------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str = Field(description="The id a `function_call_output` item answers.")
    name: str
    arguments: str = Field(description="JSON text, as the model wrote it.")
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = OutputMessage | FunctionCallItem


class InputTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Input tokens served from the prefix cache.")


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: Literal["server_error"] = "server_error"
    message: str


class ResponseObject(BaseModel):
    """A response, as create, retrieve and cancel return it and stream events carry it."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    user: str | None = None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


# --- stream events (each is `event: <type>` + `data: <json>`) -----------------------------


class StreamEvent(BaseModel):
    type: str
    sequence_number: int


class ResponseLifecycleEvent(StreamEvent):
    """response.created / in_progress / completed / incomplete / failed."""

    response: ResponseObject


class OutputItemEvent(StreamEvent):
    """response.output_item.added / done."""

    output_index: int
    item: OutputItem


class ItemEvent(StreamEvent):
    """An event about one output item's content."""

    item_id: str
    output_index: int


class ContentPartEvent(ItemEvent):
    """response.content_part.added / done."""

    content_index: int
    part: OutputText


class TextDeltaEvent(ItemEvent):
    """response.output_text.delta."""

    content_index: int
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class TextDoneEvent(ItemEvent):
    """response.output_text.done."""

    content_index: int
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ArgumentsDeltaEvent(ItemEvent):
    """response.function_call_arguments.delta."""

    delta: str


class ArgumentsDoneEvent(ItemEvent):
    """response.function_call_arguments.done."""

    arguments: str


class ResponseStreamEvent(
    RootModel[
        ResponseLifecycleEvent
        | OutputItemEvent
        | ContentPartEvent
        | TextDeltaEvent
        | TextDoneEvent
        | ArgumentsDeltaEvent
        | ArgumentsDoneEvent
    ]
):
    """One event of a streamed response (its `type` is also the SSE `event:` name)."""
