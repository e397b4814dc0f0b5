"""Admission control: a bounded queue in front of the engine. A ticket only counts.

Every generation route passes the `admit` dependency (routes.py), which runs after the
body is read and before it is validated or tokenized. The request gets a `Ticket` or an
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

A ticket neither times nor stops anything: the route driver's run keeps the request's
deadline, and the drain stops the runs it finds on `Serving.runs` (driver.py, drain.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from app.api.errors import APIError
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


class Ticket:
    """One admitted generation request, from admission until its response has ended."""

    def __init__(self, controller: AdmissionController) -> None:
        self._controller = controller
        self.started = False  # its first token reached the HTTP layer
        self.released = False

    def mark_started(self) -> None:
        if not self.started and not self.released:
            self.started = True
            self._controller.num_started += 1


class AdmissionController:
    """The HTTP side's count of generation requests in flight. Event loop only."""

    def __init__(self, max_queued: int, max_running: int, server_timeout_s: float | None):
        self.max_queued = max_queued
        self.max_running = max_running  # requests the scheduler can start at once
        self.server_timeout_s = server_timeout_s  # LAMINA_REQUEST_TIMEOUT_S
        self.num_in_flight = 0
        self.num_started = 0
        self.num_rejected = 0
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

    def admit(self) -> Ticket:
        """Reserve a place for one request, or raise the 429 (synchronous: no race)."""
        if not self.has_room():
            self.num_rejected += 1
            raise overloaded(self.num_waiting)
        self.num_in_flight += 1
        return Ticket(self)

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.num_in_flight -= 1
        if ticket.started:
            self.num_started -= 1
        if self.num_in_flight == 0 and self._idle is not None:
            self._idle.set()

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
