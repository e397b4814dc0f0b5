"""One HTTP request's engine requests, merged into one stream of (choice index, delta).

A request with several prompts becomes one engine request per prompt (each with its n
choices); choice index = prompt index * n + delta.index, as OpenAI numbers them.
Closing a `Generation` closes every engine stream, which aborts unfinished requests:
routes close it in `finally`, so a client that leaves (or a cancelled task) frees its
sequences in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from starlette.requests import Request

from app.api.admission import ExpiredDelta
from app.api.engine_client import EngineClient, EngineDeadError, RequestStream
from app.api.errors import APIError, ClientDisconnected, server_error, service_unavailable
from app.api.request_record import GenerationObserver, current_request_id, engine_request_id
from app.core import FinishReason, SamplingParams, TokenDelta, TokenLogprob, Usage

logger = logging.getLogger("lamina.api")

T = TypeVar("T")


def new_request_id(prefix: str) -> str:
    """The response id (e.g. `chatcmpl-3f2a...`): the prefix and the HTTP request's id
    (X-Request-Id), so the id a client sees is the one in the server's logs."""
    return f"{prefix}-{current_request_id() or uuid.uuid4().hex}"


def engine_failure(delta: TokenDelta) -> APIError:
    """The error to report for a choice that ended with ERROR or ABORT."""
    if isinstance(delta, ExpiredDelta) and delta.api_error is not None:
        return delta.api_error  # its deadline or the drain timeout stopped it (admission.py)
    if delta.finish_reason is FinishReason.ABORT:
        return service_unavailable(
            f"the request was aborted: {delta.error or 'the server is shutting down'}",
            code="request_aborted",
        )
    return server_error(f"generation failed: {delta.error or 'engine error'}", "generation_error")


def is_failure(delta: TokenDelta) -> bool:
    return delta.finish_reason in (FinishReason.ERROR, FinishReason.ABORT)


@dataclass
class ChoiceResult:
    """Everything one choice produced, for non-streaming answers."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def add(self, delta: TokenDelta) -> None:
        self.text_parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.finished:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
            self.usage = delta.usage


@dataclass
class UsageTally:
    """Token counts of a whole HTTP request: each prompt counted once, all choices' output."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add_final(self, delta: TokenDelta, first_of_prompt: bool) -> None:
        if delta.usage is None:
            return
        self.completion_tokens += delta.usage.completion_tokens
        if first_of_prompt:
            self.cached_tokens += delta.usage.cached_tokens


def _reads_batches(stream: RequestStream) -> bool:
    supports = getattr(stream, "supports_batches", None)
    if supports is not None:
        return bool(supports)
    return callable(getattr(stream, "next_batch", None))


class Generation:
    """The engine streams of one HTTP request, read as one merged stream."""

    def __init__(
        self,
        engine: EngineClient,
        request_id: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
        n: int,
    ) -> None:
        self.request_id = request_id
        self.n = n
        self.prompts = prompts
        self.num_choices = len(prompts) * n
        self.usage = UsageTally(prompt_tokens=sum(len(p) for p in prompts))
        self._streams: list[RequestStream] = []
        self._pending: dict[asyncio.Future[TokenDelta], int] = {}
        self._started = False
        self._closed = False
        base_id = engine_request_id(request_id)
        engine_ids: list[str] = []
        try:
            for prompt_index, (prompt, prompt_params) in enumerate(zip(prompts, params)):
                engine_id = base_id if len(prompts) == 1 else f"{base_id}-{prompt_index}"
                self._streams.append(engine.generate(engine_id, prompt, prompt_params, n=n))
                engine_ids.append(engine_id)
        except EngineDeadError as exc:
            for engine_id in engine_ids:  # prompts already queued must not run alone
                engine.abort(engine_id)
            self._closed = True
            message = str(exc) or "the engine is not running"
            raise service_unavailable(message, code="engine_dead") from None
        self._observer = GenerationObserver(prompts, n)  # metrics and the access log
        self._num_finished = 0
        # One stream with batches: read it directly (next_batch); else merge with futures.
        self._batched = len(self._streams) == 1 and _reads_batches(self._streams[0])

    @property
    def finished(self) -> bool:
        """Every choice has delivered its final delta."""
        return self._num_finished >= self.num_choices

    def _schedule(self, prompt_index: int) -> None:
        future = asyncio.ensure_future(self._streams[prompt_index].__anext__())
        self._pending[future] = prompt_index

    def _seen(self, prompt_index: int, delta: TokenDelta) -> tuple[int, TokenDelta]:
        """Account for one delta (usage, metrics); returns it with its choice index."""
        choice_index = prompt_index * self.n + delta.index
        if delta.finished:
            self._num_finished += 1
            self.usage.add_final(delta, first_of_prompt=delta.index == 0)
        self._observer.on_delta(choice_index, delta)
        return choice_index, delta

    async def next_batch(self, timeout_s: float | None = None) -> list[tuple[int, TokenDelta]]:
        """Every delta ready now as (choice index, delta), waiting for at least one;
        [] when `timeout_s` passed first. Raises StopAsyncIteration at the end.

        One engine stream that can hand over batches (the common case: one prompt, any
        n) is read directly: no task, no future per delta, and the deltas of one engine
        step come back together so the caller can write them in one frame.
        """
        if self._batched:
            deltas = await self._streams[0].next_batch(timeout_s)
            return [self._seen(0, delta) for delta in deltas]
        item = await self.next_delta(timeout_s)
        return [] if item is None else [item]

    async def next_delta(self, timeout_s: float | None = None) -> tuple[int, TokenDelta] | None:
        """The next delta as (choice index, delta); None when `timeout_s` passed first.

        Raises StopAsyncIteration when every engine stream has ended.
        """
        if self._batched:
            raise TypeError("this generation is read with next_batch")
        if not self._started and not self._closed:
            self._started = True
            for prompt_index in range(len(self._streams)):
                self._schedule(prompt_index)
        while self._pending:
            done, _ = await asyncio.wait(
                self._pending, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                return None
            future = next(iter(done))
            prompt_index = self._pending.pop(future)
            try:
                delta = future.result()
            except StopAsyncIteration:
                continue  # that prompt's stream is over; wait for the others
            self._schedule(prompt_index)
            return self._seen(prompt_index, delta)
        raise StopAsyncIteration

    async def collect(self) -> list[ChoiceResult]:
        """Read every delta; raise the engine's failure if a choice failed."""
        results = [ChoiceResult(index=i) for i in range(self.num_choices)]
        while True:
            try:
                batch = await self.next_batch()
            except StopAsyncIteration:
                return results
            for choice_index, delta in batch:
                if is_failure(delta):
                    raise engine_failure(delta)
                results[choice_index].add(delta)

    async def aclose(self) -> None:
        """Stop reading and close every engine stream (aborting unfinished requests).

        Shielded: it also runs while the surrounding task is being cancelled.
        """
        if self._closed:
            return
        self._closed = True
        self._observer.on_close()
        with anyio.CancelScope(shield=True):
            for future in self._pending:
                future.cancel()
            if self._pending:
                await asyncio.wait(self._pending)
            for future in self._pending:
                if not future.cancelled():
                    future.exception()  # retrieved: the outcome no longer matters
            self._pending.clear()
            for stream in self._streams:
                try:
                    await stream.aclose()
                except Exception:  # closing must not hide the original outcome
                    logger.exception("closing engine stream of %s failed", self.request_id)


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
