"""Every broken rule gets its own precise 4xx in the OpenAI envelope; never a 5xx."""

from __future__ import annotations

import httpx
import pytest

from tests.api.bad_requests import BadRequest, bad_requests
from tests.api.conftest import LiveServer

CASE_IDS = [case.id for case in bad_requests(8192)]
ENVELOPE_KEYS = {"message", "type", "param", "code"}


def send(server: LiveServer, case: BadRequest) -> httpx.Response:
    kwargs: dict = {"headers": case.headers, "timeout": 60}
    if case.raw is not None:
        kwargs["content"] = case.raw
    elif case.body is not None:
        kwargs["json"] = case.body
    return httpx.request(case.method, server.url + case.path, **kwargs)


def case_for(server: LiveServer, case_id: str) -> BadRequest:
    return next(case for case in bad_requests(server.max_model_len) if case.id == case_id)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_request_gets_a_precise_error(live_server: LiveServer, case_id: str) -> None:
    case = case_for(live_server, case_id)
    response = send(live_server, case)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == ENVELOPE_KEYS
    assert error["param"] == case.param
    assert error["type"] and error["code"]
    for word in case.words:
        assert word in error["message"], f"{word!r} missing from {error['message']!r}"


def test_server_answers_normally_after_every_bad_request(live_server: LiveServer) -> None:
    for case in bad_requests(live_server.max_model_len):
        assert send(live_server, case).status_code < 500, case.id
    response = httpx.post(
        live_server.url + "/v1/completions",
        json={"model": live_server.model, "prompt": "Hello", "max_tokens": 3, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
