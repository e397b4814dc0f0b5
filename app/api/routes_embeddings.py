"""The embedding routes: OpenAI's `/v1/embeddings` and TGI's `/embed`, through the one
route driver (admission, deadline, engine, usage and the request record as generation)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.dialect_embeddings import EmbedDialect, EmbeddingDialect
from app.api.driver import drive
from app.api.errors import ERROR_RESPONSES
from app.api.route_facts import RouteFacts, declare
from app.api.routes import CallDep
from app.api.schemas_embeddings import EmbeddingRequest, EmbeddingResponse, EmbedRequest

embeddings_router = APIRouter()

EMBEDDINGS = RouteFacts(generates=True)
TGI_EMBED = RouteFacts(generates=True, tgi_errors=True)


@embeddings_router.post(
    declare("/v1/embeddings", EMBEDDINGS),
    response_model=EmbeddingResponse,
    responses=ERROR_RESPONSES,
    tags=["OpenAI"],
    summary="Embed texts or token ids: the model's final hidden states, pooled, unit length",
)
async def create_embeddings(body: EmbeddingRequest, call: CallDep):
    return await drive(call, EmbeddingDialect, body, stream=False)


@embeddings_router.post(
    declare("/embed", TGI_EMBED),
    response_model=list[list[float]],
    responses=ERROR_RESPONSES,
    tags=["TGI"],
    summary="Embed texts (text-embeddings-inference): one vector per input",
)
async def embed(body: EmbedRequest, call: CallDep):
    return await drive(call, EmbedDialect, body, stream=False)
