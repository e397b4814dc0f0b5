"""Serve a model in-process through the real loader and engine (create_app's lifespan),
for tests of what LAMINA_MODEL may name."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import httpx

from app.config import Settings
from app.main import create_app


@contextlib.asynccontextmanager
async def served(
    model: object, timeout_s: float = 600.0, **more_settings: object
) -> AsyncIterator[httpx.AsyncClient]:
    """An AsyncClient on the app serving `model` once it is ready (small cache, no warm-up;
    more_settings: any other)."""
    settings = Settings(model=model, device="cpu", kv_cache_gb=0.05, warmup=False, **more_settings)
    reasons: list[str] = []
    app = create_app(settings, on_fatal=reasons.append)
    async with app.router.lifespan_context(app):
        readiness = app.state.server.readiness
        for _ in range(int(timeout_s * 20)):
            if readiness.is_ready or reasons:
                break
            await asyncio.sleep(0.05)
        assert readiness.is_ready, reasons or readiness.describe()
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def refusal(model: object, log_lines, **more_settings: object) -> str:
    """The one error line of an app that cannot serve `model` with more_settings
    (asserted: one line, no traceback, the server never ready)."""
    reasons: list[str] = []
    settings = Settings(model=model, device="cpu", warmup=False, **more_settings)
    app = create_app(settings, on_fatal=reasons.append)
    async with app.router.lifespan_context(app):
        for _ in range(6000):
            if reasons:
                break
            await asyncio.sleep(0.01)
        assert not app.state.server.readiness.is_ready
    assert len(reasons) == 1, reasons
    records = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    errors = [r for r in records if r.get("level") in ("error", "ERROR")]
    assert len(errors) == 1, errors
    assert "Traceback" not in json.dumps(errors[0]) and "\n" not in errors[0]["message"]
    return errors[0]["message"]


async def greedy(
    client: httpx.AsyncClient, prompt: str, max_new_tokens: int
) -> tuple[list[int], str]:
    """The token ids and text TGI's /generate reports for a greedy completion of `prompt`."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
    response = await client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    body = response.json()
    return [token["id"] for token in body["details"]["tokens"]], body["generated_text"]
