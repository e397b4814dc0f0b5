"""/docs and /openapi.json describe the real request, response and error models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.api.conftest import FakeApp

pytestmark = pytest.mark.anyio


async def test_openapi_describes_real_models(fake_app: FakeApp) -> None:
    schema = (await fake_app.client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    for name in (
        "CompletionRequest",
        "ChatCompletionRequest",
        "GenerateRequest",
        "CompletionResponse",
        "ChatCompletionChunk",
        "StreamResponse",
        "ErrorResponse",
    ):
        assert name in components, name
    temperature = components["CompletionRequest"]["properties"]["temperature"]
    assert "greedy" in temperature["description"]
    assert temperature["anyOf"][0]["maximum"] == 2
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert chat["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert chat["200"]["content"]["text/event-stream"]["schema"]["$ref"].endswith(
        "ChatCompletionChunk"
    )
    assert chat["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ChatCompletionResponse"
    )


async def test_docs_page_is_served(fake_app: FakeApp) -> None:
    response = await fake_app.client.get("/docs")
    assert response.status_code == 200 and "swagger" in response.text.lower()


async def test_an_unset_max_tokens_is_described_as_served(fake_app: FakeApp) -> None:
    """Unset, it is the bounded default of fit_to_context, never the whole window."""
    components = (await fake_app.client.get("/openapi.json")).json()["components"]["schemas"]
    fields = [
        ("CompletionRequest", "max_tokens"),
        ("ChatCompletionRequest", "max_tokens"),
        ("GenerateParameters", "max_new_tokens"),
        ("ResponsesRequest", "max_output_tokens"),
    ]
    for model, field in fields:
        description = components[model]["properties"][field]["description"]
        assert "LAMINA_DEFAULT_MAX_TOKENS" in description, (model, field)
        assert "until the context" not in description, (model, field)
    budget = await fake_app.client.post("/v1/completions", json={"prompt": "Hi"})
    assert budget.status_code == 200
    assert fake_app.engine.requests[-1].params.max_tokens == 1024


async def test_the_readmes_route_table_lists_every_route(fake_app: FakeApp) -> None:
    """README.md's HTTP API table names every route /openapi.json describes."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("| Route | What |") : readme.index("### Examples")]
    spans = re.findall(r"`([^`]*)`", table)  # `POST /v1/completions`, `GET`, ...
    paths_in = (re.search(r"/\S*", span) for span in spans)
    listed = {re.sub(r"\{[^}]*\}", "{}", found.group()) for found in paths_in if found}
    paths = (await fake_app.client.get("/openapi.json")).json()["paths"]
    missing = sorted({re.sub(r"\{[^}]*\}", "{}", path) for path in paths} - listed)
    assert not missing, f"README.md's route table lacks {missing}"
