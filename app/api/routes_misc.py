"""Liveness, readiness, model listing and tokenizer routes, and what a router in front
of lamina reads from each replica (GET /server_info, /model_info)."""

from __future__ import annotations

from fastapi import APIRouter

from app import __version__
from app.api.errors import ERROR_RESPONSES, ErrorResponse, invalid_request, service_unavailable
from app.api.prompts import check_token_ids, encode_chat
from app.api.route_facts import PROBE, declare
from app.api.schemas_misc import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelInfoResponse,
    ModelList,
    ServerInfo,
    StatusResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from app.api.state import Phase, Serving, ServingDep, StateDep

UNAVAILABLE = {503: {"model": ErrorResponse, "description": "Not alive / not ready"}}
health_router = APIRouter(tags=["Health"], responses=UNAVAILABLE)
router = APIRouter(tags=["Models and tokenizer"], responses=ERROR_RESPONSES)
worker_router = APIRouter(tags=["Routers in front of lamina"], responses=ERROR_RESPONSES)


@health_router.get(
    declare("/health", PROBE),
    response_model=StatusResponse,
    summary="Liveness",
)
async def health(state: StateDep):
    """200 while the process runs and the engine thread (once started) is alive."""
    serving = state.serving
    if state.readiness.phase is Phase.FAILED:
        raise service_unavailable(state.readiness.describe(), code="load_failed")
    if serving is not None and not serving.engine.is_alive:
        raise service_unavailable("the engine thread is not running", code="engine_dead")
    return StatusResponse(status="ok")


@health_router.get(
    declare("/ready", PROBE),
    response_model=StatusResponse,
    summary="Readiness",
)
async def ready(state: StateDep):
    """200 once the model is loaded and warmed up; 503 before that and while draining."""
    engine_alive = state.serving is not None and state.serving.engine.is_alive
    if state.readiness.is_ready and engine_alive:
        return StatusResponse(status="ready")
    reason = state.readiness.describe()
    if state.readiness.is_ready:
        reason = "the engine thread is not running"
    raise service_unavailable(reason, code=f"server_{state.readiness.phase.value}")


def _model_card(serving: Serving) -> ModelCard:
    return ModelCard(
        id=serving.model.name,
        created=serving.model.created,
        max_model_len=serving.model.max_model_len,
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(serving: ServingDep) -> ModelList:
    return ModelList(data=[_model_card(serving)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, serving: ServingDep) -> ModelCard:
    serving.model.check_named(model_id)
    return _model_card(serving)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, serving: ServingDep) -> TokenizeResponse:
    """Token ids of a prompt, or of chat messages rendered with the chat template."""
    serving.model.check_named(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise invalid_request("give exactly one of `prompt` or `messages`", param="prompt")
    if body.messages is not None:
        if not body.messages:
            raise invalid_request("`messages` must not be empty", param="messages")
        tokens = encode_chat(body.messages, serving.tokenizer, body.add_generation_prompt)
    else:
        tokens = serving.tokenizer.encode(body.prompt or "", body.add_special_tokens)
    return TokenizeResponse(
        count=len(tokens), max_model_len=serving.limits.max_model_len, tokens=tokens
    )


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, serving: ServingDep) -> DetokenizeResponse:
    serving.model.check_named(body.model)
    check_token_ids(body.tokens, "tokens", serving.limits.vocab_size)
    return DetokenizeResponse(
        prompt=serving.tokenizer.decode(body.tokens, skip_special_tokens=False)
    )


# --- for a router in front of lamina replicas ---------------------------------------------
# What a cache-aware router in front of lamina replicas reads from each of them.
#
# SGLang's model gateway (`sglang-router` on PyPI) registers a replica by reading
# GET /server_info and GET /model_info; without them it lists the model as "unknown" and
# sends `"model": "unknown"` for a client that named none, which lamina refuses. Neither
# route reports a `model_path`: the gateway would load a tokenizer from it, from the model
# hub when the path is not a folder on the router's own machine (docs/router-comparison.md).
# Both answer 503 until the model is loaded, like /v1/models.


@worker_router.get(
    "/server_info",
    response_model=ServerInfo,
    summary="Served model and engine limits, for a router registering this replica",
)
async def server_info(serving: ServingDep, state: StateDep) -> ServerInfo:
    settings = state.settings
    return ServerInfo(
        served_model_name=serving.model.name,
        version=__version__,
        max_model_len=serving.limits.max_model_len,
        max_running_requests=settings.max_num_seqs,
        max_prefill_tokens=settings.max_num_batched_tokens,
        lamina_enable_prefix_caching=settings.enable_prefix_caching,
    )


@worker_router.get(
    "/model_info",
    response_model=ModelInfoResponse,
    summary="The served model's type and architectures, for a router",
)
async def model_info(serving: ServingDep) -> ModelInfoResponse:
    return ModelInfoResponse(
        served_model_name=serving.model.name,
        model_type=serving.model.model_type,
        architectures=list(serving.model.architectures),
    )
