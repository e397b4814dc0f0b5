"""A client that shuts its sending side after a complete request (shutdown(SHUT_WR), as
`nc -N` or some proxies do) still gets its whole answer on every generation route."""

from __future__ import annotations

import json

import pytest

from app.server.protocol import PROBE
from tests.attack.raw_client import half_closed_request
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

ROUTES = {
    "/v1/completions": {"prompt": "Hello", "max_tokens": 5, "temperature": 0},
    "/v1/chat/completions": {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "temperature": 0,
    },
    "/generate": {"inputs": "Hello", "parameters": {"max_new_tokens": 5}},
}


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """The final response's status, headers and body (a slow answer is preceded by the
    server's `100 Continue` probes, which an HTTP/1.1 client skips)."""
    while raw.startswith(PROBE):
        raw = raw[len(PROBE) :]
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


@pytest.mark.parametrize("path", list(ROUTES))
def test_half_closed_client_gets_its_answer(guarded_server: ServerProcess, path: str) -> None:
    raw = half_closed_request(guarded_server.port, path, ROUTES[path])

    status, headers, body = split_response(raw)
    assert status == 200, raw
    assert headers["connection"] == "close"  # nothing more can come on this connection
    assert len(body) == int(headers["content-length"])
    answer = json.loads(body)
    if path == "/generate":
        assert answer["generated_text"]
    else:
        assert answer["usage"]["completion_tokens"] == 5


def test_half_closed_stream_gets_every_event(guarded_server: ServerProcess) -> None:
    body = {**ROUTES["/v1/completions"], "stream": True}
    raw = half_closed_request(guarded_server.port, "/v1/completions", body)

    status, headers, _ = split_response(raw)
    assert status == 200, raw
    assert headers["content-type"].startswith("text/event-stream")
    assert raw.count(b"data: {") >= 5 and b"data: [DONE]" in raw, raw
