"""One streaming client of `lamina bench serve`: sends a completion, times every chunk."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestRecord:
    """Timings of one streamed request (seconds, time.perf_counter based)."""

    ok: bool
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float = 0.0
    output_tokens: int = 0
    chunk_gaps_s: list[float] = field(default_factory=list)  # inter-token latencies
    text: str = ""  # the completion's text, as streamed


@dataclass(frozen=True)
class Target:
    """One series of the sweep: a server, and what its requests add to the plain body."""

    name: str
    url: str
    body_extra: dict = field(default_factory=dict)
    seed_offset: int = 0  # its own prompts, so no series reads another's prefix cache


def completion_body(model: str, prompt: list[int], output_len: int) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> RequestRecord:
    """POST one streaming completion and record TTFT, gaps between chunks and usage."""
    start = time.perf_counter()
    last = None
    record = RequestRecord(ok=False)
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                record.error = f"HTTP {response.status_code}: {text}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    record.error = str(payload["error"])
                    return record
                usage = payload.get("usage")
                if usage:
                    record.output_tokens = usage.get("completion_tokens", 0)
                if not payload.get("choices"):
                    continue
                choice = payload["choices"][0]  # a completion's text or a chat's delta
                record.text += (
                    choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                )
                now = time.perf_counter()
                if last is None:
                    record.ttft_s = now - start
                else:
                    record.chunk_gaps_s.append(now - last)
                last = now
        record.ok = record.error is None
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.e2e_s = time.perf_counter() - start
    if record.ok and record.output_tokens == 0:
        # A server without include_usage: count one token per content chunk.
        record.output_tokens = len(record.chunk_gaps_s) + 1
    return record
