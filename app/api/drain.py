"""Graceful drain: what a lamina process does with its requests before it stops.

On the first SIGTERM/SIGINT (app/server/draining.py, the process's uvicorn server):
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
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from app.api.deadline import drain_timeout_exceeded

if TYPE_CHECKING:
    from app.api.state import ServerState

logger = logging.getLogger("lamina")

# After the drain timeout, stopped requests need a moment to send their error and close.
STOP_GRACE_S = 5.0


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
