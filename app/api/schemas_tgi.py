"""Models of the TGI-native routes: /generate, /generate_stream, /info (TGI field names)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, field_validator

from app.api.schemas import (
    INT64_MAX,
    PRIORITY_DESCRIPTION,
    UNSET_MAX_TOKENS,
    LaminaRequest,
    Priority,
)

TGIFinishReason = Literal["length", "eos_token", "stop_sequence"]


class TGIGrammar(LaminaRequest):
    """TGI's `parameters.grammar`: what the generated text must match."""

    type: Literal["json", "json_object", "regex", "json_schema"] = Field(
        description="json / json_object: `value` is a JSON schema (object or JSON string); "
        "regex: a regular expression; json_schema: `{name, schema}`"
    )
    value: Any = Field(description="The schema or the pattern")


class GenerateParameters(LaminaRequest):
    """TGI's `parameters`; null means the default. Sampling is on when `do_sample` is true
    or any of temperature, top_k, top_p is set; otherwise decoding is greedy."""

    max_new_tokens: StrictInt | None = Field(
        default=None, ge=1, description="Most tokens to generate. " + UNSET_MAX_TOKENS
    )
    do_sample: StrictBool | None = Field(
        default=None, description="Sample instead of greedy decoding"
    )
    temperature: StrictFloat | None = Field(default=None, gt=0, description="Sampling temperature")
    top_k: StrictInt | None = Field(default=None, gt=0, description="Keep the k most likely tokens")
    top_p: StrictFloat | None = Field(default=None, gt=0, lt=1, description="Nucleus sampling")
    repetition_penalty: StrictFloat | None = Field(
        default=None, gt=0, description="CTRL repetition penalty; 1 is off"
    )
    frequency_penalty: StrictFloat | None = Field(
        default=None, ge=-2, le=2, description="OpenAI-style frequency penalty"
    )
    seed: StrictInt | None = Field(default=None, ge=0, le=INT64_MAX, description="Sampling seed")
    stop: list[str] | None = Field(default=None, description="Stop sequences")
    details: StrictBool | None = Field(default=None, description="Return token details")
    decoder_input_details: StrictBool | None = Field(
        default=None,
        description="With `details`: the input's tokens and their logprobs in "
        "`details.prefill` (not when streaming)",
    )
    return_full_text: StrictBool | None = Field(default=None, description="Prepend the input")
    top_n_tokens: StrictInt | None = Field(
        default=None, ge=0, description="Also return the n most likely tokens at each step"
    )
    truncate: StrictInt | None = Field(
        default=None, ge=1, description="Keep only the last `truncate` input tokens"
    )
    best_of: StrictInt | None = Field(default=None, ge=1, description="Not supported above 1")
    typical_p: StrictFloat | None = Field(default=None, description="Not supported")
    watermark: StrictBool | None = Field(default=None, description="Not supported (must be false)")
    grammar: TGIGrammar | None = Field(
        default=None, description="Constrain the output to a JSON schema or a regex"
    )
    adapter_id: str | None = Field(default=None, description="Not supported")
    priority: Priority = Field(
        default=None, description="lamina's extension: " + PRIORITY_DESCRIPTION
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, value: Any) -> Any:
        if isinstance(value, str):  # lenient: TGI wants a list, curl users send a string
            return [value]
        return value


class GenerateRequest(LaminaRequest):
    """POST /generate and /generate_stream (and POST /, which switches on `stream`)."""

    inputs: str = Field(description="The prompt text")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: StrictBool | None = Field(default=None, description="Only read by POST /")


class TGIToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool


class GenerateDetails(BaseModel):
    finish_reason: TGIFinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[TGIToken] = Field(default_factory=list)
    tokens: list[TGIToken]
    top_tokens: list[list[TGIToken]] | None = Field(
        default=None, exclude_if=lambda value: value is None
    )


class GenerateResponse(BaseModel):
    generated_text: str
    details: GenerateDetails | None = Field(default=None, exclude_if=lambda v: v is None)


class StreamDetails(BaseModel):
    finish_reason: TGIFinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(BaseModel):
    """One `data:` event of /generate_stream: one token; the last also has the text."""

    index: int
    token: TGIToken
    top_tokens: list[TGIToken] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class Info(BaseModel):
    model_id: str
    model_sha: str | None = None
    model_dtype: str | None = None
    model_device_type: str | None = None
    model_pipeline_tag: str = "text-generation"
    max_concurrent_requests: int
    max_best_of: int = 1
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_client_batch_size: int = 1
    router: str = "lamina"
    version: str
