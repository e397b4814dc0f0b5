"""Request ids, HTTP metrics and /metrics: the middleware every request passes through.

- `ObservabilityMiddleware` (outermost ASGI middleware): gives every request an id
  (a valid `X-Request-Id` is honoured, else one is generated), returns it in the
  `X-Request-Id` header, sets it in `request_id_var` for every log line, puts the
  request's `RequestRecord` in the ASGI scope (`RequestRecord.of`), counts HTTP
  requests by route (`route_label`) and status and those in flight, settles the
  request's failure reason and writes its access line when the response ends (after
  the last streamed byte).
- GET /metrics: the Prometheus exposition of the app's registry (app/metrics.py).
- `install_observability`: serves /metrics and adds the middleware, outermost.

What the layers report about a request (its failure, the `user` field, the driver's
deltas) and the access line live in request_record.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import _on_unexpected
from app.api.request_record import SCOPE_KEY, RequestRecord, failure_for_status, log_access
from app.api.route_facts import PROBE, declare
from app.config import Settings
from app.logging_setup import request_id_var
from app.metrics import Metrics

logger = logging.getLogger("lamina.api")

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_LENGTH = 128
# Letters, digits and a few separators: safe in a header, a log line and a JSON id.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/-]+")
METRICS_PATH = "/metrics"


# --- request ids -------------------------------------------------------------------------


def accept_request_id(value: str | None) -> str | None:
    """A client's X-Request-Id if it is safe to echo and log, else None."""
    if value is None or len(value) > MAX_REQUEST_ID_LENGTH:
        return None
    return value if _SAFE_REQUEST_ID.fullmatch(value) else None


# --- the middleware ----------------------------------------------------------------------


def route_label(scope: Scope) -> str:
    """The matched route's template (bounded cardinality), or "unmatched".

    A request refused before routing (401 from the key check, 413 and 415 from
    BodyGuard) has no route in its scope yet: its path is matched here, so it counts
    under the route it was for."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    for route in _plain_routes(getattr(getattr(scope.get("app"), "router", None), "routes", ())):
        if route.matches(scope)[0] is Match.FULL:
            return str(route.path)
    return "unmatched"


def _plain_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """Routes with a path, routers included without a prefix opened up (lamina's own);
    a prefixed router is skipped rather than matched without its prefix."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is None:
            if isinstance(getattr(route, "path", None), str):
                yield route
        elif not route.include_context.prefix:
            yield from _plain_routes(included.routes)


class ObservabilityMiddleware:
    """Request id, HTTP metrics and the access line for every HTTP request.

    Keep it the outermost middleware (added last in create_app): it must see every
    response, including 413s from BodyGuard and 429s from admission control.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        log_prompts: bool = False,
        tokenizer_of: Callable[[], Any] = lambda: None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.log_prompts = log_prompts
        self.tokenizer_of = tokenizer_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = accept_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        record = RequestRecord(
            request_id=given or uuid.uuid4().hex,
            id_from_client=given is not None,
            method=scope["method"],
            path=scope["path"],
            metrics=self.metrics,
            log_prompts=self.log_prompts,
        )
        id_header = (REQUEST_ID_HEADER.lower().encode(), record.request_id.encode())
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        counts_in_flight = record.path != METRICS_PATH  # a scrape should not see itself
        id_token = request_id_var.set(record.request_id)
        scope[SCOPE_KEY] = record
        if counts_in_flight:
            self.metrics.http_in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:  # server shutdown, or the client left
            if not started:
                status = 499
            raise
        except Exception as exc:
            if started:
                record.fail("error")
                raise
            # Answer here (not in Starlette's outermost handler) so the 500 carries the id.
            response = await _on_unexpected(Request(scope), exc)
            await response(scope, receive, send_with_id)
        finally:
            if counts_in_flight:
                self.metrics.http_in_flight.dec()
            self._finish(scope, record, status)
            request_id_var.reset(id_token)

    def _finish(self, scope: Scope, record: RequestRecord, status: int) -> None:
        route = route_label(scope)
        self.metrics.observe_http(route, record.method, status)
        implied = failure_for_status(status)
        if implied is not None:
            record.fail(implied)
        try:
            log_access(record, route, status, self.tokenizer_of)
        except Exception:  # noqa: BLE001 - a logging bug must not fail the request
            logger.exception("writing the access log line failed")


# --- /metrics and installation -----------------------------------------------------------

router = APIRouter(tags=["Health"])


@router.get(
    declare(METRICS_PATH, PROBE),
    include_in_schema=False,  # Prometheus text, not JSON: described in the README
)
async def metrics_endpoint(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


def install_observability(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Serve GET /metrics and wrap the app in ObservabilityMiddleware. Call it after
    every other add_middleware, so the middleware is the outermost one."""
    app.state.metrics = metrics
    app.include_router(router)

    def tokenizer_of() -> Any:
        serving = app.state.server.serving
        return None if serving is None else serving.tokenizer

    app.add_middleware(
        ObservabilityMiddleware,
        metrics=metrics,
        log_prompts=settings.log_prompts,
        tokenizer_of=tokenizer_of,
    )
