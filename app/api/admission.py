"""Admission control: a bounded queue in front of the engine, and the tickets through
which deadlines and the drain stop a request.

Every generation request passes `admit_generation` (a FastAPI dependency) after its body
is read and before it is validated or tokenized. The request gets a `Ticket` or an
immediate 429 with `Retry-After`; the ticket is released when the response has ended
(after the last streamed byte, or when the client left).

A request counts as *waiting* from admission until its first token reaches the HTTP
layer, and as *started* after that. A new request is admitted while

    num_waiting < max_queued + free running slots

where the free slots are LAMINA_MAX_NUM_SEQS minus the started requests (none while the
engine reports sequences it could not schedule, e.g. because the KV cache is full). So
at most LAMINA_MAX_QUEUED requests wait beyond what the scheduler can start at once.
All counts live on the event loop and change only in synchronous code: checking and
reserving a place is one step, so concurrent arrivals cannot overshoot.

`TrackedEngine` wraps the engine the routes use: each engine stream it returns reports
its first delta to the ticket of the HTTP request that created it (found in a context
variable set by `admit_generation`), and can be ended at once by the ticket's expiry
(deadline, drain timeout) with an `ExpiredDelta` that carries the client's error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from app.api.deadline import (
    TIMEOUT_HEADER,
    deadline_exceeded,
    effective_timeout_s,
    parse_timeout_header,
)
from app.api.errors import APIError
from app.api.request_record import INFERENCE_PATHS, report_failure
from app.config import Settings
from app.core import FinishReason, SamplingParams, TokenDelta

RETRY_AFTER_S = 1  # a hint: the queue moves every engine step

_current_ticket: ContextVar[Ticket | None] = ContextVar("lamina_admission", default=None)


def overloaded(num_waiting: int) -> APIError:
    return APIError(
        429,
        f"the server is at capacity ({num_waiting} requests are already waiting); "
        f"retry in {RETRY_AFTER_S} s or on another replica",
        type="overloaded_error",
        code="server_overloaded",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


@dataclass(frozen=True)
class ExpiredDelta(TokenDelta):
    """The ABORT delta of a choice stopped by its ticket; `api_error` is what the client
    is told (generation.engine_failure returns it)."""

    api_error: APIError | None = None


class Ticket:
    """One admitted generation request, from admission until its response has ended."""

    def __init__(self, controller: AdmissionController, timeout_s: float | None) -> None:
        self._controller = controller
        self.timeout_s = timeout_s
        self.started = False  # its first token reached the HTTP layer
        self.released = False
        self.expiry: APIError | None = None  # set when a deadline or the drain stopped it
        self._streams: list[TrackedStream] = []
        self._timer: asyncio.TimerHandle | None = None
        if timeout_s is not None:
            # call_later runs the callback in a copy of this context: the request's own,
            # so report_failure counts the timeout against this request.
            self._timer = asyncio.get_running_loop().call_later(timeout_s, self._on_deadline)

    def mark_started(self) -> None:
        if not self.started and not self.released:
            self.started = True
            self._controller.num_started += 1

    def attach(self, stream: TrackedStream) -> None:
        self._streams.append(stream)
        if self.expiry is not None:
            stream.expire(self.expiry)

    def expire(self, error: APIError) -> None:
        """Stop the request now: every stream ends with `error` (first expiry wins)."""
        if self.expiry is not None or self.released:
            return
        self.expiry = error
        for stream in self._streams:
            stream.expire(error)

    @property
    def has_unfinished_work(self) -> bool:
        """No stream yet (still being prepared), or some choice still running."""
        return not self._streams or any(not stream.finished for stream in self._streams)

    def _on_deadline(self) -> None:
        # A request whose last token is out (only its final frames are still being
        # written) finished in time: it is neither stopped nor counted as a timeout.
        if self.expiry is None and not self.released and self.has_unfinished_work:
            assert self.timeout_s is not None
            report_failure("timeout")  # before the abort, which would count as "aborted"
            self.expire(deadline_exceeded(self.timeout_s))

    def _close(self) -> None:
        self.released = True
        if self._timer is not None:
            self._timer.cancel()


class AdmissionController:
    """The HTTP side's count of generation requests in flight. Event loop only."""

    def __init__(self, max_queued: int, max_running: int, server_timeout_s: float | None):
        self.max_queued = max_queued
        self.max_running = max_running  # requests the scheduler can start at once
        self.server_timeout_s = server_timeout_s
        self.num_in_flight = 0
        self.num_started = 0
        self.num_rejected = 0
        self._tickets: set[Ticket] = set()
        self._engine_backlog: Callable[[], bool] = lambda: False
        self._idle: asyncio.Event | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> AdmissionController:
        return cls(settings.max_queued, settings.max_num_seqs, settings.request_timeout_s)

    @property
    def num_waiting(self) -> int:
        return self.num_in_flight - self.num_started

    def has_room(self) -> bool:
        free_slots = 0 if self._engine_backlog() else max(0, self.max_running - self.num_started)
        return self.num_waiting < self.max_queued + free_slots

    def admit(self, timeout_s: float | None = None) -> Ticket:
        """Reserve a place for one request, or raise the 429 (synchronous: no race)."""
        if not self.has_room():
            self.num_rejected += 1
            raise overloaded(self.num_waiting)
        ticket = Ticket(self, timeout_s)
        self._tickets.add(ticket)
        self.num_in_flight += 1
        return ticket

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket._close()
        self._tickets.discard(ticket)
        self.num_in_flight -= 1
        if ticket.started:
            self.num_started -= 1
        if self.num_in_flight == 0 and self._idle is not None:
            self._idle.set()

    def expire_all(self, error: APIError) -> int:
        """Stop every request in flight with `error` (the drain's last resort)."""
        tickets = list(self._tickets)
        for ticket in tickets:
            ticket.expire(error)
        return len(tickets)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no generation request is in flight; False if `timeout_s` passed."""
        if self.num_in_flight == 0:
            return True
        self._idle = self._idle or asyncio.Event()
        self._idle.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self.num_in_flight == 0

    def track(self, engine: Any) -> TrackedEngine:
        """The engine the routes use: streams tied to tickets. Reads the engine's backlog
        (sequences it could not schedule) from its stats() when it has one."""
        stats = getattr(engine, "stats", None)
        if callable(stats):
            self._engine_backlog = lambda: stats().num_waiting > 0
        return TrackedEngine(engine)


class TrackedEngine:
    """An EngineClient whose streams report to the current request's ticket. Anything
    else (is_alive, stats, shutdown, max_model_len...) is the wrapped engine's own."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, n: int = 1
    ) -> Any:
        stream = self.engine.generate(request_id, prompt_token_ids, params, n=n)
        ticket = _current_ticket.get()
        if ticket is None or ticket.released:
            return stream
        return TrackedStream(stream, ticket, request_id, n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


class TrackedStream:
    """One engine request's deltas, as its ticket needs them: the first delta marks the
    HTTP request started; `expire` ends every unfinished choice at once."""

    def __init__(self, inner: Any, ticket: Ticket, request_id: str, n: int) -> None:
        self._inner = inner
        self._ticket = ticket
        self.request_id = request_id
        self._num_choices = n
        self._ended: set[int] = set()
        self._expiry: APIError | None = None
        self._waiter: asyncio.Task[Any] | None = None  # the task awaiting our next delta
        self._cancelled_by_expiry = False
        self._closing: asyncio.Future[None] | None = None
        ticket.attach(self)

    def __aiter__(self) -> TrackedStream:
        return self

    @property
    def finished(self) -> bool:
        return len(self._ended) == self._num_choices

    async def __anext__(self) -> TokenDelta:
        if self._expiry is None:
            task = asyncio.current_task()
            self._waiter = task
            try:
                delta = await self._inner.__anext__()
            except asyncio.CancelledError:
                # Ours (an expiry) unless someone else cancelled the task as well.
                if not self._cancelled_by_expiry or _uncancel(task) > 0:
                    raise
            else:
                self._ticket.mark_started()
                if delta.finished:
                    self._ended.add(delta.index)
                return delta
            finally:
                self._waiter = None
        return await self._expired_delta()

    @property
    def supports_batches(self) -> bool:
        return callable(getattr(self._inner, "next_batch", None))

    async def next_batch(self, timeout_s: float | None = None) -> list[TokenDelta]:
        """The inner stream's next_batch (see RequestStream), or every choice's expiry."""
        if self._expiry is None:
            task = asyncio.current_task()
            self._waiter = task
            try:
                batch = await self._inner.next_batch(timeout_s)
            except asyncio.CancelledError:
                if not self._cancelled_by_expiry or _uncancel(task) > 0:
                    raise
            else:
                if batch:
                    self._ticket.mark_started()
                for delta in batch:
                    if delta.finished:
                        self._ended.add(delta.index)
                return batch
            finally:
                self._waiter = None
        expired = []
        while True:
            try:
                expired.append(await self._expired_delta())
            except StopAsyncIteration:
                break
        if not expired:
            raise StopAsyncIteration
        return expired

    async def _expired_delta(self) -> TokenDelta:
        await self._inner.aclose()  # aborts the engine request if it has not finished
        assert self._expiry is not None
        for index in range(self._num_choices):
            if index not in self._ended:
                self._ended.add(index)
                return ExpiredDelta(
                    self.request_id,
                    index,
                    "",
                    (),
                    finish_reason=FinishReason.ABORT,
                    error=self._expiry.message,
                    api_error=self._expiry,
                )
        raise StopAsyncIteration

    def expire(self, error: APIError) -> None:
        if self._expiry is not None or self.finished:
            return
        self._expiry = error
        if self._waiter is not None:
            self._cancelled_by_expiry = True
            self._waiter.cancel()
        else:  # nobody is waiting: free the engine's blocks now, not at the next read
            self._closing = asyncio.ensure_future(self._inner.aclose())

    async def aclose(self) -> None:
        await self._inner.aclose()


def _uncancel(task: asyncio.Task[Any] | None) -> int:
    """Undo one cancel() of `task`; the cancels still pending (Python 3.11+ counts them)."""
    uncancel = getattr(task, "uncancel", None)
    return uncancel() if uncancel is not None else 0


def _is_generation(request: Request) -> bool:
    return request.method == "POST" and request.url.path in INFERENCE_PATHS


async def admit_generation(request: Request) -> AsyncIterator[None]:
    """FastAPI dependency of the model routes: admission control for generation requests
    (others pass through). 400 for a bad X-Request-Timeout, 429 when the queue is full;
    a server that is not ready admits nothing here and answers 503 right after."""
    if not _is_generation(request):
        yield
        return
    state = request.app.state.server
    controller: AdmissionController = state.admission
    header_s = parse_timeout_header(request.headers.get(TIMEOUT_HEADER))
    if not state.readiness.is_ready:
        yield
        return
    ticket = controller.admit(effective_timeout_s(header_s, controller.server_timeout_s))
    token = _current_ticket.set(ticket)
    try:
        yield
    finally:
        controller.release(ticket)
        with contextlib.suppress(ValueError):  # the exit ran in another context
            _current_ticket.reset(token)
