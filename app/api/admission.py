"""Admission control: bounds on the work in front of the engine. A ticket only counts.

Two steps, both on the event loop, each synchronous (checking and reserving is one
step, so concurrent arrivals cannot overshoot):

1. **The gate** (`admit`, from routes.admit, after the body is read and before it is
   validated): a cheap count of requests. A request counts as *waiting* from admission
   until its first token reaches the HTTP layer, then as *started*. It is admitted while

       num_waiting < max_queued + free running slots

   (free slots: LAMINA_MAX_NUM_SEQS minus the started requests; none while the engine
   reports sequences it could not schedule with running slots free, e.g. a full KV
   cache. Sequences waiting only for a slot are what the slots already count: a burst
   whose first requests run before their first token reaches HTTP still gets
   LAMINA_MAX_NUM_SEQS + LAMINA_MAX_QUEUED places).
2. **The weigh step** (`weigh`, from the route driver once the prompts are tokenized
   and `n` and `max_tokens` are known, before anything reaches the engine): the
   request's sequences (prompts x n) and its estimated tokens (prompt + max_tokens per
   sequence) are reserved against two budgets: at most `max_sequences` sequences
   (LAMINA_MAX_NUM_SEQS + LAMINA_MAX_QUEUED_SEQUENCES) and `max_tokens` tokens
   (LAMINA_MAX_ADMITTED_TOKENS; unset: what the KV cache holds, so admitted work never
   needs more cache than there is and no small request waits for blocks).

A request larger than a whole budget is a 413 naming it (it could never pass); one
that does not fit now is a 429 naming the bound hit, with Retry-After.

**Fair share.** Work is held per client (the API key when keys are configured, else
the client's address). While another client holds work or was refused in the last
CONTENTION_WINDOW_S seconds, one client may hold at most `client_share` of each bound
(requests, sequences, tokens); alone, it may use everything. So a few huge requests of
one client cannot keep another's small request out: once refused, the other client is
remembered, the big client's next requests are held to its share, and the retry finds
room.

Reservations are released with the ticket, when the response has ended (after the last
streamed byte, or when the client left). A ticket neither times nor stops anything:
the route driver's run keeps the deadline, the drain stops runs on `Serving.runs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.api.errors import APIError, request_too_large
from app.config import Settings
from app.metrics import PREFIX

RETRY_AFTER_S = 1  # a hint: the queue moves every engine step
# How long a refused client counts as waiting for its turn: clients retry after
# Retry-After (1 s), the openai SDKs back off up to 8 s.
CONTENTION_WINDOW_S = 10.0
QUEUED_SEQUENCES_PER_SLOT = 4  # LAMINA_MAX_QUEUED_SEQUENCES unset: 4 x LAMINA_MAX_NUM_SEQS

# Why a request was refused: the label of lamina:admission_rejected_total.
REQUESTS, SEQUENCES, TOKENS, CLIENT_SHARE, TOO_LARGE = (
    "requests",
    "sequences",
    "tokens",
    "client_share",
    "too_large",
)
REJECT_REASONS = (REQUESTS, SEQUENCES, TOKENS, CLIENT_SHARE, TOO_LARGE)


def overloaded(detail: str) -> APIError:
    return APIError(
        429,
        f"the server is at capacity: {detail}; retry in {RETRY_AFTER_S} s or on another replica",
        type="overloaded_error",
        code="server_overloaded",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def too_large(what: str, needed: int, bound: int, setting: str) -> APIError:
    return request_too_large(
        f"this request needs {needed} {what}, more than the server ever admits at once "
        f"({bound}: {setting}); split it into smaller requests"
    )


@dataclass
class Holding:
    """What one client (or one ticket) holds now."""

    num_requests: int = 0
    num_seqs: int = 0
    num_tokens: int = 0

    @property
    def empty(self) -> bool:
        return self.num_requests == 0


class Ticket:
    """One admitted generation request, from admission until its response has ended."""

    def __init__(self, controller: AdmissionController, client: str) -> None:
        self._controller = controller
        self.client = client
        self.num_seqs = 0  # reserved by the weigh step
        self.num_tokens = 0
        self.started = False  # its first token reached the HTTP layer
        self.released = False

    def mark_started(self) -> None:
        if not self.started and not self.released:
            self.started = True
            self._controller.num_started += 1

    def weigh(self, num_seqs: int, num_tokens: int) -> None:
        """Reserve the request's sequences and estimated tokens, or raise its 413/429."""
        self._controller.weigh(self, num_seqs, num_tokens)


class AdmissionController:
    """The HTTP side's count of generation work in flight. Event loop only."""

    def __init__(
        self,
        max_queued: int,
        max_running: int,
        *,
        max_sequences: int | None = None,
        max_tokens: int | None = None,
        client_share: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_queued = max_queued
        self.max_running = max_running  # requests the scheduler can start at once
        self.max_sequences = max_sequences  # None: unbounded
        self.max_tokens = max_tokens  # None: unbounded (until sized from the KV cache)
        self.client_share = client_share
        self._clock = clock
        self.num_in_flight = 0
        self.num_started = 0
        self.num_seqs = 0  # reserved by admitted requests
        self.num_tokens = 0
        self.rejected: Counter[str] = Counter()  # by reason (REJECT_REASONS)
        self._holdings: dict[str, Holding] = {}
        self._refused_at: OrderedDict[str, float] = OrderedDict()  # oldest first
        self._engine_backlog: Callable[[], bool] = lambda: False
        self._idle: asyncio.Event | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> AdmissionController:
        queued_seqs = settings.max_queued_sequences
        if queued_seqs is None:
            queued_seqs = QUEUED_SEQUENCES_PER_SLOT * settings.max_num_seqs
        return cls(
            settings.max_queued,
            settings.max_num_seqs,
            max_sequences=settings.max_num_seqs + queued_seqs,
            max_tokens=settings.max_admitted_tokens,
            client_share=settings.max_client_share,
        )

    def size_token_budget(self, max_tokens_in_cache: int | None) -> None:
        """Once the KV cache is allocated: an unset token budget becomes its size."""
        if self.max_tokens is None and max_tokens_in_cache is not None:
            self.max_tokens = max_tokens_in_cache

    # ------------------------------------------------------------------ counts
    @property
    def num_waiting(self) -> int:
        return self.num_in_flight - self.num_started

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    def has_room(self) -> bool:
        free_slots = 0 if self._engine_backlog() else max(0, self.max_running - self.num_started)
        return self.num_waiting < self.max_queued + free_slots

    def holding(self, client: str) -> Holding:
        return self._holdings.get(client) or Holding()

    # --------------------------------------------------------------- admission
    def admit(self, client: str = "") -> Ticket:
        """The gate: a place for one request, or the 429 (synchronous: no race)."""
        if not self.has_room():
            raise self._refuse(client, REQUESTS, f"{self.num_waiting} requests are already waiting")
        max_requests = self.max_running + self.max_queued
        held = self.holding(client).num_requests
        if self._over_share(client, held + 1, max_requests):
            detail = self._share_detail(held, 1, max_requests, "requests")
            raise self._refuse(client, CLIENT_SHARE, detail)
        holding = self._holdings.setdefault(client, Holding())
        holding.num_requests += 1
        self.num_in_flight += 1
        return Ticket(self, client)

    def weigh(self, ticket: Ticket, num_seqs: int, num_tokens: int) -> None:
        """The weigh step: reserve `num_seqs` sequences and `num_tokens` estimated tokens
        for an admitted request, or raise the 413 (larger than a whole budget) or the
        429 naming the bound it does not fit in now. Once per ticket."""
        if ticket.released or ticket.num_seqs:
            raise RuntimeError("a ticket is weighed once, while it is held")
        client = ticket.client
        self._check_size(client, num_seqs, self.max_sequences, "sequences",
                         "LAMINA_MAX_NUM_SEQS + LAMINA_MAX_QUEUED_SEQUENCES")  # fmt: skip
        self._check_size(client, num_tokens, self.max_tokens, "tokens",
                         "LAMINA_MAX_ADMITTED_TOKENS")  # fmt: skip
        if self.max_sequences is not None and self.num_seqs + num_seqs > self.max_sequences:
            raise self._refuse(client, SEQUENCES, self._fit_detail(
                num_seqs, self.num_seqs, self.max_sequences, "sequences"))  # fmt: skip
        if self.max_tokens is not None and self.num_tokens + num_tokens > self.max_tokens:
            raise self._refuse(client, TOKENS, self._fit_detail(
                num_tokens, self.num_tokens, self.max_tokens, "tokens (estimated)"))  # fmt: skip
        held = self.holding(client)
        for need, have, bound, unit in (
            (num_seqs, held.num_seqs, self.max_sequences, "sequences"),
            (num_tokens, held.num_tokens, self.max_tokens, "tokens"),
        ):
            if bound is not None and self._over_share(client, have + need, bound):
                detail = self._share_detail(have, need, bound, unit)
                raise self._refuse(client, CLIENT_SHARE, detail)
        ticket.num_seqs, ticket.num_tokens = num_seqs, num_tokens
        self.num_seqs += num_seqs
        self.num_tokens += num_tokens
        holding = self._holdings[client]
        holding.num_seqs += num_seqs
        holding.num_tokens += num_tokens

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.num_in_flight -= 1
        if ticket.started:
            self.num_started -= 1
        self.num_seqs -= ticket.num_seqs
        self.num_tokens -= ticket.num_tokens
        holding = self._holdings[ticket.client]
        holding.num_requests -= 1
        holding.num_seqs -= ticket.num_seqs
        holding.num_tokens -= ticket.num_tokens
        if holding.empty:
            del self._holdings[ticket.client]
        if self.num_in_flight == 0 and self._idle is not None:
            self._idle.set()

    # ------------------------------------------------------------- fair share
    def is_contended(self, client: str) -> bool:
        """Another client holds work, or was refused within CONTENTION_WINDOW_S."""
        self._forget_old_refusals()
        others_holding = len(self._holdings) - (client in self._holdings)
        others_refused = len(self._refused_at) - (client in self._refused_at)
        return others_holding > 0 or others_refused > 0

    def _over_share(self, client: str, amount: int, bound: int) -> bool:
        if self.client_share >= 1.0 or amount <= self._share_of(bound):
            return False
        return self.is_contended(client)

    def _share_of(self, bound: int) -> int:
        return max(1, int(bound * self.client_share))

    def _forget_old_refusals(self) -> None:
        horizon = self._clock() - CONTENTION_WINDOW_S
        while self._refused_at and next(iter(self._refused_at.values())) < horizon:
            self._refused_at.popitem(last=False)

    # ---------------------------------------------------------------- refusals
    def _refuse(self, client: str, reason: str, detail: str) -> APIError:
        self.rejected[reason] += 1
        self._refused_at.pop(client, None)
        self._refused_at[client] = self._clock()  # newest last
        return overloaded(detail)

    def _check_size(
        self, client: str, needed: int, bound: int | None, what: str, setting: str
    ) -> None:
        if bound is not None and needed > bound:
            self.rejected[TOO_LARGE] += 1
            raise too_large(what, needed, bound, setting)

    @staticmethod
    def _fit_detail(needed: int, admitted: int, bound: int, unit: str) -> str:
        return f"{admitted} of {bound} {unit} are admitted and this request needs {needed}"

    def _share_detail(self, held: int, needed: int, bound: int, unit: str) -> str:
        return (
            f"this client holds {held} {unit} and this request needs {needed}, but while "
            f"other clients wait one client may hold at most {self._share_of(bound)} of the "
            f"{bound} {unit} admitted"
        )

    # ------------------------------------------------------------------ drain
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
        """Read the engine's backlog from its stats() when it has one: sequences it
        could not schedule although running slots were free."""
        stats = getattr(engine, "stats", None)
        if callable(stats):

            def backlog() -> bool:
                now = stats()
                return now.num_waiting > 0 and now.num_running < self.max_running

            self._engine_backlog = backlog


class AdmissionCollector(Collector):
    """Admission control at scrape time: `lamina:admission_rejected_total{reason}` and the
    work admitted now (`lamina:admitted_sequences`, `lamina:admitted_tokens`), read from
    the controller's own counts, like the connection metrics (app/server/connections.py)."""

    def __init__(self, model_name: str, controller: AdmissionController) -> None:
        self._model_name = model_name
        self._controller = controller

    def collect(self) -> Iterable[Metric]:
        m, controller = self._model_name, self._controller
        rejected = CounterMetricFamily(
            PREFIX + "admission_rejected",
            "Generation requests refused by admission control, by the bound hit: requests, "
            "sequences, tokens, client_share (429) or too_large (413).",
            labels=["model_name", "reason"],
        )
        for reason in REJECT_REASONS:
            rejected.add_metric([m, reason], controller.rejected[reason])
        yield rejected
        for name, doc, value in (
            ("admitted_sequences", "Sequences of admitted generation requests.",
             controller.num_seqs),
            ("admitted_tokens", "Estimated tokens (prompt + max_tokens per sequence) of "
             "admitted generation requests.", controller.num_tokens),
        ):  # fmt: skip
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            gauge.add_metric([m], value)
            yield gauge
