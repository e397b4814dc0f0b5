"""The uvicorn server of a lamina process: its SIGTERM/SIGINT drain lamina first.

On the first signal it runs the drain (app/api/drain.py: refuse new work, let what is in
flight finish for at most LAMINA_DRAIN_TIMEOUT_S, stop the rest), then lets uvicorn
shut down: idle connections closed, at most SHUTDOWN_GRACE_S for anything else; the
lifespan shutdown stops the engine and the process exits 0. A second signal stops the
process at once (exit status 128 + signal number).

uvicorn's own handling would close the listening socket first, cut streams after its
graceful timeout and re-raise the signal after shutdown (exit status -15); lamina
installs its handler through `DrainingServer.handle_exit` instead. The listening socket
stays open during the drain so late arrivals get a 503, not a refused connection.
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

from app.api.drain import drain

if TYPE_CHECKING:
    from app.api.state import ServerState

logger = logging.getLogger("lamina")

# uvicorn's own graceful shutdown, after the drain: idle connections and quick routes.
SHUTDOWN_GRACE_S = 5


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
