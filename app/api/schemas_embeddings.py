"""Models of the embedding routes: OpenAI's `/v1/embeddings` and TGI's `/embed`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from app.api.schemas import LaminaRequest, ModelName, Priority, _check_prompt

EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(LaminaRequest):
    """POST /v1/embeddings. Unknown fields are kept so the ones that would change a vector
    are refused by name (unimplemented.EMBEDDINGS_NOT_IMPLEMENTED)."""

    model_config = ConfigDict(extra="allow")

    model: ModelName = None
    input: EmbeddingInput = Field(
        description="A string, a list of strings (one embedding each), a list of token ids, "
        "or a list of token id lists."
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        default=None,
        description='"float" (default): a list of numbers; "base64": little-endian float32s.',
    )
    dimensions: StrictInt | None = Field(
        default=None,
        ge=1,
        description="Keep the first `dimensions` numbers, normalised again (at most the "
        "model's hidden size).",
    )
    user: str | None = Field(default=None, description="End-user id, for logs.")
    priority: Priority = None

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        return _check_prompt(value)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str = Field(description="The unit vector, or its base64 float32s")
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage


class EmbedRequest(LaminaRequest):
    """TGI's POST /embed (text-embeddings-inference); unknown fields kept as above."""

    model_config = ConfigDict(extra="allow")

    inputs: str | list[str] = Field(description="A text or a list of texts")
    normalize: StrictBool | None = Field(
        default=None, description="Return unit vectors (default true); false: the raw pooling"
    )
    truncate: StrictBool | None = Field(
        default=None,
        description="Cut a too-long input to the longest allowed (its start); default false: a 400",
    )
    dimensions: StrictInt | None = Field(
        default=None, ge=1, description="Keep the first `dimensions` numbers."
    )

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs_shape(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        return value
