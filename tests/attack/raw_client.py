"""Raw-socket clients for the attack suite: what an unfriendly client or a broken proxy
sends, below any HTTP library. Each returns how long the server kept it open."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Closed:
    """A connection the server ended: after `elapsed_s` (from the moment the client
    finished what it meant to send on time), having sent `data`."""

    elapsed_s: float
    data: bytes

    @property
    def status(self) -> int | None:
        if not self.data.startswith(b"HTTP/1.1 "):
            return None
        return int(self.data[9:12])


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionError:  # a reset after the server's close: what came before counts
        pass
    return data


async def open_idle(port: int) -> Closed:
    """Connect and send nothing."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = await read_to_eof(reader)
    writer.close()
    return Closed(time.monotonic() - start, data)


async def drip_until_closed(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    drip: Coroutine[Any, Any, None],
    start: float,
) -> Closed:
    """Run `drip` (a coroutine writing slowly) until the server closes the connection;
    the time counts from `start`."""
    dripping = asyncio.ensure_future(drip)
    data = await read_to_eof(reader)
    elapsed = time.monotonic() - start
    dripping.cancel()
    await asyncio.gather(dripping, return_exceptions=True)
    writer.close()
    return Closed(elapsed, data)


async def slowloris(port: int, interval_s: float) -> Closed:
    """Send a request head one byte every `interval_s`, never finishing it."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 10_000

    async def drip() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(interval_s)

    return await drip_until_closed(reader, writer, drip(), start)


async def slow_body(port: int, interval_s: float) -> Closed:
    """Send a complete head announcing 1,000 body bytes, then one byte every `interval_s`.
    The time counts from the end of the head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    await writer.drain()
    start = time.monotonic()

    async def drip() -> None:
        while True:
            await asyncio.sleep(interval_s)
            writer.write(b" ")
            await writer.drain()

    return await drip_until_closed(reader, writer, drip(), start)


async def idle_after_request(port: int) -> Closed:
    """GET /health with keep-alive, then stay silent. The time counts from the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    start = time.monotonic()
    data = await read_to_eof(reader)
    writer.close()
    return Closed(time.monotonic() - start, head + data)


def half_closed_request(port: int, path: str, body: dict, timeout_s: float = 60.0) -> bytes:
    """POST `body` as JSON, shut the socket's sending side (SHUT_WR), read the answer."""
    import socket

    payload = json.dumps(body).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def connection_metrics(url: str) -> dict[str, float]:
    """`connections_open` and `closed:<reason>` from GET /metrics."""
    text = httpx.get(url + "/metrics", timeout=10.0).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lamina:connections_open":
                found["open"] = sample.value
            elif sample.name == "lamina:connections_closed_total":
                found["closed:" + sample.labels["reason"]] = sample.value
    return found
