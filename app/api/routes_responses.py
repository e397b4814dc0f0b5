"""The Responses API routes: create (the one route driver), retrieve, delete, cancel.

Stored responses live in this replica's ResponseStore (response_store.py); an id it
does not hold (never stored, deleted, evicted, expired, or made by another replica) is
a 404 in the OpenAI error envelope.
"""

from __future__ import annotations

from fastapi import APIRouter

from app.api.dialect_responses import ResponsesDialect, response_not_found
from app.api.driver import drive
from app.api.errors import ERROR_RESPONSES, invalid_request
from app.api.response_store import StoredResponse
from app.api.route_facts import RouteFacts, declare
from app.api.routes import CallDep
from app.api.schemas_responses import (
    DeletedResponse,
    ResponseObject,
    ResponsesRequest,
    ResponseStreamEvent,
)
from app.api.state import Serving, ServingDep

responses_router = APIRouter(tags=["OpenAI"], responses=ERROR_RESPONSES)

RESPONSES = RouteFacts(generates=True, event_model=ResponseStreamEvent)


@responses_router.post(
    declare("/v1/responses", RESPONSES),
    response_model=ResponseObject,
    summary="Create a response (streams typed server-sent events when `stream` is true)",
)
async def create_response(body: ResponsesRequest, call: CallDep):
    return await drive(call, ResponsesDialect, body, stream=bool(body.stream))


def stored_or_404(serving: Serving, response_id: str) -> StoredResponse:
    stored = serving.responses.get(response_id)
    if stored is None:
        raise response_not_found(response_id)
    return stored


@responses_router.get(
    "/v1/responses/{response_id}",
    response_model=ResponseObject,
    summary="A stored response, as it is now (in_progress while it runs)",
)
async def retrieve_response(response_id: str, serving: ServingDep) -> ResponseObject:
    return stored_or_404(serving, response_id).response


@responses_router.delete(
    "/v1/responses/{response_id}",
    response_model=DeletedResponse,
    summary="Forget a stored response (one still running keeps running)",
)
async def delete_response(response_id: str, serving: ServingDep) -> DeletedResponse:
    if not serving.responses.delete(response_id):
        raise response_not_found(response_id)
    return DeletedResponse(id=response_id)


@responses_router.post(
    "/v1/responses/{response_id}/cancel",
    response_model=ResponseObject,
    summary="Stop a running stored response now; it ends with status `cancelled`",
)
async def cancel_response(response_id: str, serving: ServingDep) -> ResponseObject:
    stored = stored_or_404(serving, response_id)
    if stored.cancel is None:
        raise invalid_request(
            f"the response '{response_id}' is {stored.response.status}: only a running "
            "response can be cancelled",
            code="response_not_cancellable",
        )
    stored.cancel()
    return stored.response
