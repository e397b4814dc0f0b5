"""What a cache-aware router in front of lamina replicas reads from each of them.

SGLang's model gateway (`sglang-router` on PyPI) registers a replica by reading
GET /server_info and GET /model_info; without them it lists the model as "unknown" and
sends `"model": "unknown"` for a client that named none, which lamina refuses. Neither
route reports a `model_path`: the gateway would load a tokenizer from it, from the model
hub when the path is not a folder on the router's own machine (docs/router-comparison.md).
Both answer 503 until the model is loaded, like /v1/models.
"""

from __future__ import annotations

from fastapi import APIRouter

from app import __version__
from app.api.errors import ERROR_RESPONSES
from app.api.schemas_misc import ModelInfoResponse, ServerInfo
from app.api.state import ServingDep, StateDep

router = APIRouter(tags=["Routers in front of lamina"])


@router.get(
    "/server_info",
    response_model=ServerInfo,
    responses=ERROR_RESPONSES,
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


@router.get(
    "/model_info",
    response_model=ModelInfoResponse,
    responses=ERROR_RESPONSES,
    summary="The served model's type and architectures, for a router",
)
async def model_info(serving: ServingDep) -> ModelInfoResponse:
    return ModelInfoResponse(
        served_model_name=serving.model.name,
        model_type=serving.model.model_type,
        architectures=list(serving.model.architectures),
    )
