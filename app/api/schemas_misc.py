"""Models of the small routes: /v1/models, /tokenize, /detokenize, /health, /ready, /server_info."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt

from app.api.schemas import ChatMessage, LaminaRequest


class ModelCard(BaseModel):
    id: str = Field(description="Pass this as `model` in requests")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lamina"
    max_model_len: int = Field(description="Context window: prompt + output tokens")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(LaminaRequest):
    """POST /tokenize: give exactly one of `prompt` or `messages`."""

    model: str | None = None
    prompt: str | None = Field(default=None, description="Text to tokenize")
    messages: list[ChatMessage] | None = Field(
        default=None, description="Chat messages, rendered with the model's chat template"
    )
    add_special_tokens: StrictBool = Field(
        default=True, description="With `prompt`: add the tokenizer's special tokens (BOS)"
    )
    add_generation_prompt: StrictBool = Field(
        default=True, description="With `messages`: end with the assistant turn's header"
    )


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(LaminaRequest):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[StrictInt] = Field(description="Token ids to turn back into text")


class DetokenizeResponse(BaseModel):
    prompt: str


class StatusResponse(BaseModel):
    status: str = Field(description="ok (health) or ready (readiness)")


class ServerInfo(BaseModel):
    """GET /server_info: what a router in front of lamina registers a replica with.

    Field names are SGLang's (its model gateway reads `served_model_name` as the model a
    replica serves); the `lamina_*` ones are lamina's own settings."""

    served_model_name: str = Field(description="The model's id (GET /v1/models)")
    version: str = Field(description="lamina's version")
    max_model_len: int = Field(description="Context window: prompt + output tokens")
    max_running_requests: int = Field(description="Sequences running at once (MAX_NUM_SEQS)")
    max_prefill_tokens: int = Field(
        description="Tokens one engine step computes (MAX_NUM_BATCHED_TOKENS)"
    )
    lamina_enable_prefix_caching: bool = Field(
        description="Whether prompt prefixes seen before reuse their KV cache"
    )


class ModelInfoResponse(BaseModel):
    """GET /model_info: the served model as its config.json describes it (SGLang's names)."""

    served_model_name: str
    is_generation: bool = Field(default=True, description="A text-generation model")
    model_type: str | None = Field(description="config.json's model_type, e.g. llama")
    architectures: list[str] = Field(description="config.json's architectures")
