"""Graceful drain on SIGTERM/SIGINT, and the uvicorn server that runs it.

On the first signal:
1. readiness turns DRAINING at once: GET /ready answers 503, so the load balancer
   stops sending; new requests to the model routes get 503 (`server_draining`). The
   listening socket stays open so late arrivals get that answer, not a refused
   connection.
2. in-flight generation requests (streams included) run to completion, for at most
   LAMINA_DRAIN_TIMEOUT_S;
3. what is still running then is stopped: each client gets a 503 `request_aborted`
   envelope (in the stream when streaming), and its engine request is aborted;
4. uvicorn shuts down (idle connections closed, at most SHUTDOWN_GRACE_S for anything
   else), the lifespan shutdown stops the engine, and the process exits 0.

Worst case from SIGTERM to exit: LAMINA_DRAIN_TIMEOUT_S + STOP_GRACE_S +
SHUTDOWN_GRACE_S + the engine's shutdown (a few seconds): keep Kubernetes'
terminationGracePeriodSeconds above that plus any preStop delay.

A second signal stops the process at once (exit status 128 + signal number).

uvicorn's own handling would close the listening socket first, cut streams after its
graceful timeout and re-raise the signal after shutdown (exit status -15); lamina
installs its handler through `DrainingServer.handle_exit` instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from app.api.deadline import drain_timeout_exceeded

if TYPE_CHECKING:
    from app.api.state import ServerState

logger = logging.getLogger("lamina")

# After the drain timeout, stopped requests need a moment to send their error and close.
STOP_GRACE_S = 5.0
# uvicorn's own graceful shutdown, after the drain: idle connections and quick routes.
SHUTDOWN_GRACE_S = 5


async def drain(state: ServerState, timeout_s: float) -> bool:
    """Refuse new work and wait for generation requests in flight to finish.

    Returns True when all finished in time, False when some had to be stopped.
    """
    state.readiness.start_draining()
    admission = state.admission
    logger.info(
        "draining: %d generation requests in flight, waiting up to %g s",
        admission.num_in_flight,
        timeout_s,
        extra={"num_in_flight": admission.num_in_flight, "drain_timeout_s": timeout_s},
    )
    if await admission.wait_idle(timeout_s):
        logger.info("drained: no request in flight")
        return True
    runs = list(state.serving.runs) if state.serving is not None else []
    for run in runs:
        run.stop(drain_timeout_exceeded(timeout_s))
    num_stopped = len(runs)
    logger.warning(
        "drain timeout of %g s passed: stopping %d requests", timeout_s, num_stopped,
        extra={"num_stopped": num_stopped},
    )  # fmt: skip
    if not await admission.wait_idle(STOP_GRACE_S):
        logger.error("%d requests did not end after being stopped", admission.num_in_flight)
    return False


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT drain lamina first (see the module doc)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = state.settings.drain_timeout_s
        self.drained: bool | None = None  # True: all finished; False: some were stopped
        self._num_signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler uvicorn installs (main thread, between two bytecodes)."""
        self._num_signals += 1
        name = signal.Signals(sig).name
        if self._num_signals > 1:
            logger.warning("second %s: stopping now, in-flight requests are lost", name)
            sys.stderr.flush()
            os._exit(128 + sig)
        if self._loop is None:
            self.should_exit = True
            return
        # Not reentrant-safe here: hand the work to the event loop.
        self._loop.call_soon_threadsafe(self._start_drain, name)

    def _start_drain(self, signal_name: str) -> None:
        logger.info("%s received: draining before shutdown", signal_name)
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            self.drained = await drain(self.state, self.drain_timeout_s)
        finally:
            self.should_exit = True
