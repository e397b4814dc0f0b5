"""The OpenAI `user` field is logged: a structured `user` key on the access line,
bounded in length, printable, and never a metric label."""

from __future__ import annotations

import io
import json

import pytest

from app.api.request_record import MAX_LOGGED_USER_LENGTH
from tests.api.conftest import FakeApp

pytestmark = pytest.mark.anyio

USER = "end-user-8842"


def access_line(stream: io.StringIO, request_id: str) -> dict:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [
        e for e in lines if e["logger"] == "lamina.access" and e.get("request_id") == request_id
    ]
    assert len(access) == 1, lines
    return access[0]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ],
    ids=["completions", "chat"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_user_is_on_the_access_line(
    fake_app: FakeApp, log_lines: io.StringIO, path: str, body: dict, stream: bool
) -> None:
    response = await fake_app.client.post(path, json={**body, "user": USER, "stream": stream})
    assert response.status_code == 200, response.text
    line = access_line(log_lines, response.headers["x-request-id"])
    assert line["user"] == USER
    assert line["status"] == 200 and line["completion_tokens"] > 0


async def test_user_of_a_refused_request_is_logged_too(
    fake_app: FakeApp, log_lines: io.StringIO
) -> None:
    body = {"prompt": "Hi", "n": 99, "user": USER}
    response = await fake_app.client.post("/v1/completions", json=body)
    assert response.status_code == 400
    line = access_line(log_lines, response.headers["x-request-id"])
    assert line["user"] == USER and line["failure"] == "validation"


async def test_no_user_no_field(fake_app: FakeApp, log_lines: io.StringIO) -> None:
    response = await fake_app.client.post("/v1/completions", json={"prompt": "Hi"})
    assert "user" not in access_line(log_lines, response.headers["x-request-id"])


async def test_user_is_bounded_and_printable(fake_app: FakeApp, log_lines: io.StringIO) -> None:
    hostile = "evil\nFAKE LINE\x1b[31m" + "x" * 5000
    body = {"prompt": "Hi", "max_tokens": 1, "user": hostile}
    response = await fake_app.client.post("/v1/completions", json=body)
    assert response.status_code == 200
    logged = access_line(log_lines, response.headers["x-request-id"])["user"]
    assert len(logged) == MAX_LOGGED_USER_LENGTH
    assert logged.startswith("evil\ufffdFAKE LINE\ufffd[31mxxx")
    assert logged.isprintable()


async def test_user_is_never_a_metric_label(fake_app: FakeApp) -> None:
    for path, body in (
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ):
        response = await fake_app.client.post(path, json={**body, "user": USER})
        assert response.status_code == 200
    metrics = await fake_app.client.get("/metrics")
    assert metrics.status_code == 200 and "lamina:" in metrics.text
    assert USER not in metrics.text
