"""The embedding dialects: OpenAI's `/v1/embeddings` and TGI's `/embed` (see driver.py).

Each input becomes one prompt-only engine request (max_tokens 0) that asks for its
final hidden states pooled (Settings.embedding_pooling, embedding_pooling.py), so
embeddings batch with generation in the same steps and take the prefix cache where the
pooling allows (last token: yes; mean: every position is computed). Here the pooled
vector is cut to `dimensions` and normalised to unit length (fp64, in Python), then
written as floats or as base64 little-endian float32s, as OpenAI does.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.api.driver import ChoiceResult, Dialect
from app.api.errors import invalid_request, server_error
from app.api.params import fit_to_context
from app.api.prompts import encode_prompt, named_prompts
from app.api.request_record import Usage
from app.api.schemas_embeddings import Embedding, EmbeddingResponse, EmbeddingUsage, EmbedRequest
from app.api.state import Serving
from app.api.unimplemented import EMBEDDINGS_NOT_IMPLEMENTED, refuse_unimplemented
from app.core import SamplingParams
from app.embedding_pooling import hidden_size, resolve_pooling


def unit_vector(vector: Sequence[float], dimensions: int | None) -> list[float]:
    """The first `dimensions` numbers of `vector` (all: None), scaled to length 1."""
    kept = list(vector[:dimensions] if dimensions is not None else vector)
    norm = math.sqrt(math.fsum(x * x for x in kept))
    return [x / norm for x in kept] if norm > 0 else kept


def base64_float32(vector: Sequence[float]) -> str:
    """OpenAI's `encoding_format: "base64"`: little-endian float32s, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def check_dimensions(dimensions: int | None, serving: Serving, param: str) -> None:
    size = hidden_size(Path(serving.model.path))
    if dimensions is not None and size is not None and dimensions > size:
        raise invalid_request(
            f"`{param}` must be at most the model's hidden size {size} (got {dimensions})",
            param=param,
        )


class EmbeddingDialect(Dialect):
    """POST /v1/embeddings: one engine request per input, never streamed."""

    id_prefix = "embd"
    input_param = "input"  # the body's field holding the inputs

    def __init__(self, body: Any, serving: Serving, request_id: str, stream: bool):
        refuse_unimplemented(body.model_extra, EMBEDDINGS_NOT_IMPLEMENTED)
        check_dimensions(body.dimensions, serving, "dimensions")
        limits = serving.limits
        max_inputs = limits.settings.max_prompts_per_request
        input_param = self.input_param
        parts = named_prompts(getattr(body, input_param), input_param, max_inputs, "inputs")
        prompts = []
        for param, text_or_ids in parts:
            if text_or_ids == "":
                raise invalid_request(f"`{param}` is an empty string", param=param)
            prompt = self.fit(encode_prompt(text_or_ids, param, serving.tokenizer), body, serving)
            fit_to_context(len(prompt), 0, limits, prompt_param=param)
            prompts.append(prompt)
        pooling = resolve_pooling(limits.settings.embedding_pooling, Path(serving.model.path))
        params = SamplingParams(max_tokens=0, temperature=0.0, pooling=pooling)
        super().__init__(request_id, prompts, [params] * len(prompts), 1, False)
        self.body = body  # EmbeddingRequest or EmbedRequest
        self.model = serving.model.name

    @staticmethod
    def fit(prompt: list[int], body: Any, serving: Serving) -> list[int]:
        """The prompt as it is embedded (TGI's `truncate` cuts it)."""
        return prompt

    def vectors(self, results: list[ChoiceResult], normalize: bool = True) -> list[list[float]]:
        dimensions = self.body.dimensions
        vectors = []
        for result in results:
            if result.embedding is None:  # the engine always sends it; never expected
                raise server_error("the engine returned no embedding", "generation_error")
            pooled = result.embedding
            kept = list(pooled[:dimensions])
            vectors.append(unit_vector(kept, None) if normalize else kept)
        return vectors

    def render_final(self, results: list[ChoiceResult], usage: Usage) -> EmbeddingResponse:
        as_base64 = self.body.encoding_format == "base64"
        data = [
            Embedding(embedding=base64_float32(v) if as_base64 else v, index=i)
            for i, v in enumerate(self.vectors(results))
        ]
        return EmbeddingResponse(
            id=self.response_id,
            created=self.created,
            model=self.model,
            data=data,
            usage=EmbeddingUsage(
                prompt_tokens=usage.prompt_tokens, total_tokens=usage.prompt_tokens
            ),
        )


class EmbedDialect(EmbeddingDialect):
    """TGI's POST /embed: a list of vectors, unit length unless `normalize` is false."""

    id_prefix = "embed"
    input_param = "inputs"

    @staticmethod
    def fit(prompt: list[int], body: EmbedRequest, serving: Serving) -> list[int]:
        if body.truncate:
            return prompt[: serving.limits.max_prompt_tokens]
        return prompt

    def render_final(self, results: list[ChoiceResult], usage: Usage) -> list[list[float]]:
        return self.vectors(results, normalize=self.body.normalize is not False)
