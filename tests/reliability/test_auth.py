"""API keys, open routes and CORS, through the real app (fake engine, in-process)."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator

import pytest

from app.api.auth import KeyRing, OpenRoutes, bearer_token
from tests.api.conftest import FakeApp, fake_settings, running_fake_app
from tests.api.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

KEYS = ("key-alpha-123", "key-beta-456")
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture
async def keyed_app(default_model_path, http_tokenizer) -> AsyncIterator[FakeApp]:
    settings = fake_settings(default_model_path, api_keys=KEYS, max_body_bytes=2048)
    async with running_fake_app(settings, FakeEngine(http_tokenizer)) as app:
        yield app


def every_route(app) -> list[tuple[str, str]]:
    """(method, concrete path) of every route: the OpenAPI ones, the docs pages, /metrics."""
    found = {("GET", "/metrics")}
    for path, operations in app.openapi()["paths"].items():
        concrete = path.replace("{model_id}", "some-model")
        found |= {(method.upper(), concrete) for method in operations}
    for route in app.routes:  # the docs pages are top-level routes outside the schema
        for method in getattr(route, "methods", None) or ():
            if method != "HEAD":
                found.add((method, route.path))
    return sorted(found)


def assert_401(response, code: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == code


async def test_every_route_but_the_open_ones_needs_a_key(keyed_app: FakeApp) -> None:
    client = keyed_app.client
    routes = every_route(keyed_app.app)
    generation = {"/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream", "/"}
    assert generation <= {path for _, path in routes}
    open_routes = {"/health", "/ready", "/metrics"}
    for method, path in routes:
        if path in open_routes:
            response = await client.request(method, path)
            assert response.status_code == 200, (method, path)
            continue
        for headers, code in (
            ({}, "missing_api_key"),
            ({"Authorization": "Bearer wrong-key"}, "invalid_api_key"),
            ({"Authorization": f"Basic {KEYS[0]}"}, "missing_api_key"),
            ({"Authorization": "Bearer "}, "missing_api_key"),
            ({"Authorization": f"Bearer {KEYS[0]}x"}, "invalid_api_key"),
        ):
            response = await client.request(method, path, json=CHAT, headers=headers)
            assert_401(response, code)
    unknown = await client.get("/no/such/route")
    assert_401(unknown, "missing_api_key")  # routes are not revealed without a key


async def test_each_configured_key_works(keyed_app: FakeApp) -> None:
    for key in KEYS:
        headers = {"Authorization": f"Bearer {key}"}
        response = await keyed_app.client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert response.status_code == 200, response.text
        tgi = await keyed_app.client.post("/generate", json={"inputs": "Hi"}, headers=headers)
        assert tgi.status_code == 200
        lower = {"authorization": f"bearer {key}"}  # the scheme is case-insensitive
        assert (await keyed_app.client.get("/v1/models", headers=lower)).status_code == 200


async def test_no_body_is_read_before_the_key_is_checked(keyed_app: FakeApp) -> None:
    too_big = {"prompt": "x" * 10_000}
    response = await keyed_app.client.post("/v1/completions", json=too_big)
    assert_401(response, "missing_api_key")  # not 413
    headers = {"Authorization": f"Bearer {KEYS[1]}"}
    response = await keyed_app.client.post("/v1/completions", json=too_big, headers=headers)
    assert response.status_code == 413


async def test_open_routes_are_configurable(default_model_path, http_tokenizer) -> None:
    settings = fake_settings(
        default_model_path, api_keys=KEYS[:1], open_routes=("/health", "/docs*", "/openapi.json")
    )
    async with running_fake_app(settings, FakeEngine(http_tokenizer)) as app:
        assert (await app.client.get("/health")).status_code == 200
        assert (await app.client.get("/docs")).status_code == 200
        assert (await app.client.get("/openapi.json")).status_code == 200
        assert_401(await app.client.get("/ready"), "missing_api_key")
        assert_401(await app.client.get("/metrics"), "missing_api_key")
        ok = await app.client.get("/ready", headers={"Authorization": f"Bearer {KEYS[0]}"})
        assert ok.status_code == 200


async def test_without_keys_everything_is_open(fake_app: FakeApp) -> None:
    assert (await fake_app.client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert (await fake_app.client.get("/openapi.json")).status_code == 200


async def test_cors_is_off_unless_origins_are_configured(
    fake_app: FakeApp, default_model_path, http_tokenizer
) -> None:
    origin = {"Origin": "https://app.example"}
    response = await fake_app.client.post("/v1/chat/completions", json=CHAT, headers=origin)
    assert "access-control-allow-origin" not in response.headers
    preflight_headers = {**origin, "Access-Control-Request-Method": "POST"}
    preflight = await fake_app.client.options("/v1/chat/completions", headers=preflight_headers)
    assert "access-control-allow-origin" not in preflight.headers

    settings = fake_settings(
        default_model_path, api_keys=KEYS, cors_origins=("https://app.example",)
    )
    async with running_fake_app(settings, FakeEngine(http_tokenizer)) as app:
        preflight = await app.client.options("/v1/chat/completions", headers=preflight_headers)
        assert preflight.status_code == 200  # answered without a key: browsers send none
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        refused = await app.client.post("/v1/chat/completions", json=CHAT, headers=origin)
        assert_401(refused, "missing_api_key")
        assert refused.headers["access-control-allow-origin"] == "https://app.example"
        other = await app.client.post(
            "/v1/chat/completions", json=CHAT, headers={"Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers


def test_every_key_is_compared_whichever_matches(monkeypatch) -> None:
    keys = KeyRing(["k1", "k2", "k3", "k4"])
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for token, expected in (("k1", True), ("k4", True), ("nope", False), ("k", False)):
        calls.clear()
        assert keys.accepts(token) is expected
        assert len(calls) == 4  # no early exit on a match
        assert all(len(a) == len(b) == 32 for a, b in calls)  # digests: lengths never differ
    assert not KeyRing([]) and not KeyRing([""])


def test_open_routes_and_bearer_parsing() -> None:
    routes = OpenRoutes(["/health", "/debug/*"])
    assert "/health" in routes and "/debug/x" in routes
    assert "/health/x" not in routes and "/ready" not in routes

    class Headers(dict):
        pass

    assert bearer_token(Headers(authorization="Bearer abc")) == "abc"
    assert bearer_token(Headers(authorization="  bearer   abc  ")) == "abc"
    assert bearer_token(Headers(authorization="Token abc")) is None
    assert bearer_token(Headers()) is None


async def test_refusals_before_routing_count_under_their_route(keyed_app: FakeApp) -> None:
    """401s (and BodyGuard's 413s) happen before routing; they count under the route
    the request was for, not under "unmatched"."""
    from tests.observability.exposition import diff, parse

    client = keyed_app.client
    auth = {"Authorization": f"Bearer {KEYS[0]}"}

    async def scrape():
        return parse((await client.get("/metrics")).text)

    before = await scrape()
    assert_401(await client.post("/v1/chat/completions", json=CHAT), "missing_api_key")
    too_large = await client.post("/v1/completions", json={"prompt": "x" * 4096}, headers=auth)
    assert too_large.status_code == 413
    assert_401(await client.get("/no/such/route"), "missing_api_key")
    after = await scrape()
    total = "lamina:http_requests_total"
    assert diff(after, before, total, route="/v1/chat/completions", status="401") == 1
    assert diff(after, before, total, route="/v1/completions", status="413") == 1
    assert diff(after, before, total, route="unmatched", status="401") == 1
