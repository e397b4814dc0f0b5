"""Limits that bound one request's work, beyond those in tests/api/bad_requests.py."""

from __future__ import annotations

import pytest

from app.api.state import DEFAULT_MAX_PROMPTS

pytestmark = pytest.mark.anyio


async def test_the_number_of_prompts_in_one_request_is_bounded(fake_app) -> None:
    client = fake_app.client
    many = [f"prompt {i}" for i in range(DEFAULT_MAX_PROMPTS + 1)]
    response = await client.post("/v1/completions", json={"prompt": many, "max_tokens": 1})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and f"at most {DEFAULT_MAX_PROMPTS}" in error["message"]
    ids = [[1, 2]] * (DEFAULT_MAX_PROMPTS + 1)
    response = await client.post("/v1/completions", json={"prompt": ids, "max_tokens": 1})
    assert response.status_code == 400
    assert not fake_app.engine.requests  # refused before any engine work

    ok = await client.post(
        "/v1/completions", json={"prompt": many[:DEFAULT_MAX_PROMPTS], "max_tokens": 1}
    )
    assert ok.status_code == 200 and len(ok.json()["choices"]) == DEFAULT_MAX_PROMPTS
    one_long_id_list = list(range(1, 200))  # a list of ints is one prompt, not 199
    single = await client.post(
        "/v1/completions", json={"prompt": one_long_id_list, "max_tokens": 1}
    )
    assert single.status_code == 200
