"""API keys on a real `lamina serve` process: the environment variables an operator sets,
uvicorn's own request handling, and the open-route rule, end to end."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.system

KEYS = "key-alpha-123,key-beta-456"
GENERATION_ROUTES = [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    ("/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# /metrics is left out of the open routes here: the setting, not a default, decides.
@pytest.mark.server_env(LAMINA_API_KEYS=KEYS, LAMINA_OPEN_ROUTES="/health,/ready")
def test_keys_guard_generation_and_open_routes_follow_the_setting(start_server) -> None:
    server = start_server()
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        for path, body in GENERATION_ROUTES:
            for headers in ({}, _bearer("wrong-key"), _bearer("key-alpha-12")):
                refused = client.post(path, json=body, headers=headers)
                assert refused.status_code == 401, (path, headers, refused.text)
                assert refused.json()["error"]["type"] == "authentication_error"
            for key in KEYS.split(","):
                served = client.post(path, json=body, headers=_bearer(key))
                assert served.status_code == 200, (path, served.text)
        assert client.get("/v1/models").status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=_bearer("key-beta-456")).status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
