"""Models of the small routes: /v1/models, /tokenize, /detokenize, /health, /ready."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

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
    add_special_tokens: bool = Field(
        default=True, description="With `prompt`: add the tokenizer's special tokens (BOS)"
    )
    add_generation_prompt: bool = Field(
        default=True, description="With `messages`: end with the assistant turn's header"
    )


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(LaminaRequest):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int] = Field(description="Token ids to turn back into text")


class DetokenizeResponse(BaseModel):
    prompt: str


class StatusResponse(BaseModel):
    status: str = Field(description="ok (health) or ready (readiness)")
