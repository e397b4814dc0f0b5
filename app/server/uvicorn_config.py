"""The uvicorn configuration of a lamina server: its settings plus the connection guard."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import uvicorn

from app.config import Settings
from app.server.connections import ConnectionBook, ConnectionCollector, ConnectionLimits
from app.server.draining import SHUTDOWN_GRACE_S
from app.server.fd_limit import connection_cap, raise_fd_soft_limit
from app.server.protocol import guarded_protocol_class

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("lamina")


def connection_limits(settings: Settings) -> ConnectionLimits:
    """Raise the open-file limit, then the connection limits in effect (logged)."""
    fd_limit = raise_fd_soft_limit()
    limits = ConnectionLimits(
        max_connections=connection_cap(settings.max_connections, fd_limit),
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
    )
    logger.info(
        "connections: at most %d open (open-file limit %d); request head within %g s, "
        "body within %g s, keep-alive idle %g s",
        limits.max_connections, fd_limit, limits.header_timeout_s, limits.body_timeout_s,
        limits.idle_timeout_s,
    )  # fmt: skip
    return limits


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn.Config for `app` (made by app.main.create_app): host, port, lamina's own
    logging, and the connection guard, whose counters join the app's /metrics."""
    book = ConnectionBook(connection_limits(settings))
    app.state.metrics.registry.register(ConnectionCollector(settings.model_name, book))
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # app.logging_setup: one handler, one line format
        access_log=False,  # the access line is lamina's own (app/api/request_record.py)
        lifespan="on",
        # Connection cap, header/body read deadlines, half-close (app/server/protocol.py).
        http=guarded_protocol_class(book),
        ws="none",
        timeout_keep_alive=settings.idle_timeout_s,  # type: ignore[arg-type]  # a float works
        # The drain (app/api/drain.py) already waited for generation requests; what is
        # left when uvicorn shuts down is idle connections and quick routes.
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
