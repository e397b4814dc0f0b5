"""The playground and dashboard pages (app/ui) and GET /status, on the fake engine.

The pages themselves are tested in a real browser (tests/ui); here: which request gets
which page, that the pages load without a key when keys are configured (their API
calls need one), that LAMINA_UI=false turns them off, that they use relative URLs only,
and the shape of GET /status.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.ui import STATIC_DIR
from tests.api.conftest import FakeApp, fake_settings, running_fake_app
from tests.api.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


async def test_browser_gets_the_playground_and_curl_what_it_got_before(fake_app: FakeApp):
    page = await fake_app.client.get("/", headers=HTML)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>lamina playground</title>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    plain = await fake_app.client.get("/", headers={"Accept": "*/*"})  # curl
    assert plain.status_code == 405 and plain.headers["allow"] == "POST"
    as_json = await fake_app.client.get("/", headers={"Accept": "application/json"})
    assert as_json.status_code == 405


async def test_post_root_stays_tgi(fake_app: FakeApp):
    answer = await fake_app.client.post(
        "/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, headers=HTML
    )
    assert answer.status_code == 200 and isinstance(answer.json(), list)


async def test_dashboard_and_assets(fake_app: FakeApp):
    page = await fake_app.client.get("/dashboard")
    assert page.status_code == 200 and "<title>lamina dashboard</title>" in page.text
    for name, media_type in [("style.css", "text/css"), ("playground.js", "text/javascript")]:
        asset = await fake_app.client.get("/ui/" + name)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type)
        assert asset.content == (STATIC_DIR / name).read_bytes()
    metrics = (await fake_app.client.get("/metrics")).text
    for route in ("/dashboard", "/ui/{name}"):
        assert f'method="GET",model_name="{fake_app.model}",route="{route}",status="200"' in metrics
    missing = await fake_app.client.get("/ui/nothing.js")
    assert missing.status_code == 404 and "error" in missing.json()
    assert (await fake_app.client.get("/ui/../config.py")).status_code == 404


async def test_ui_false_turns_both_pages_off(default_model_path: Path, http_tokenizer):
    settings = fake_settings(default_model_path, ui=False)
    async with running_fake_app(settings, FakeEngine(http_tokenizer)) as app:
        assert (await app.client.get("/dashboard")).status_code == 404
        assert (await app.client.get("/ui/style.css")).status_code == 404
        assert (await app.client.get("/", headers=HTML)).status_code == 405  # as without a UI
        assert (await app.client.get("/status")).status_code == 200  # part of the API


async def test_pages_need_no_key_but_their_api_calls_do(default_model_path: Path, http_tokenizer):
    settings = fake_settings(default_model_path, api_keys=("sesame",))
    async with running_fake_app(settings, FakeEngine(http_tokenizer)) as app:
        for path in ("/dashboard", "/ui/common.js"):
            assert (await app.client.get(path)).status_code == 200, path
        assert (await app.client.get("/", headers=HTML)).status_code == 200
        assert (await app.client.get("/", headers={"Accept": "*/*"})).status_code == 401
        assert (await app.client.get("/status")).status_code == 401
        keyed = await app.client.get("/status", headers={"Authorization": "Bearer sesame"})
        assert keyed.status_code == 200 and keyed.json()["settings"]["api_keys"] is True


# A URL that names a scheme or host, or starts at the root, would break under a prefix.
ABSOLUTE = re.compile(r"""(?:href|src|action)=["'](?:/|[a-z]+:(?!,))|fetch\(\s*["'`]/|https?://""")


@pytest.mark.parametrize("name", sorted(p.name for p in STATIC_DIR.iterdir()))
def test_static_files_use_relative_urls_only(name: str):
    text = (STATIC_DIR / name).read_text()
    text = text.replace("http://www.w3.org/2000/svg", "")  # a namespace, not a URL fetched
    assert not ABSOLUTE.findall(text), name


async def test_status_shape(fake_app: FakeApp):
    await fake_app.client.post(
        "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 9}
    )  # a 400: counted among the errors
    status = (await fake_app.client.get("/status")).json()
    assert status["phase"] == "ready" and status["version"]
    assert status["model"]["name"] == fake_app.model and status["model"]["device"] == "cpu"
    engine = status["engine"]
    assert engine["alive"] is True and engine["running"] == 0 and engine["waiting"] == 0
    minute = status["last_minute"]
    assert minute["window_s"] == 60 and len(minute["output_tokens_per_second"]) == 60
    assert set(minute["ttft_s"]) == {"count", "p50", "p90", "p99"}
    assert status["errors_by_reason"] == {"validation": 1}
    assert status["settings"]["max_num_seqs"] > 0 and status["settings"]["api_keys"] is False
    assert "/status" in (await fake_app.client.get("/openapi.json")).json()["paths"]
