"""The route driver: one story for every generation route, told in the route's dialect.

    admit (routes.admit: a Call) -> parse (dialect) -> weigh (the ticket: sequences and
    estimated tokens) -> engine requests -> stream frames or collect -> usage and the
    request record -> answer (dialect)

A `Dialect` (dialect_openai.py, dialect_tgi.py) parses its request into engine inputs
when it is built and renders deltas, the final answer and the usage chunk; `drive`
does the rest the same way for all of them. A request with several prompts becomes one
engine request per prompt (each with its n choices); choice index = prompt index * n +
delta.index, as OpenAI numbers them.

A request ends early through one call, `engine.abort(request_id, reason)`: its
deadline (the run's own timer) or the drain (which stops every run on `Serving.runs`)
through `Run.stop`, or the client leaving (`Run.aclose`). The engine ends the stream
with an ABORT delta at once; the run answers it with the error that stopped it (504,
503), or, for an abort it did not ask for (the engine shutting down), a 503
`request_aborted`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeVar

import anyio
from fastapi import Request

from app.api.admission import Ticket
from app.api.constraints import RequestedConstraint, compile_constraint
from app.api.deadline import Deadline, deadline_exceeded
from app.api.engine_client import EngineClient, EngineDeadError
from app.api.errors import (
    APIError,
    ClientDisconnected,
    invalid_request,
    server_error,
    service_unavailable,
)
from app.api.request_record import RequestRecord, Usage
from app.api.route_facts import facts_for
from app.api.sse import DONE, KEEPALIVE, EventStreamResponse, sse_event
from app.api.state import Serving
from app.core import FinishReason, PromptTokenLogprob, SamplingParams, TokenDelta, TokenLogprob
from app.engine.request_stream import RequestStream, wait_for_delivery

logger = logging.getLogger("lamina.api")

T = TypeVar("T")
# What a response that ends before its engine requests do tells the engine.
RESPONSE_CLOSED = "the response ended before the request finished (client gone or a failure)"


@dataclass
class ChoiceResult:
    """Everything one choice produced, for non-streaming answers."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_tokens: int = 0  # as the engine counted them (its final delta's usage)
    # Prompt outputs (first delta), when the request asked: per prompt token, pooled
    prompt_logprobs: tuple[PromptTokenLogprob | None, ...] = ()
    embedding: tuple[float, ...] | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def add(self, delta: TokenDelta) -> None:
        self.text_parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.embedding is not None:
            self.embedding = delta.embedding
        if delta.finished:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
            usage = delta.usage
            self.num_tokens = usage.completion_tokens if usage else len(self.token_ids)


@dataclass(frozen=True)
class Call:
    """One admitted generation request, as the routes' gate (routes.admit) hands it over."""

    request: Request
    serving: Serving
    record: RequestRecord
    ticket: Ticket
    deadline: Deadline | None  # from admission on
    # The priority its API key gives it (LAMINA_API_KEYS `key:N`); None: none given.
    key_priority: int | None = None


class Dialect:
    """One request in one API's dialect: its engine inputs and how its answer looks.

    A subclass is built from the request, `Subclass(body, serving, request_id, stream)`:
    its constructor parses the body (every check that can refuse the request runs
    there, before any engine request or stream opens, so a bad streaming request still
    gets a real 4xx status) and hands its engine inputs to this one. It renders the
    answer from deltas.
    """

    id_prefix: ClassVar[str]  # of the response id, e.g. "chatcmpl"
    priority_param: ClassVar[str] = "priority"  # the body's field, for errors

    def __init__(
        self,
        request_id: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
        n: int,
        stream: bool,
    ) -> None:
        # The response id carries the HTTP request's id (X-Request-Id), so the id a
        # client sees is the one in the server's logs.
        self.response_id = f"{self.id_prefix}-{request_id}"
        self.prompts = prompts  # token ids, one list per prompt
        self.params = params  # one per prompt (max_tokens fitted to each prompt)
        self.n = n  # choices per prompt
        self.stream = stream
        self.created = int(time.time())
        self.constraint: RequestedConstraint | None = None  # what the body asks the output to match
        self.priority = 0  # the engine's scheduling priority: lower is served first

    @staticmethod
    def requested_priority(body: Any) -> int | None:
        """The `priority` the body asks for (None: not sent)."""
        return getattr(body, "priority", None)

    async def compile_constraints(self, serving: Serving) -> None:
        """The async part of parsing: compile what the request asks the output to match
        (`self.constraint`, set by the constructor) into its params (a 4xx if it cannot be),
        before any engine request opens."""
        if self.constraint is None:
            return
        compiled = await compile_constraint(self.constraint, serving.constraints)
        self.params = [replace(p, constraint=compiled) for p in self.params]

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def opening(self) -> Iterable[bytes]:
        """Frames sent before any token (streaming)."""
        return ()

    def render_delta(self, choice_index: int, delta: TokenDelta) -> Iterable[bytes]:
        """The frames of one delta of one choice (streaming)."""
        raise NotImplementedError

    def closing(self, usage: Usage) -> Iterable[bytes]:
        """Frames after every choice ended (streaming)."""
        return ()

    def render_final(self, results: list[ChoiceResult], usage: Usage) -> Any:
        """The whole answer (not streaming)."""
        raise NotImplementedError

    def on_start(self, run: Run) -> None:
        """The run exists (engine requests queued); a dialect that can stop it later (a
        cancel) keeps it."""

    def stream_failure(self, error: APIError, tgi: bool) -> bytes:
        """The frames that end a stream cut short by `error`: its 200 is already sent, so
        the error goes in an event (with TGI's `error_type` on TGI routes)."""
        return sse_event(error.body(tgi)) + DONE

    def failed_answer(self, error: APIError) -> Any:
        """The answer to a request (not streaming) that `error` ended: the error itself,
        unless the dialect answers such an end in its own shape (a cancelled response)."""
        raise error

    def on_end(self) -> None:
        """The run ended, however it did (called once per close, maybe twice)."""


# A dialect's class: built from (body, serving, request id, stream), it parses the body.
DialectType = Callable[[Any, Serving, str, bool], Dialect]


def is_failure(delta: TokenDelta) -> bool:
    return delta.finish_reason in (FinishReason.ERROR, FinishReason.ABORT)


def estimated_tokens(dialect: Dialect, max_model_len: int) -> int:
    """The KV tokens a request may fill: prompt + max_tokens for each of its sequences
    (a prompt shared by n choices counts n times: an upper bound, like max_tokens)."""
    total = 0
    for prompt, params in zip(dialect.prompts, dialect.params):
        max_tokens = params.max_tokens
        per_seq = max_model_len if max_tokens is None else len(prompt) + max_tokens
        total += per_seq * dialect.n
    return total


async def drive(call: Call, dialect_type: DialectType, body: Any, stream: bool):
    """Parse `body` in the route's dialect, run it and answer: an event stream, or the
    dialect's answer."""
    record, serving = call.record, call.serving
    # First: a request refused below still logs its end-user id (OpenAI's `user`).
    record.note_user(getattr(body, "user", None))
    serving.model.check_named(getattr(body, "model", None))  # TGI's bodies name none
    dialect = dialect_type(body, serving, record.request_id, stream)
    dialect.priority = resolve_priority(
        dialect.requested_priority(body), call.key_priority, dialect.priority_param
    )
    record.priority = dialect.priority
    # The weigh step of admission, before a grammar compiles or the engine sees anything.
    call.ticket.weigh(dialect.num_choices, estimated_tokens(dialect, serving.limits.max_model_len))
    await dialect.compile_constraints(serving)
    run = Run(serving.engine, dialect, record, call.ticket, call.deadline, serving.runs)
    dialect.on_start(run)
    if dialect.stream:
        tgi_errors = facts_for(call.request.url.path).tgi_errors
        frames = run.frames(serving.limits.settings.keepalive_interval_s, tgi_errors)
        return EventStreamResponse(frames, on_close=run.aclose)
    try:
        results = await unless_disconnected(call.request, run.collect())
    except APIError as error:
        return dialect.failed_answer(error)
    finally:
        await run.aclose()
    return dialect.render_final(results, run.usage)


def resolve_priority(requested: int | None, key_priority: int | None, param: str) -> int:
    """The request's scheduling priority: as asked, else its key's, else 0. A key's
    priority is also the most urgent its requests may ask for (a 400 otherwise), so a
    batch key cannot jump ahead of interactive ones by asking."""
    if requested is None:
        return 0 if key_priority is None else key_priority
    if key_priority is not None and requested < key_priority:
        raise invalid_request(
            f"`{param}` is {requested}; this API key's requests may ask for {key_priority} "
            "or more (lower is more urgent)",
            param=param,
        )
    return requested


class Run:
    """The engine requests of one HTTP request, read as one stream of (choice, delta).

    It keeps the request's deadline (a timer that stops it) and, while it runs, its
    place in `runs` (Serving.runs, where the drain finds what to stop).
    """

    def __init__(
        self,
        engine: EngineClient,
        dialect: Dialect,
        record: RequestRecord,
        ticket: Ticket | None = None,
        deadline: Deadline | None = None,
        runs: set[Any] | None = None,
    ) -> None:
        self.engine = engine
        self.dialect = dialect
        self.record = record
        self.ticket = ticket
        self.stopped_with: APIError | None = None  # the deadline or drain that stopped it
        self.streams: list[RequestStream] = []
        self._runs = runs if runs is not None else set()
        self._timer: asyncio.TimerHandle | None = None
        base_id = record.engine_request_id(dialect.response_id)
        several = len(dialect.prompts) > 1
        client = ticket.client if ticket is not None else ""
        try:
            for index, (prompt, params) in enumerate(zip(dialect.prompts, dialect.params)):
                engine_id = f"{base_id}-{index}" if several else base_id
                self.streams.append(
                    engine.add_request(
                        engine_id,
                        prompt,
                        params,
                        dialect.n,
                        record.request_id,
                        client,
                        dialect.priority,
                    )  # fmt: skip
                )
        except EngineDeadError as exc:
            for stream in self.streams:  # prompts already queued must not run alone
                engine.abort(stream.request_id, "another prompt of the request failed")
            message = str(exc) or "the engine is not running"
            raise service_unavailable(message, "engine_dead") from None
        record.start_generation(dialect.prompts, dialect.n)
        self._runs.add(self)
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(deadline.at, self._on_deadline, deadline.timeout_s)

    @property
    def finished(self) -> bool:
        """Every choice has delivered its final delta (or the run was closed)."""
        return all(stream.finished for stream in self.streams)

    @property
    def delivered(self) -> bool:
        """Every choice's final delta was read (not cut short by a close)."""
        return all(stream.delivered for stream in self.streams)

    @property
    def usage(self) -> Usage:
        return self.record.usage

    def stop(self, error: APIError) -> None:
        """End the request now with `error` (its deadline, the drain's last resort); the
        first stop wins."""
        if self.stopped_with is not None:
            return
        self.stopped_with = error
        for stream in self.streams:
            if not stream.finished:
                self.engine.abort(stream.request_id, error.message)

    def _on_deadline(self, timeout_s: float) -> None:
        # A request whose last token is out (only its final frames are still being
        # written) finished in time: it is neither stopped nor counted as a timeout.
        if not self.finished and self.stopped_with is None:
            self.record.fail("timeout")  # before the abort, which would count as "aborted"
            self.stop(deadline_exceeded(timeout_s))

    def failure(self, delta: TokenDelta) -> APIError:
        """The error to answer for a choice that ended with ERROR or ABORT."""
        if self.stopped_with is not None:
            return self.stopped_with
        if delta.finish_reason is FinishReason.ABORT:
            return service_unavailable(
                f"the request was aborted: {delta.error or 'the server is shutting down'}",
                code="request_aborted",
            )
        return server_error(
            f"generation failed: {delta.error or 'engine error'}", "generation_error"
        )

    async def next_batch(self, timeout_s: float | None) -> list[tuple[int, TokenDelta]]:
        """Every delta ready now as (choice index, delta), waiting for at least one;
        [] when `timeout_s` passed first. Raises StopAsyncIteration at the end."""
        if self.finished:
            raise StopAsyncIteration
        batch = self._take_ready()
        if not batch:
            await wait_for_delivery([s for s in self.streams if not s.finished], timeout_s)
            batch = self._take_ready()
        return batch

    def _take_ready(self) -> list[tuple[int, TokenDelta]]:
        n, record = self.dialect.n, self.record
        batch = []
        for prompt_index, stream in enumerate(self.streams):
            for delta in stream.take_ready():
                choice_index = prompt_index * n + delta.index
                record.on_delta(choice_index, delta)
                batch.append((choice_index, delta))
        if batch and self.ticket is not None and self.stopped_with is None:
            self.ticket.mark_started()  # its first token reached the HTTP layer
        return batch

    async def collect(self) -> list[ChoiceResult]:
        """Read every delta; raise the failure if a choice failed."""
        results = [ChoiceResult(index=i) for i in range(self.dialect.num_choices)]
        while True:
            try:
                batch = await self.next_batch(None)
            except StopAsyncIteration:
                return results
            for choice_index, delta in batch:
                if is_failure(delta):
                    raise self.failure(delta)
                results[choice_index].add(delta)

    async def frames(self, keepalive_s: float, tgi: bool = False) -> AsyncIterator[bytes]:
        """The frames of one streamed answer.

        Every delta that is ready when the run is read (one engine step's worth, or more
        when we fell behind) is rendered into one chunk, so the response makes one
        socket write per step instead of one per token; the last step's chunk also
        carries the closing frames. Silences longer than `keepalive_s` get a comment
        frame. A choice that fails, or a bug while rendering, ends the stream with an
        error event and [DONE]. The run is always closed, so a client that leaves aborts
        its request. Error events carry TGI's `error_type` with `tgi`.
        """
        dialect = self.dialect
        try:
            frames = list(dialect.opening())
            if frames:
                yield b"".join(frames)
            closed = False
            while not closed:
                try:
                    batch = await self.next_batch(keepalive_s)
                except StopAsyncIteration:
                    break
                if not batch:
                    yield KEEPALIVE
                    continue
                frames = []
                for choice_index, delta in batch:
                    if is_failure(delta):
                        yield b"".join([*frames, dialect.stream_failure(self.failure(delta), tgi)])
                        return
                    frames.extend(dialect.render_delta(choice_index, delta))
                if self.finished:
                    frames.extend(dialect.closing(self.usage))
                    closed = True
                if frames:
                    yield b"".join(frames)
        except Exception:
            logger.exception("stream %s failed", dialect.response_id)
            self.record.fail("error")
            yield dialect.stream_failure(server_error("internal server error while streaming"), tgi)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Abort what is unfinished and stop reading (shielded: it also runs while the
        surrounding task is being cancelled). Closing twice changes nothing."""
        self.record.close_generation()
        self.dialect.on_end()
        self._runs.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        with anyio.CancelScope(shield=True):
            for stream in self.streams:
                if not stream.finished:
                    self.engine.abort(stream.request_id, RESPONSE_CLOSED)
                await stream.aclose()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body must already be read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work_task.done():
            work_task.cancel()
        watcher.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait({work_task, watcher})
    if work_task.cancelled():
        raise ClientDisconnected()
    return work_task.result()
