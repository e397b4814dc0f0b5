"""The connection guard (app/server/protocol.py) in an in-process uvicorn with a small
ASGI app: what it must never cut (long streams, slow answers, a head or body that
arrives in pieces within its deadline, pipelining, keep-alive), a half-closed client
answered even when its answer comes late, and the fd-limit helpers."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from app.server.connections import ConnectionBook, ConnectionLimits
from app.server.fd_limit import FD_RESERVE, connection_cap
from app.server.protocol import PROBE, PROBE_INTERVAL_S, guarded_protocol_class
from tests.server_process import free_port

pytestmark = pytest.mark.timeout(60)

# Every response of the app below takes longer than any of these.
LIMITS = ConnectionLimits(
    max_connections=8, header_timeout_s=0.5, body_timeout_s=0.5, idle_timeout_s=0.5
)
SLOW_S = 1.5


# (time.monotonic(), message type) each time /until-disconnect saw its client leave.
DISCONNECTS: list[tuple[float, str]] = []


async def app(scope, receive, send) -> None:
    """/stream: a chunk every 0.25 s for SLOW_S; /late: one answer after SLOW_S;
    /until-disconnect: no answer, waits for the client to leave; anything else: echoes
    the request body."""
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    path = scope["path"]
    if path == "/until-disconnect":
        message = await receive()  # the body is read: this returns when the client leaves
        DISCONNECTS.append((time.monotonic(), message["type"]))
        return
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(int(SLOW_S / 0.25)):
            await asyncio.sleep(0.25)
            await send({"type": "http.response.body", "body": b"chunk%d\n" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b"end\n"})
        return
    if path == "/late":
        await asyncio.sleep(SLOW_S)
        body = b"late answer"
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def guarded() -> Iterator[tuple[int, ConnectionBook]]:
    book = ConnectionBook(LIMITS)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=guarded_protocol_class(book), ws="none",
        lifespan="off", log_level="warning", timeout_keep_alive=LIMITS.idle_timeout_s,  # type: ignore[arg-type]
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port, book
    server.should_exit = True
    thread.join(10)


def exchange(port: int, *pieces: bytes, pause_s: float = 0.0, half_close: bool = False) -> bytes:
    """Send `pieces` (pausing between them), optionally shut the sending side, and read
    until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        for i, piece in enumerate(pieces):
            if i and pause_s:
                time.sleep(pause_s)
            sock.sendall(piece)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def get(path: str, close: bool = True) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: x\r\n{'Connection: close' if close else ''}\r\n\r\n".encode()
    )


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
        # A body longer than its Content-Length: the rest is read as a broken request.
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nabcdef",
    ],
)
def test_a_request_that_is_not_http_gets_the_error_envelope(guarded, request_bytes) -> None:
    port, _ = guarded
    data = exchange(port, request_bytes)
    last = data[data.rindex(b"HTTP/1.1 ") :]
    head, _, body = last.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head
    assert json.loads(body)["error"]["code"] == "invalid_http_request"


def test_a_stream_longer_than_every_timeout_is_not_cut(guarded) -> None:
    port, _ = guarded
    data = exchange(port, get("/stream"))
    assert data.startswith(b"HTTP/1.1 200") and data.count(b"\r\nchunk") == 6, data
    assert data.endswith(b"end\n\r\n0\r\n\r\n"), data


def test_a_late_answer_is_not_cut(guarded) -> None:
    port, _ = guarded
    data = exchange(port, get("/late"))
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"late answer"), data


def test_a_head_and_body_in_pieces_within_their_deadlines_are_served(guarded) -> None:
    port, _ = guarded
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 6\r\n\r\n"
    data = exchange(port, head[:10], head[10:30], head[30:], b"abc", b"def", pause_s=0.05)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"abcdef"), data


def test_pipelined_and_keep_alive_requests_are_all_served(guarded) -> None:
    port, _ = guarded
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(get("/late", close=False) + get("/echo", close=False))
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"content-length: 0\r\n\r\n"):
            data += sock.recv(65536)
        sock.sendall(get("/echo"))  # the same connection, kept alive
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200") == 3 and b"late answer" in data, data


def test_a_half_closed_client_gets_a_late_answer(guarded) -> None:
    port, _ = guarded
    data = exchange(port, get("/late", close=False), half_close=True)
    # The answer took longer than PROBE_INTERVAL_S: a 100 Continue came first.
    assert data.startswith(PROBE + b"HTTP/1.1 200") and data.endswith(b"late answer"), data
    assert b"connection: close" in data


def test_a_client_that_closed_its_socket_is_still_found_out(guarded) -> None:
    """A full close sends the same FIN as a half-close: the probe's reset reveals it,
    and the app sees the disconnect (lamina then aborts the request)."""
    port, _ = guarded
    DISCONNECTS.clear()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(get("/until-disconnect", close=False))
        time.sleep(0.2)  # the request is read before the close
    closed_at = time.monotonic()
    deadline = closed_at + 2 * PROBE_INTERVAL_S + 5.0  # a loaded machine runs timers late
    while not DISCONNECTS:
        assert time.monotonic() < deadline, "the closed client was never found out"
        time.sleep(0.02)
    seen_at, kind = DISCONNECTS[0]
    assert kind == "http.disconnect"
    assert seen_at - closed_at >= PROBE_INTERVAL_S - 0.3  # found by a probe, not the FIN


def test_a_half_close_before_the_head_is_complete_closes_at_once(guarded) -> None:
    port, book = guarded
    start = time.monotonic()
    assert exchange(port, b"GET /late HTTP/1.1\r\n", half_close=True) == b""
    assert time.monotonic() - start < LIMITS.header_timeout_s


def test_the_connection_count_returns_to_zero(guarded) -> None:
    port, book = guarded
    exchange(port, get("/echo"))
    deadline = time.monotonic() + 10
    while book.num_open:
        assert time.monotonic() < deadline, book.num_open
        time.sleep(0.02)


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_at_the_cap_with_every_connection_busy_a_new_one_is_refused_at_once(guarded) -> None:
    port, book = guarded
    wait_until(lambda: book.num_open == 0)
    busy = []
    try:
        for _ in range(LIMITS.max_connections):
            sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            sock.sendall(get("/until-disconnect", close=False))  # in flight until we leave
            busy.append(sock)
        wait_until(lambda: book.num_open == LIMITS.max_connections and book.num_idle == 0)
        refused_before = book.num_closed["over_limit"]
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=20) as extra:
            data = extra.recv(65536)
        assert time.monotonic() - start < 2.0
        assert data.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in data, data
        assert book.num_closed["over_limit"] == refused_before + 1
    finally:
        for sock in busy:
            sock.close()
    wait_until(lambda: book.num_open == 0)


def test_connection_cap_stays_below_the_fd_limit() -> None:
    assert connection_cap(4096, 1 << 20) == 4096
    assert connection_cap(4096, 1024) == 1024 - FD_RESERVE
    assert connection_cap(4096, 10) == 1


def test_the_fd_soft_limit_is_raised_to_the_hard_limit() -> None:
    """In a child process started with a lowered soft limit (nothing changes here)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 512)
    code = (
        "import resource; from app.server.fd_limit import raise_fd_soft_limit; "
        "got = raise_fd_soft_limit(); "
        "print(got, resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard)),
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()  # fmt: skip
    expected = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    assert out == [str(expected), str(expected)]
