"""The generation routes: each is its facts, its dialect, and the one driver.

Adding an API is a dialect (driver.Dialect) and a route here. Every generation route
passes one gate, `admit` (`CallDep`), before its body is validated: 400 for a bad
X-Request-Timeout, 503 while loading or draining, 429 when the queue is full. The
driver weighs the parsed request on the same ticket (sequences, estimated tokens).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from app import __version__
from app.api.auth import bearer_token, key_client
from app.api.deadline import TIMEOUT_HEADER, Deadline, effective_timeout_s, parse_timeout_header
from app.api.dialect_embeddings import EmbedDialect, EmbeddingDialect
from app.api.dialect_openai import ChatDialect, CompletionDialect
from app.api.dialect_tgi import TGIDialect
from app.api.driver import Call, drive
from app.api.errors import ERROR_RESPONSES
from app.api.request_record import RequestRecord
from app.api.route_facts import RouteFacts, declare
from app.api.schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
)
from app.api.schemas_embeddings import EmbeddingRequest, EmbeddingResponse, EmbedRequest
from app.api.schemas_tgi import GenerateRequest, GenerateResponse, Info, StreamResponse
from app.api.state import ServerState, ServingDep, StateDep, serving_or_503

openai_router = APIRouter(tags=["OpenAI"], responses=ERROR_RESPONSES)
tgi_router = APIRouter(tags=["TGI"])
# Embeddings run through the same driver (admission, deadline, engine, usage, record).
embeddings_router = APIRouter(responses=ERROR_RESPONSES)


async def admit(request: Request) -> AsyncIterator[Call]:
    """The gate of the generation routes: the request's deadline starts, and it takes a
    place in admission control until its response has ended."""
    state: ServerState = request.app.state.server
    record = RequestRecord.of(request)
    header_s = parse_timeout_header(request.headers.get(TIMEOUT_HEADER))
    serving = serving_or_503(state, record)
    admission = state.admission
    client = client_of(request, bool(state.settings.api_keys))
    ticket = admission.admit(client)
    deadline = Deadline.after(effective_timeout_s(header_s, state.settings.request_timeout_s))
    try:
        yield Call(request, serving, record, ticket, deadline, state.key_priorities.get(client))
    finally:
        admission.release(ticket)


CallDep = Annotated[Call, Depends(admit)]


def client_of(request: Request, keyed: bool) -> str:
    """Who a request's work counts against for admission's fair share: its API key (a
    digest: raw keys are not kept) when keys are configured, else its address."""
    if keyed:
        return key_client(bearer_token(request.headers) or "")  # checked by ApiKeyAuth
    return "addr:" + (request.client.host if request.client else "unknown")


COMPLETIONS = RouteFacts(generates=True, event_model=CompletionChunk, ends_with_done=True)
CHAT = RouteFacts(generates=True, event_model=ChatCompletionChunk, ends_with_done=True)
TGI = RouteFacts(generates=True, tgi_errors=True)
TGI_STREAM = RouteFacts(generates=True, tgi_errors=True, event_model=StreamResponse)


@openai_router.post(
    declare("/v1/completions", COMPLETIONS),
    response_model=CompletionResponse,
    summary="Complete a prompt (streams server-sent events when `stream` is true)",
)
async def create_completion(body: CompletionRequest, call: CallDep):
    return await drive(call, CompletionDialect, body, stream=bool(body.stream))


@openai_router.post(
    declare("/v1/chat/completions", CHAT),
    response_model=ChatCompletionResponse,
    summary="Answer a conversation (streams server-sent events when `stream` is true)",
)
async def create_chat_completion(body: ChatCompletionRequest, call: CallDep):
    return await drive(call, ChatDialect, body, stream=bool(body.stream))


@tgi_router.post(
    declare("/generate", TGI),
    response_model=GenerateResponse,
    responses=ERROR_RESPONSES,
    summary="Generate text (TGI)",
)
async def generate(body: GenerateRequest, call: CallDep):
    return await drive(call, TGIDialect, body, stream=False)


@tgi_router.post(
    declare("/generate_stream", TGI_STREAM),
    response_model=StreamResponse,
    responses=ERROR_RESPONSES,
    summary="Generate text as server-sent events, one per token (TGI)",
)
async def generate_stream(body: GenerateRequest, call: CallDep):
    return await drive(call, TGIDialect, body, stream=True)


@tgi_router.post(
    declare("/", TGI_STREAM),
    response_model=list[GenerateResponse],
    responses=ERROR_RESPONSES,
    summary="TGI compatibility: /generate (as a one-item list) or /generate_stream by `stream`",
)
async def compat_generate(body: GenerateRequest, call: CallDep):
    answer = await drive(call, TGIDialect, body, stream=bool(body.stream))
    return answer if body.stream else [answer]


@tgi_router.get("/info", response_model=Info, summary="Served model and limits (TGI)")
async def info(serving: ServingDep, state: StateDep) -> Info:
    settings = state.settings
    return Info(
        model_id=serving.model.name,
        model_dtype=serving.model.dtype,
        model_device_type=serving.model.device,
        max_concurrent_requests=settings.max_num_seqs + settings.max_queued,
        max_stop_sequences=settings.max_stop_sequences,
        max_input_tokens=serving.limits.max_prompt_tokens,
        max_total_tokens=serving.limits.max_model_len,
        version=__version__,
    )


EMBEDDINGS = RouteFacts(generates=True)
TGI_EMBED = RouteFacts(generates=True, tgi_errors=True)


@embeddings_router.post(
    declare("/v1/embeddings", EMBEDDINGS),
    response_model=EmbeddingResponse,
    tags=["OpenAI"],
    summary="Embed texts or token ids: the model's final hidden states, pooled, unit length",
)
async def create_embeddings(body: EmbeddingRequest, call: CallDep):
    return await drive(call, EmbeddingDialect, body, stream=False)


@embeddings_router.post(
    declare("/embed", TGI_EMBED),
    response_model=list[list[float]],
    tags=["TGI"],
    summary="Embed texts (text-embeddings-inference): one vector per input",
)
async def embed(body: EmbedRequest, call: CallDep):
    return await drive(call, EmbedDialect, body, stream=False)
