"""Admission control: a bounded queue in front of the engine, and the tickets through
which deadlines and the drain stop a request.

Every generation route takes a `TicketDep` (the `admit_generation` dependency), which
runs after the body is read and before it is validated or tokenized. The request gets
a `Ticket` or an immediate 429 with `Retry-After`; the ticket is released when the
response has ended (after the last streamed byte, or when the client left).

A request counts as *waiting* from admission until its first token reaches the HTTP
layer, and as *started* after that. A new request is admitted while

    num_waiting < max_queued + free running slots

where the free slots are LAMINA_MAX_NUM_SEQS minus the started requests (none while the
engine reports sequences it could not schedule, e.g. because the KV cache is full). So
at most LAMINA_MAX_QUEUED requests wait beyond what the scheduler can start at once.
All counts live on the event loop and change only in synchronous code: checking and
reserving a place is one step, so concurrent arrivals cannot overshoot.

A ticket counts its request and carries its deadline. It does not touch the engine:
the route driver attaches its run to the ticket, and a deadline or the drain's last
resort calls the run's `stop(error)`, which aborts the engine requests with the error's
message (`engine.abort(request_id, reason)`) and answers the client with the error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request

from app.api.deadline import (
    TIMEOUT_HEADER,
    deadline_exceeded,
    effective_timeout_s,
    parse_timeout_header,
)
from app.api.errors import APIError
from app.api.request_record import report_failure
from app.config import Settings

RETRY_AFTER_S = 1  # a hint: the queue moves every engine step


def overloaded(num_waiting: int) -> APIError:
    return APIError(
        429,
        f"the server is at capacity ({num_waiting} requests are already waiting); "
        f"retry in {RETRY_AFTER_S} s or on another replica",
        type="overloaded_error",
        code="server_overloaded",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class Stoppable(Protocol):
    """What a ticket stops: the route driver's run of the request's engine requests."""

    @property
    def finished(self) -> bool: ...  # every choice has delivered its final delta

    def stop(self, error: APIError) -> None: ...


class Ticket:
    """One admitted generation request, from admission until its response has ended."""

    def __init__(self, controller: AdmissionController, timeout_s: float | None) -> None:
        self._controller = controller
        self.timeout_s = timeout_s
        self.started = False  # its first token reached the HTTP layer
        self.released = False
        self.expiry: APIError | None = None  # set when a deadline or the drain stopped it
        self._run: Stoppable | None = None
        self._timer: asyncio.TimerHandle | None = None
        if timeout_s is not None:
            # call_later runs the callback in a copy of this context: the request's own,
            # so report_failure counts the timeout against this request.
            self._timer = asyncio.get_running_loop().call_later(timeout_s, self._on_deadline)

    def mark_started(self) -> None:
        if not self.started and not self.released:
            self.started = True
            self._controller.num_started += 1

    def attach(self, run: Stoppable) -> None:
        """The request's engine requests are running; stop them if already expired."""
        self._run = run
        if self.expiry is not None:
            run.stop(self.expiry)

    def expire(self, error: APIError) -> None:
        """Stop the request now with `error` (the first expiry wins)."""
        if self.expiry is not None or self.released:
            return
        self.expiry = error
        if self._run is not None:
            self._run.stop(error)

    @property
    def has_unfinished_work(self) -> bool:
        """No run yet (still being prepared), or some choice still running."""
        return self._run is None or not self._run.finished

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

    def watch_backlog(self, engine: Any) -> None:
        """Read the engine's backlog (sequences it could not schedule) from its stats()
        when it has one."""
        stats = getattr(engine, "stats", None)
        if callable(stats):
            self._engine_backlog = lambda: stats().num_waiting > 0


async def admit_generation(request: Request) -> AsyncIterator[Ticket | None]:
    """FastAPI dependency of the generation routes: admission control. 400 for a bad
    X-Request-Timeout, 429 when the queue is full; a server that is not ready admits
    nothing here (None) and answers 503 right after."""
    state = request.app.state.server
    controller: AdmissionController = state.admission
    header_s = parse_timeout_header(request.headers.get(TIMEOUT_HEADER))
    if not state.readiness.is_ready:
        yield None
        return
    ticket = controller.admit(effective_timeout_s(header_s, controller.server_timeout_s))
    try:
        yield ticket
    finally:
        controller.release(ticket)


TicketDep = Annotated[Ticket | None, Depends(admit_generation)]
