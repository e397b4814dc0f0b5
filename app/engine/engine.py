"""Engine: runs EngineCore on its own thread and bridges it to asyncio.

Only two messages flow in (add, abort) through a thread-safe inbox; deltas flow out
to each request's RequestStream through `loop.call_soon_threadsafe`, batched once
per step so the event loop wakes once per step, not once per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.config import Settings
from app.core import SamplingParams, TokenDelta
from app.engine.engine_core import EngineCore, EngineStats, StepStats
from app.engine.protocol import Runner, TokenizerLike
from app.engine.request_stream import RequestStream

logger = logging.getLogger("lamina.engine")

__all__ = ["Engine", "EngineDeadError", "EngineStats", "RequestStream", "StepStats"]


class EngineDeadError(RuntimeError):
    """The engine thread is not running; no request can be served."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    n: int
    arrival_time: float
    log_request_id: str | None = None  # the HTTP request id, for engine log lines
    client: str = ""  # whose work it is, for the scheduler's round-robin over clients
    priority: int = 0  # lower is served first


@dataclass
class _Abort:
    request_id: str
    reason: str


class _Stop:
    pass


class _Crash:
    """Test hook: make the engine thread die as if from an unexpected bug."""


class Engine:
    """The asyncio-facing engine. One thread owns the model, the cache and the scheduler."""

    def __init__(self, runner: Runner, tokenizer: TokenizerLike, settings: Settings) -> None:
        self.core = EngineCore(runner, tokenizer, settings)
        self.settings = settings
        self.max_model_len = runner.max_model_len
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # event-loop side
        self._lock = threading.Lock()  # orders "mark dead" against "accept a request"
        self._alive = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats = EngineStats()
        self.last_error: str | None = None

    # ------------------------------------------------------------ event-loop API
    def start(self) -> None:
        """Start the engine thread. Call from the running event loop."""
        self._loop = asyncio.get_running_loop()
        with self._lock:
            self._alive = True
        self._thread = threading.Thread(target=self._run, name="lamina-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._alive and self._thread is not None and self._thread.is_alive()

    def add_step_observer(self, observer: Callable[[StepStats], None]) -> None:
        """Register a callback run on the engine thread after every step (metrics)."""
        self.core.step_observers.append(observer)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        n: int = 1,
        log_request_id: str | None = None,
        client: str = "",
        priority: int = 0,
    ) -> RequestStream:
        """Submit a request of `n` choices; returns the RequestStream of its deltas.

        Read the stream until it ends (every choice has delivered a final delta);
        closing it early aborts the request. Call on the event loop. `log_request_id`
        (the HTTP request's id) goes on the engine thread's log lines about this request;
        `client` says whose work it is (the scheduler takes turns between clients);
        `priority`: lower is served first.
        Raises EngineDeadError if the engine thread is not running.
        """
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(request_id, n, self.abort)
        add = _Add(
            request_id, list(prompt_token_ids), params, n, time.monotonic(), log_request_id,
            client, priority,
        )  # fmt: skip
        with self._lock:
            if not self._alive:
                raise EngineDeadError(self._dead_message())
            self._streams[request_id] = stream
            self._inbox.put(add)
        return stream

    def abort(self, request_id: str, reason: str = "request aborted") -> None:
        """End a request with `reason` (deadline, drain, client gone). Thread-safe.

        Its stream ends at once: each unfinished choice gets a final ABORT delta whose
        `error` is `reason` (on the event loop now when called there, else at the loop's
        next turn); anything the engine still sends for it is dropped. The engine thread
        owns the KV cache, so its side is applied at the next step boundary: a step
        already running finishes first. Then, before the next step is scheduled, the
        engine thread drains its inbox and applies the abort: every unfinished sequence
        is finished and its KV blocks are released (full blocks stay in the prefix
        cache, unreferenced), so the next step never schedules the request and can use
        its blocks. An abort queued behind the request's own add is applied right after
        it, in the same drain, so the request never runs. Unknown or finished request
        ids are ignored.
        """
        self._inbox.put(_Abort(request_id, reason))
        loop = self._loop
        if loop is None:
            return
        if _running_loop() is loop:
            self._end_stream(request_id, reason)
        else:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens
                loop.call_soon_threadsafe(self._end_stream, request_id, reason)

    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the thread; every unfinished request receives an error delta."""
        self._inbox.put(_Stop())
        if self._thread is not None:
            self._thread.join(timeout_s)

    def crash_for_test(self) -> None:
        """Test hook: kill the engine thread the way an unexpected bug would."""
        self._inbox.put(_Crash())

    def _dead_message(self) -> str:
        reason = f": {self.last_error}" if self.last_error else ""
        return f"the engine is not running{reason}"

    # ----------------------------------------------------------- engine thread
    def _run(self) -> None:
        try:
            while self._handle_inbox(block=not self.core.has_unfinished()):
                if self.core.has_unfinished():
                    self._deliver(self.core.step())
                self._refresh_stats()
        except BaseException as exc:  # noqa: BLE001 - report every kind of death
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.exception("engine thread died")
        finally:
            self._die()

    def _handle_inbox(self, block: bool) -> bool:
        """Apply queued messages; block for the first one when idle. False on stop."""
        deltas: list[TokenDelta] = []
        try:
            message = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                if isinstance(message, _Stop):
                    self._deliver(deltas)
                    return False
                if isinstance(message, _Crash):
                    raise RuntimeError("engine thread crashed (test hook)")
                deltas.extend(self._apply(message))
                message = self._inbox.get_nowait()
        except queue.Empty:
            pass
        self._deliver(deltas)
        return True

    def _apply(self, message: object) -> list[TokenDelta]:
        if isinstance(message, _Add):
            return self.core.add_request(
                message.request_id,
                message.prompt_token_ids,
                message.params,
                message.n,
                message.arrival_time,
                log_request_id=message.log_request_id,
                client=message.client,
                priority=message.priority,
            )
        if isinstance(message, _Abort):
            return self.core.abort_request(message.request_id, message.reason)
        raise TypeError(f"unknown engine message {message!r}")

    def _refresh_stats(self) -> None:
        self._stats = self.core.stats(num_pending_requests=self._inbox.qsize())

    def _die(self) -> None:
        with self._lock:
            self._alive = False
        message = "the engine stopped" + (f": {self.last_error}" if self.last_error else "")
        deltas = self.core.abort_all(message)
        deltas.extend(self._fail_unseen_adds(message))
        self._deliver(deltas)
        self._refresh_stats()

    def _fail_unseen_adds(self, message: str) -> list[TokenDelta]:
        """Requests still in the inbox when the thread stops get an error, not silence."""
        deltas: list[TokenDelta] = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return deltas
            if isinstance(item, _Add):
                deltas.extend(
                    self.core.error_delta(item.request_id, i, len(item.prompt_token_ids), message)
                    for i in range(item.n)
                )

    def _deliver(self, deltas: list[TokenDelta]) -> None:
        """Hand a step's deltas to the event loop: one callback (one wake-up) per step.

        Never waits for the loop: call_soon_threadsafe only queues the callback."""
        if not deltas or self._loop is None:
            return
        # A closed loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._push_all, deltas)

    # ------------------------------------------------------------- event loop
    def _end_stream(self, request_id: str, reason: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.end(reason)

    def _push_all(self, deltas: list[TokenDelta]) -> None:
        streams = self._streams
        for delta in deltas:
            stream = streams.get(delta.request_id)
            if stream is not None and stream.push(delta):  # its last choice ended
                del streams[delta.request_id]


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # called from a thread without a loop
        return None
