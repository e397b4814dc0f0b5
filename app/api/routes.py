"""The generation routes: each is its facts, its dialect, and the one driver.

Adding an API is a dialect (driver.Dialect) and a route here. Every generation route
takes an admission ticket (`TicketDep`: 429 before the body is validated) and the
served model (`ServingDep`: 503 while loading or draining).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from app import __version__
from app.api.admission import TicketDep
from app.api.deps import ServingDep, StateDep
from app.api.dialect_openai import ChatDialect, CompletionDialect
from app.api.dialect_tgi import TGIDialect
from app.api.driver import drive
from app.api.errors import ERROR_RESPONSES
from app.api.route_facts import RouteFacts, declare
from app.api.schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
)
from app.api.schemas_tgi import GenerateRequest, GenerateResponse, Info, StreamResponse

openai_router = APIRouter(tags=["OpenAI"])
tgi_router = APIRouter(tags=["TGI"])

COMPLETIONS = RouteFacts(generates=True, event_model=CompletionChunk, ends_with_done=True)
CHAT = RouteFacts(generates=True, event_model=ChatCompletionChunk, ends_with_done=True)
TGI = RouteFacts(generates=True, tgi_errors=True)
TGI_STREAM = RouteFacts(generates=True, tgi_errors=True, event_model=StreamResponse)


@openai_router.post(
    declare("/v1/completions", COMPLETIONS),
    response_model=CompletionResponse,
    responses=ERROR_RESPONSES,
    summary="Complete a prompt (streams server-sent events when `stream` is true)",
)
async def create_completion(
    body: CompletionRequest, request: Request, ticket: TicketDep, serving: ServingDep
):
    return await drive(CompletionDialect.parse(body, serving), request, serving, ticket)


@openai_router.post(
    declare("/v1/chat/completions", CHAT),
    response_model=ChatCompletionResponse,
    responses=ERROR_RESPONSES,
    summary="Answer a conversation (streams server-sent events when `stream` is true)",
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, ticket: TicketDep, serving: ServingDep
):
    return await drive(ChatDialect.parse(body, serving), request, serving, ticket)


@tgi_router.post(
    declare("/generate", TGI),
    response_model=GenerateResponse,
    responses=ERROR_RESPONSES,
    summary="Generate text (TGI)",
)
async def generate(body: GenerateRequest, request: Request, ticket: TicketDep, serving: ServingDep):
    return await drive(TGIDialect.parse(body, serving, stream=False), request, serving, ticket)


@tgi_router.post(
    declare("/generate_stream", TGI_STREAM),
    response_model=StreamResponse,
    responses=ERROR_RESPONSES,
    summary="Generate text as server-sent events, one per token (TGI)",
)
async def generate_stream(
    body: GenerateRequest, request: Request, ticket: TicketDep, serving: ServingDep
):
    return await drive(TGIDialect.parse(body, serving, stream=True), request, serving, ticket)


@tgi_router.post(
    declare("/", TGI_STREAM),
    response_model=list[GenerateResponse],
    responses=ERROR_RESPONSES,
    summary="TGI compatibility: /generate (as a one-item list) or /generate_stream by `stream`",
)
async def compat_generate(
    body: GenerateRequest, request: Request, ticket: TicketDep, serving: ServingDep
):
    dialect = TGIDialect.parse(body, serving, stream=bool(body.stream))
    answer = await drive(dialect, request, serving, ticket)
    return answer if dialect.stream else [answer]


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
