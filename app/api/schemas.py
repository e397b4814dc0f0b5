"""Request and response models of the OpenAI-compatible routes (they feed /docs).

Requests ignore unknown fields (logged at debug level) so clients that send vendor
extensions keep working. Static rules (ranges, types) live here; rules that depend on
the settings or the tokenizer (max_n, vocabulary, context window) live in params.py
and prompts.py. Every optional field accepts `null` as "use the default".
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

logger = logging.getLogger("lamina.api")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# What an unset max_tokens becomes (params.fit_to_context).
UNSET_MAX_TOKENS = (
    "Unset: LAMINA_DEFAULT_MAX_TOKENS (1024 by default), at most what the context window leaves."
)
PRIORITY_DESCRIPTION = (
    "Scheduling priority (vLLM's): lower is served first. Default: the API key's priority "
    "(LAMINA_API_KEYS), else 0; a request may not ask for less than its key's."
)

# Fields several request bodies share (OpenAI's, the Responses API's, embeddings'), with
# their /docs descriptions, written once.
ModelName = Annotated[
    str | None, Field(description="The served model's id (GET /v1/models); may be omitted.")
]
Priority = Annotated[
    StrictInt | None, Field(ge=INT64_MIN, le=INT64_MAX, description=PRIORITY_DESCRIPTION)
]
Temperature = Annotated[
    StrictFloat | None,
    Field(ge=0, le=2, description="Sampling temperature; 0 is greedy. Default 1."),
]
ParallelToolCalls = Annotated[
    StrictBool | None, Field(description="Allow several calls in one answer. Default true.")
]


class LaminaRequest(BaseModel):
    """Base of every request body: unknown fields are ignored, not rejected."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(str(k) for k in data if k not in cls.model_fields)
            if unknown:
                logger.debug("%s: ignoring unknown fields %s", cls.__name__, unknown)
        return data


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise ValueError("must be a string or a list of strings")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_prompt(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return value
        if all(_is_token_id(item) for item in value):
            return value
        if all(isinstance(item, list) and all(_is_token_id(t) for t in item) for item in value):
            return value
    if isinstance(value, list) and not value:
        raise ValueError("must not be empty")
    raise ValueError(
        "must be a string, a list of strings, a list of token ids or a list of token id lists"
    )


# --- shared sampling fields ------------------------------------------------------------


class StreamOptions(LaminaRequest):
    """Unknown options are kept so the ones lamina does not implement are refused by name
    (unimplemented.STREAM_OPTIONS_NOT_IMPLEMENTED)."""

    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = Field(
        default=None, description="Send a last chunk with token usage before `data: [DONE]`."
    )


class SamplingFields(LaminaRequest):
    """Sampling and stopping fields shared by /v1/completions and /v1/chat/completions.

    Unknown fields are kept (`model_extra`) so that the ones lamina does not implement
    are refused by name (unimplemented.py) instead of dropped."""

    model_config = ConfigDict(extra="allow")

    model: ModelName = None
    max_tokens: StrictInt | None = Field(
        default=None,
        ge=1,
        description="Most tokens to generate. " + UNSET_MAX_TOKENS,
    )
    max_completion_tokens: StrictInt | None = Field(
        default=None, ge=1, description="Alias of max_tokens (wins when both are set)."
    )
    temperature: Temperature = None
    top_p: StrictFloat | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Nucleus sampling: keep the smallest set of "
        "tokens whose probability adds up to top_p. Default 1 (off).",
    )
    top_k: StrictInt | None = Field(
        default=None, ge=-1, description="Keep only the k most likely tokens; 0 or -1: off."
    )
    min_p: StrictFloat | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Drop tokens less likely than min_p times the top token. Default 0 (off).",
    )
    repetition_penalty: StrictFloat | None = Field(
        default=None,
        gt=0,
        le=10,
        description="Divide logits of tokens already in prompt or output (CTRL). 1: off.",
    )
    presence_penalty: StrictFloat | None = Field(
        default=None, ge=-2, le=2, description="Penalty on tokens already generated, once each."
    )
    frequency_penalty: StrictFloat | None = Field(
        default=None, ge=-2, le=2, description="Penalty on tokens already generated, per use."
    )
    seed: StrictInt | None = Field(
        default=None,
        ge=INT64_MIN,
        le=INT64_MAX,
        description="Seed for sampling: the same seed and request give the same output.",
    )
    stop: str | list[str] | None = Field(
        default=None, description="Stop string(s); the output ends before the first match."
    )
    stop_token_ids: list[StrictInt] | None = Field(
        default=None, description="Token ids that end the output (besides EOS)."
    )
    logit_bias: dict[str, float] | None = Field(
        default=None,
        description="Token id (as a string) -> bias in [-100, 100] added to its logit, "
        'e.g. {"50256": -100}.',
    )
    ignore_eos: StrictBool | None = Field(
        default=None, description="Keep generating after EOS (benchmarks)."
    )
    min_tokens: StrictInt | None = Field(
        default=None, ge=0, description="Generate at least this many tokens before EOS or stops."
    )
    n: StrictInt | None = Field(
        default=None, ge=1, description="Number of choices; they share the prompt's KV cache."
    )
    stream: StrictBool | None = Field(default=None, description="Stream the answer as SSE events.")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options.")
    user: str | None = Field(
        default=None,
        description="End-user id, for logs: the request's access line carries its first "
        "128 characters as `user` (never a metric label).",
    )
    include_stop_str_in_output: StrictBool | None = Field(
        default=None, description="Keep the matched stop string at the end of the text."
    )
    skip_special_tokens: StrictBool | None = Field(
        default=None, description="Leave special tokens out of the text. Default true."
    )
    prompt_logprobs: StrictInt | None = Field(
        default=None,
        ge=0,
        description="vLLM's extra: the log-probability and rank of every prompt token "
        "(but the first) and of its `prompt_logprobs` most likely alternatives.",
    )
    priority: Priority = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, value: Any) -> Any:
        return _check_stop(value)


# --- /v1/completions --------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings (one completion each), a list of token ids, "
        "or a list of token id lists."
    )
    max_tokens: StrictInt | None = Field(
        default=None,
        ge=0,
        description="Most tokens to generate; 0: none (with `echo` and `logprobs`: the "
        "prompt's log-probabilities only). " + UNSET_MAX_TOKENS,
    )
    max_completion_tokens: StrictInt | None = Field(
        default=None, ge=0, description="Alias of max_tokens (wins when both are set)."
    )
    echo: StrictBool | None = Field(default=None, description="Prepend the prompt to the text.")
    logprobs: StrictInt | None = Field(
        default=None,
        ge=0,
        description="Return the log-probability of each token and of the `logprobs` most "
        "likely alternatives; with `echo`, of the prompt's tokens too (the first: null).",
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        return _check_prompt(value)


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens served from the prefix cache")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


FinishReasonName = Literal["stop", "length", "tool_calls"]


class PromptTokenLogprob(BaseModel):
    """vLLM's entry for one token at one prompt position."""

    logprob: float
    rank: int = Field(description="1 + how many tokens the model found more likely")
    decoded_token: str


# One per prompt token (null for the first): token id (as a string) -> its entry
PromptLogprobs = list[dict[str, PromptTokenLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = Field(
        default=None, exclude_if=lambda value: value is None
    )
    finish_reason: FinishReasonName | None = None
    stop_reason: int | str | None = Field(
        default=None, description="The stop string or token id that ended the text, if any."
    )


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = Field(default=None, exclude_if=lambda value: value is None)


# --- /v1/chat/completions -----------------------------------------------------------------


class ContentPart(LaminaRequest):
    type: str = Field(description='Only "text" is supported.')
    text: str | None = None


class CalledFunction(LaminaRequest):
    name: str = Field(description="The function the assistant called.")
    arguments: str = Field(description="Its arguments: a JSON object, as text.")


class MessageToolCall(LaminaRequest):
    """A tool call the assistant made earlier in the conversation."""

    id: str = Field(description="The call's id; the `tool` message answering it repeats it.")
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(LaminaRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(
        default=None, description="Text, or a list of text parts."
    )
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = Field(
        default=None, description="An assistant message's tool calls."
    )
    tool_call_id: str | None = Field(
        default=None, description="A `tool` message: the id of the call it answers."
    )

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(part, dict) for part in value):
            return value
        raise ValueError('must be a string or a list of parts like {"type": "text", "text": ...}')


class FunctionDefinition(LaminaRequest):
    name: str = Field(description="Letters, digits, `_` and `-`, at most 64 characters.")
    description: str | None = Field(default=None, description="What the function does.")
    parameters: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of its arguments (an object); none: no arguments."
    )
    strict: StrictBool | None = Field(
        default=None, description="Accepted either way: the grammar always enforces the schema."
    )


class ToolDefinition(LaminaRequest):
    type: Literal["function"] = Field(description='Only "function" tools exist.')
    function: FunctionDefinition


class NamedFunction(LaminaRequest):
    name: str


class NamedToolChoice(LaminaRequest):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions. The prompt is the model's chat template over `messages`."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    logprobs: StrictBool | None = Field(
        default=None, description="Return the log-probability of each output token."
    )
    top_logprobs: StrictInt | None = Field(
        default=None, ge=0, description="With logprobs: also the k most likely alternatives."
    )
    add_generation_prompt: StrictBool | None = Field(
        default=None, description="End the prompt with the assistant turn's header. Default true."
    )
    tools: list[ToolDefinition] | None = Field(
        default=None, description="Functions the model may call (README: Tool calling)."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None,
        description='"auto" (default with tools): text or calls; "required": calls only; '
        '{"type": "function", "function": {"name": ...}}: a call to that function; "none".',
    )
    parallel_tool_calls: ParallelToolCalls = None


class ResponseFunction(BaseModel):
    name: str
    arguments: str = Field(description="JSON text, as the model wrote it.")


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunction


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = Field(
        default=None, exclude_if=lambda value: value is None
    )


class DeltaFunction(BaseModel):
    name: str | None = Field(default=None, exclude_if=lambda v: v is None)
    arguments: str = ""


class DeltaToolCall(BaseModel):
    """A call's part in a chunk: its index, id, type and name first, then arguments."""

    index: int
    id: str | None = Field(default=None, exclude_if=lambda v: v is None)
    type: Literal["function"] | None = Field(default=None, exclude_if=lambda v: v is None)
    function: DeltaFunction


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=lambda v: v is None)
    content: str | None = Field(default=None, exclude_if=lambda v: v is None)
    tool_calls: list[DeltaToolCall] | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None
    stop_reason: int | str | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = Field(default=None, exclude_if=lambda v: v is None)


class CompletionChunkChoice(CompletionChoice):
    stop_reason: int | str | None = Field(default=None, exclude_if=lambda v: v is None)


class CompletionChunk(BaseModel):
    """One `data:` event of a streamed completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: UsageInfo | None = Field(default=None, exclude_if=lambda v: v is None)


UsageInfo.model_rebuild()
