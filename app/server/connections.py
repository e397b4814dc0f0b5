"""Open connections and the ones the server closed or refused, with their metrics and log.

One `ConnectionBook` per server, touched only from the event loop's thread (protocol
callbacks and timers), read at scrape time by `ConnectionCollector`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.metrics import PREFIX

logger = logging.getLogger("lamina")

# Why the server ended a connection itself (the label of connections_closed_total).
OVER_LIMIT = "over_limit"  # refused at accept: LAMINA_MAX_CONNECTIONS were busy
EVICTED = "evicted"  # closed at the cap to make room, having no request in flight
HEADER_TIMEOUT = "header_timeout"  # no complete request head within the header timeout
BODY_TIMEOUT = "body_timeout"  # the request body did not arrive within the body timeout
IDLE_TIMEOUT = "idle_timeout"  # keep-alive connection unused for the idle timeout
CLOSE_REASONS = (OVER_LIMIT, EVICTED, HEADER_TIMEOUT, BODY_TIMEOUT, IDLE_TIMEOUT)

# At most one summary line per interval, so an attack cannot flood the log.
LOG_INTERVAL_S = 10.0


class Evictable(Protocol):
    def evict(self) -> None:
        """Close now, to make room for a new connection."""


@dataclass(frozen=True)
class ConnectionLimits:
    """What one server allows each connection (seconds) and all of them together."""

    max_connections: int
    header_timeout_s: float
    body_timeout_s: float
    idle_timeout_s: float


class ConnectionBook:
    """Counts open connections, admits, evicts or refuses, and records server closures.

    At the cap, a new connection takes the place of the connection idle the longest (an
    attacker's idle or slow connections, or a keep-alive one a client can reopen), so
    /health and real requests still get in; it is refused only when every connection
    has a request in flight."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.num_open = 0
        # Connections with no request in flight (fresh, between requests, or still
        # sending a head or body), the one idle the longest first.
        self._idle: OrderedDict[Evictable, None] = OrderedDict()
        self.num_closed = dict.fromkeys(CLOSE_REASONS, 0)  # since start
        self._unlogged = dict.fromkeys(CLOSE_REASONS, 0)  # since the last log line
        self._last_log = -LOG_INTERVAL_S

    def admit(self, connection: Evictable) -> bool:
        """Count a new connection in (True), making room at the cap by evicting the
        connection idle the longest; with none idle, count it as refused (False)."""
        if self.num_open >= self.limits.max_connections:
            victim = next(iter(self._idle), None)
            if victim is None:
                self.record_closed(OVER_LIMIT)
                return False
            self.record_closed(EVICTED)
            victim.evict()  # calls on_closed: one place is free again
        self.num_open += 1
        self._idle[connection] = None
        return True

    @property
    def num_idle(self) -> int:
        """Open connections without a request in flight (evictable at the cap)."""
        return len(self._idle)

    def on_closed(self, connection: Evictable) -> None:
        """An admitted connection ended, whoever closed it (called once)."""
        self.num_open -= 1
        self._idle.pop(connection, None)

    def set_busy(self, connection: Evictable, busy: bool) -> None:
        """A connection starts (True) or stops (False) having a request in flight; an
        idle one becomes the newest idle."""
        self._idle.pop(connection, None)
        if not busy:
            self._idle[connection] = None

    def record_closed(self, reason: str) -> None:
        self.num_closed[reason] += 1
        self._unlogged[reason] += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_S:
            self._last_log = now
            self._log_summary()

    def _log_summary(self) -> None:
        counts = {reason: n for reason, n in self._unlogged.items() if n}
        self._unlogged = dict.fromkeys(CLOSE_REASONS, 0)
        summary = ", ".join(f"{n} {reason}" for reason, n in counts.items())
        logger.warning(
            "connections closed by the server: %s (%d open, at most %d; "
            "at most one such line per %g s, all counted in lamina:connections_closed_total)",
            summary, self.num_open, self.limits.max_connections, LOG_INTERVAL_S,
            extra={"connections_closed": counts, "connections_open": self.num_open},
        )  # fmt: skip


class ConnectionCollector(Collector):
    """`lamina:connections_open` and `lamina:connections_closed_total{reason}`, read from
    the book at scrape time."""

    def __init__(self, model_name: str, book: ConnectionBook) -> None:
        self._model_name = model_name
        self._book = book

    def collect(self) -> Iterable[Metric]:
        m = self._model_name
        open_ = GaugeMetricFamily(
            PREFIX + "connections_open", "Client connections open now.", labels=["model_name"]
        )
        open_.add_metric([m], self._book.num_open)
        yield open_
        closed = CounterMetricFamily(
            PREFIX + "connections_closed",
            "Connections the server refused (over_limit), evicted at the cap, or closed on a "
            "timeout.",
            labels=["model_name", "reason"],
        )
        for reason, count in self._book.num_closed.items():
            closed.add_metric([m, reason], count)
        yield closed
