"""`priority` on every generation route reaches the engine; an API key's priority
(LAMINA_API_KEYS `key:N`) is its requests' default and the most urgent they may ask for."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import pytest

from app.api.auth import KeyRing, key_client, key_priorities, split_key_entry
from tests.api.conftest import FakeApp, fake_settings, running_fake_app
from tests.api.fake_engine import FakeEngine
from tests.api.test_user_field_log import access_line

pytestmark = pytest.mark.anyio

ROUTES = {  # path -> (body without priority, where its priority goes)
    "/v1/completions": ({"prompt": "Hi", "max_tokens": 2}, ()),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": 2}, ()),
    "/v1/responses": ({"input": "Hi", "max_output_tokens": 2}, ()),
    "/generate": ({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, ("parameters",)),
}  # fmt: skip


def with_priority(body: dict, where: tuple[str, ...], priority: int) -> dict:
    body = {**body, **{key: dict(body[key]) for key in where}}
    target = body[where[0]] if where else body
    target["priority"] = priority
    return body


@pytest.mark.parametrize("path", ROUTES)
async def test_priority_reaches_the_engine(fake_app: FakeApp, path: str) -> None:
    body, where = ROUTES[path]
    assert (await fake_app.client.post(path, json=body)).status_code == 200
    assert fake_app.engine.requests[-1].priority == 0  # the default
    response = await fake_app.client.post(path, json=with_priority(body, where, -3))
    assert response.status_code == 200, response.text
    assert fake_app.engine.requests[-1].priority == -3


@pytest.fixture
async def keyed_app(default_model_path, http_tokenizer) -> AsyncIterator[FakeApp]:
    settings = fake_settings(default_model_path, api_keys=("batch-key:10", "open-key"))
    async with running_fake_app(settings, FakeEngine(http_tokenizer)) as app:
        yield app


@pytest.mark.parametrize("path", ROUTES)
async def test_a_keys_priority_is_the_default_and_the_floor(keyed_app: FakeApp, path: str) -> None:
    body, where = ROUTES[path]
    batch = {"Authorization": "Bearer batch-key"}
    engine = keyed_app.engine
    assert (await keyed_app.client.post(path, json=body, headers=batch)).status_code == 200
    assert engine.requests[-1].priority == 10
    calmer = with_priority(body, where, 12)
    assert (await keyed_app.client.post(path, json=calmer, headers=batch)).status_code == 200
    assert engine.requests[-1].priority == 12
    num_requests = len(engine.requests)
    pushy = with_priority(body, where, 0)
    response = await keyed_app.client.post(path, json=pushy, headers=batch)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == ".".join([*where, "priority"])
    assert len(engine.requests) == num_requests  # nothing reached the engine
    # A key without a priority: the default 0, and any value may be asked for.
    free = {"Authorization": "Bearer open-key"}
    response = await keyed_app.client.post(path, json=with_priority(body, where, -5), headers=free)
    assert response.status_code == 200 and engine.requests[-1].priority == -5


async def test_the_priority_suffix_is_not_part_of_the_key(keyed_app: FakeApp) -> None:
    path, (body, _) = "/v1/completions", ROUTES["/v1/completions"]
    wrong = {"Authorization": "Bearer batch-key:10"}
    assert (await keyed_app.client.post(path, json=body, headers=wrong)).status_code == 401


def test_key_entries() -> None:
    assert split_key_entry("sk-a:5") == ("sk-a", 5)
    assert split_key_entry("sk-a:-2") == ("sk-a", -2)
    assert split_key_entry("sk-a") == ("sk-a", None)
    assert split_key_entry("a:b") == ("a:b", None)  # not a priority: part of the key
    assert key_priorities(["sk-a:5", "sk-b"]) == {key_client("sk-a"): 5}
    ring = KeyRing(["sk-a:5", "sk-b"])
    assert ring.accepts("sk-a") and ring.accepts("sk-b") and not ring.accepts("sk-a:5")


async def test_the_access_line_says_a_priority_other_than_0(
    fake_app: FakeApp, log_lines: io.StringIO
) -> None:
    body = {"prompt": "Hi", "max_tokens": 2}
    urgent = await fake_app.client.post("/v1/completions", json={**body, "priority": -2})
    plain = await fake_app.client.post("/v1/completions", json=body)
    assert access_line(log_lines, urgent.headers["x-request-id"])["priority"] == -2
    assert "priority" not in access_line(log_lines, plain.headers["x-request-id"])
