"""Streaming clients for the reliability tests: one request on any generation route,
read event by event, optionally leaving after a given number of events.

`Outcome` records what the client saw (status, events, the final token count the
server reported, an error event) so tests can say exactly which requests completed.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httpx

ROUTES = ("completions", "chat", "tgi")
PATHS = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
    "tgi": "/generate_stream",
}


def stream_body(route: str, prompt: str, max_tokens: int, temperature: float = 0.0) -> dict:
    """A streaming request for `route` with an exact length where the route allows it
    (ignore_eos on the OpenAI routes; TGI has no such switch)."""
    if route == "tgi":
        parameters: dict[str, Any] = {"max_new_tokens": max_tokens, "details": True}
        if temperature > 0:
            parameters.update(do_sample=True, temperature=temperature)
        return {"inputs": prompt, "parameters": parameters}
    body: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if route == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


@dataclass
class Outcome:
    route: str
    max_tokens: int
    status: int = 0
    num_events: int = 0  # data events carrying a choice or a token
    completion_tokens: int | None = None  # what the server reported at the end
    prompt_tokens: int | None = None  # likewise (the OpenAI routes' usage)
    finish_reason: str | None = None
    done: bool = False  # the stream reached its end ([DONE], or TGI's final event)
    error: dict | None = None  # an error event, or the error body of a non-200
    retry_after: str | None = None
    left_early: bool = False  # the client disconnected on purpose

    @property
    def complete(self) -> bool:
        """Every token the request asked for reached the client, and the stream ended."""
        if self.status != 200 or not self.done or self.error is not None:
            return False
        if self.route == "tgi":  # may stop at EOS; all generated tokens must have arrived
            full = self.finish_reason != "length" or self.completion_tokens == self.max_tokens
            return full and self.completion_tokens == self.num_events
        return self.finish_reason == "length" and self.completion_tokens == self.max_tokens

    def read(self, payload: dict) -> None:
        if "error" in payload:
            self.error = payload["error"]
            return
        if self.route == "tgi":
            self.num_events += 1
            details = payload.get("details")
            if details is not None:
                self.completion_tokens = details["generated_tokens"]
                self.finish_reason = details["finish_reason"]
                self.done = True
            return
        for choice in payload.get("choices", []):
            self.num_events += 1
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if payload.get("usage"):
            self.completion_tokens = payload["usage"]["completion_tokens"]
            self.prompt_tokens = payload["usage"]["prompt_tokens"]


async def stream_request(
    client: httpx.AsyncClient,
    base_url: str,
    route: str,
    body: dict,
    leave_after_events: int | None = None,
    headers: dict[str, str] | None = None,
    first_event: asyncio.Event | None = None,
) -> Outcome:
    """POST a streaming request and read it; leave after `leave_after_events` data events
    (0: right after the response headers) when given. `first_event` is set once the
    first data event arrived (or the request ended without one)."""
    try:
        return await _stream(
            client, base_url, route, body, leave_after_events, headers, first_event
        )
    finally:
        if first_event is not None:
            first_event.set()


async def _stream(
    client: httpx.AsyncClient,
    base_url: str,
    route: str,
    body: dict,
    leave_after_events: int | None,
    headers: dict[str, str] | None,
    first_event: asyncio.Event | None,
) -> Outcome:
    outcome = Outcome(route, _max_tokens(route, body))
    async with client.stream("POST", base_url + PATHS[route], json=body, headers=headers) as r:
        outcome.status = r.status_code
        outcome.retry_after = r.headers.get("retry-after")
        if r.status_code != 200:
            await r.aread()
            outcome.error = r.json().get("error")
            return outcome
        if leave_after_events == 0:
            outcome.left_early = True
            return outcome
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators and keep-alive comments
            payload = line.removeprefix("data:").strip()
            if payload == "[DONE]":
                outcome.done = True
                break
            outcome.read(json.loads(payload))
            if first_event is not None:
                first_event.set()
            if leave_after_events is not None and outcome.num_events >= leave_after_events:
                outcome.left_early = True
                return outcome
    return outcome


def _max_tokens(route: str, body: dict) -> int:
    if route == "tgi":
        return body["parameters"]["max_new_tokens"]
    return body["max_tokens"]
