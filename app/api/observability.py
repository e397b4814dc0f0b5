"""Request ids, request metrics and the access log: what operators see of each request.

Pieces, from the outside in:
- `ObservabilityMiddleware` (outermost ASGI middleware): gives every request an id
  (a valid `X-Request-Id` is honoured, else one is generated), returns it in the
  `X-Request-Id` header, sets it in `request_id_var` for every log line, counts HTTP
  requests by route and status and those in flight, and writes one access line when
  the response ends (after the last streamed byte).
- `RequestRecord`: what one HTTP request did (tokens, first token, outcome), filled by
  the layers it passes through and read by the access line. One per request.
- `GenerationObserver`: `Generation` (generation.py) reports each delta and its close
  here; it counts prompt and generation tokens, successes and latency histograms.
- `note_user(user)`: the OpenAI `user` field (an end-user id the client chose) goes on
  the request's access line as `user`: printable characters only, at most
  MAX_LOGGED_USER_LENGTH of them. It is a log field only, never a metric label (one
  label value per end user would grow the registry without bound).
- `report_failure(reason)`: THE hook for a failed request (request_failure{reason}).
  The first report of a request wins, so it is counted once; when nobody reported one,
  the middleware derives it from the status (429 overloaded, 408/504 timeout, 499
  aborted, 401/403 unauthorized, other 4xx validation, 5xx error). A failure that a
  status cannot show (a deadline that ends a stream already answered 200) must be
  reported: `report_failure("timeout")`, before aborting the generation.
- GET /metrics: the Prometheus exposition of the app's registry (app/metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import _on_unexpected
from app.config import Settings
from app.core import FinishReason, TokenDelta
from app.logging_setup import request_id_var
from app.metrics import FAILURE_REASONS, Metrics

if TYPE_CHECKING:
    from app.api.state import Serving

access_logger = logging.getLogger("lamina.access")
logger = logging.getLogger("lamina.api")

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_LENGTH = 128
# The OpenAI `user` field is free text of any length: the access line keeps this much.
MAX_LOGGED_USER_LENGTH = 128
# Letters, digits and a few separators: safe in a header, a log line and a JSON id.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/-]+")
# POSTs that run the model; only these count in request_failure.
INFERENCE_PATHS = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream", "/"}
)
# Polled every few seconds: logged at debug level, so access logs show traffic.
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})
METRICS_PATH = "/metrics"


# --- request ids -------------------------------------------------------------------------


def accept_request_id(value: str | None) -> str | None:
    """A client's X-Request-Id if it is safe to echo and log, else None."""
    if value is None or len(value) > MAX_REQUEST_ID_LENGTH:
        return None
    return value if _SAFE_REQUEST_ID.fullmatch(value) else None


def generate_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    """The id of the HTTP request being served in this context (None outside one)."""
    return request_id_var.get()


# --- what one request did ----------------------------------------------------------------


@dataclass
class RequestRecord:
    """One HTTP request as the access log and request_failure see it."""

    request_id: str
    id_from_client: bool  # the client chose the id: it may repeat, so engine ids add a suffix
    method: str
    path: str
    metrics: Metrics
    log_prompts: bool
    started_s: float = field(default_factory=time.monotonic)
    failure: str | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    first_token_s: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)  # only when log_prompts
    outputs: dict[int, list[str]] = field(default_factory=dict)  # only when log_prompts
    num_generations: int = 0
    user: str | None = None  # the OpenAI `user` field, as loggable_user() leaves it

    @property
    def is_inference(self) -> bool:
        return self.num_generations > 0 or (self.method == "POST" and self.path in INFERENCE_PATHS)

    def fail(self, reason: str) -> None:
        """Record the request's failure; only the first one counts."""
        if reason not in FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}; one of {FAILURE_REASONS}")
        if self.failure is not None:
            return
        self.failure = reason
        if self.is_inference:
            self.metrics.observe_failure(reason)


_current_record: ContextVar[RequestRecord | None] = ContextVar("lamina_request", default=None)


def current_record() -> RequestRecord | None:
    return _current_record.get()


def report_failure(reason: str) -> None:
    """Count the current request as failed with `reason` (one of app.metrics.FAILURE_REASONS:
    validation, overloaded, unavailable, aborted, timeout, error, unauthorized). Only the
    first report of a request counts. Outside a request (no middleware) it does nothing."""
    record = _current_record.get()
    if record is not None:
        record.fail(reason)


def loggable_user(user: str) -> str:
    """The `user` field as the access line shows it: at most MAX_LOGGED_USER_LENGTH
    characters, each unprintable one (control characters, line breaks) as U+FFFD, so a
    client cannot forge or garble a text-format log line with it."""
    kept = user[:MAX_LOGGED_USER_LENGTH]
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in kept)


def note_user(user: str | None) -> None:
    """Record the OpenAI `user` field of the current request for its access line.
    None (not sent) records nothing; outside a request (no middleware) it does nothing."""
    record = _current_record.get()
    if record is not None and user is not None:
        record.user = loggable_user(user)


def failure_for_status(status: int) -> str | None:
    """The failure reason a final HTTP status implies, when no layer reported one."""
    if status < 400:
        return None
    if status == 429:
        return "overloaded"
    if status in (408, 504):
        return "timeout"
    if status == 499:
        return "aborted"
    if status in (401, 403):
        return "unauthorized"
    return "validation" if status < 500 else "error"


def engine_request_id(response_id: str) -> str:
    """The engine's id for a generation whose response id is `response_id`.

    The same, unless the client chose the request id: clients may reuse one (a retry,
    a fixed header), and the engine needs ids unique among the requests it holds.
    """
    record = _current_record.get()
    if record is None or not record.id_from_client:
        return response_id
    return f"{response_id}-{uuid.uuid4().hex[:8]}"


# --- generation -> metrics ---------------------------------------------------------------


class GenerationObserver:
    """Metrics of one Generation: its prompts (once each), then each choice as it ends.

    Choices ending with stop/length are successes; ERROR and ABORT deltas fail the
    request ("error", "aborted"); a choice still running at close was cut short (the
    client left, or the stream broke): "aborted", counting the tokens it delivered.
    """

    def __init__(self, prompts: list[list[int]], n: int) -> None:
        self._record = _current_record.get()
        num_choices = len(prompts) * n
        self._num_tokens = [0] * num_choices
        self._ended = [False] * num_choices
        record = self._record
        if record is None:
            return
        record.num_generations += 1
        for prompt in prompts:
            record.metrics.observe_prompt(len(prompt))
            record.num_prompt_tokens += len(prompt)
        if record.log_prompts:
            record.prompts.extend(prompts)

    def on_delta(self, choice_index: int, delta: TokenDelta) -> None:
        record = self._record
        if record is None or self._ended[choice_index]:
            return
        if delta.token_ids and record.first_token_s is None:
            record.first_token_s = time.monotonic()
        self._num_tokens[choice_index] += len(delta.token_ids)
        if record.log_prompts and delta.text:
            record.outputs.setdefault(choice_index, []).append(delta.text)
        if delta.finished:
            # An engine failure's usage may not count what was already streamed.
            generated = self._num_tokens[choice_index]
            if delta.usage is not None:
                generated = max(generated, delta.usage.completion_tokens)
            self._end(choice_index, delta.finish_reason, generated, delta)

    def on_close(self) -> None:
        if self._record is None:
            return
        for index, ended in enumerate(self._ended):
            if not ended:
                self._end(index, None, self._num_tokens[index], None)

    def _end(
        self,
        index: int,
        reason: FinishReason | None,
        num_generated: int,
        delta: TokenDelta | None,
    ) -> None:
        record = self._record
        assert record is not None
        self._ended[index] = True
        record.metrics.observe_choice(reason, num_generated, delta.timings if delta else None)
        record.num_completion_tokens += num_generated
        record.finish_reasons.append(reason.value if reason else "cut_short")
        if reason is FinishReason.ERROR:
            record.fail("error")
        elif reason is FinishReason.ABORT or reason is None:
            record.fail("aborted")


# --- the middleware ----------------------------------------------------------------------


def route_label(scope: Scope) -> str:
    """The matched route's template (bounded cardinality), or "unmatched"."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else "unmatched"


class ObservabilityMiddleware:
    """Request id, HTTP metrics and the access line for every HTTP request.

    Keep it the outermost middleware (added last in create_app): it must see every
    response, including 413s from BodySizeLimit and 429s from admission control.
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
            request_id=given or generate_request_id(),
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
        record_token = _current_record.set(record)
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
            _current_record.reset(record_token)
            request_id_var.reset(id_token)

    def _finish(self, scope: Scope, record: RequestRecord, status: int) -> None:
        route = route_label(scope)
        self.metrics.observe_http(route, record.method, status)
        implied = failure_for_status(status)
        if implied is not None:
            record.fail(implied)
        try:
            self._log_access(record, route, status)
        except Exception:  # noqa: BLE001 - a logging bug must not fail the request
            logger.exception("writing the access log line failed")

    def _log_access(self, record: RequestRecord, route: str, status: int) -> None:
        duration_s = time.monotonic() - record.started_s
        fields: dict[str, Any] = {
            "method": record.method,
            "route": route,
            "path": record.path,
            "status": status,
            "duration_s": round(duration_s, 6),
        }
        if record.user is not None:
            fields["user"] = record.user
        if record.is_inference:
            fields["prompt_tokens"] = record.num_prompt_tokens
            fields["completion_tokens"] = record.num_completion_tokens
            if record.first_token_s is not None:
                fields["ttft_s"] = round(record.first_token_s - record.started_s, 6)
            fields["finish_reasons"] = record.finish_reasons
            if record.failure is not None:
                fields["failure"] = record.failure
        if record.log_prompts and record.num_generations:
            fields.update(self._texts(record))
        # 5xx is news for an operator, except a 503 while loading or draining (expected;
        # clients polling a starting replica would otherwise fill the log with warnings).
        is_breakage = status >= 500 and record.failure != "unavailable"
        level = logging.WARNING if is_breakage else logging.INFO
        if record.path in PROBE_PATHS:  # /ready says 503 all through loading: not news
            level = logging.DEBUG
        access_logger.log(
            level, "%s %s %d %.3fs", record.method, record.path, status, duration_s, extra=fields
        )

    def _texts(self, record: RequestRecord) -> dict[str, Any]:
        """Prompt and output text, for Settings.log_prompts only (the prompt as the model
        saw it: chat template applied)."""
        tokenizer = self.tokenizer_of()
        prompts = [
            tokenizer.decode(ids, skip_special_tokens=False) if tokenizer else ids
            for ids in record.prompts
        ]
        outputs = [
            "".join(record.outputs.get(i, [])) for i in range(max(record.outputs, default=-1) + 1)
        ]
        return {"prompt": prompts, "output": outputs}


# --- /metrics and installation -----------------------------------------------------------

router = APIRouter(tags=["Health"])


@router.get(
    METRICS_PATH,
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


def log_ready(serving: Serving, settings: Settings, kv_cache_tokens: int | None, startup_s: float):
    """The start-up line: which model, device, dtype, KV cache and limits were chosen."""
    model, limits = serving.model, serving.limits
    num_blocks = None if kv_cache_tokens is None else kv_cache_tokens // settings.block_size
    logger.info(
        "ready: %s on %s (%s), context %d tokens, KV cache %s blocks of %d tokens, after %.1f s",
        model.name,
        model.device,
        model.dtype,
        model.max_model_len,
        num_blocks,
        settings.block_size,
        startup_s,
        extra={
            "model": model.name,
            "model_path": model.path,
            "device": model.device,
            "dtype": model.dtype,
            "max_model_len": model.max_model_len,
            "num_kv_blocks": num_blocks,
            "block_size": settings.block_size,
            "kv_cache_tokens": kv_cache_tokens,
            "max_num_seqs": settings.max_num_seqs,
            "max_num_batched_tokens": settings.max_num_batched_tokens,
            "max_queued": settings.max_queued,
            "max_prompt_tokens": limits.max_prompt_tokens,
            "max_tokens_limit": limits.max_tokens_limit,
            "max_n": limits.max_n,
            "prefix_caching": settings.enable_prefix_caching,
            "startup_s": round(startup_s, 3),
        },
    )
