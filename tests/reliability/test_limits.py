"""Limits that bound one request's work, beyond those in tests/api/bad_requests.py.

tests/api/bad_requests.py checks the default limits; here every per-request limit
setting is lowered (LOWERED) and each is shown to be configurable: one past it is a 400
in the OpenAI envelope naming the field, the value given and the limit, refused before
any engine work, and exactly at it the request is served. All on the fake engine.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from app.tokenizer import Tokenizer
from tests.api.conftest import FakeApp, fake_settings, running_fake_app
from tests.api.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
TGI = "/generate"
TGI_PATHS = {TGI, "/generate_stream", "/"}
ENVELOPE_KEYS = {"message", "type", "param", "code"}
DEFAULT_MAX_PROMPTS = Settings.model_fields["max_prompts_per_request"].default
# Where the HTTP layer reads the limits of one request from the settings.
LIMIT_READERS = ("app/api/params.py", "app/api/state.py")
FAKE_CONTEXT = FakeEngine.max_model_len  # the fake engine's context window

# Every per-request limit setting, set below its default (and the prompt limit far
# below the context window).
LOWERED: dict[str, int] = {
    "max_prompt_tokens": 40,  # a chat "Hi" renders to ~31 tokens
    "max_tokens_limit": 5,
    "max_n": 2,
    "max_stop_sequences": 2,
    "max_stop_length": 5,
    "max_logit_bias": 3,
    "max_top_logprobs": 2,
    "max_prompts_per_request": 3,
    "max_body_bytes": 2048,
}


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


# --- every limit setting, lowered ----------------------------------------------------------


@dataclass(frozen=True)
class LimitCase:
    id: str
    setting: str  # the Settings field (LAMINA_<NAME>) under test
    path: str
    at_limit: dict[str, Any]  # fields merged into the route's base body: served
    over_limit: dict[str, Any]  # ... one past the limit: refused
    param: str
    words: tuple[str, ...]  # each in error.message: the field, the value given, the limit
    code: str = "invalid_value"


def _bias(count: int) -> dict[str, float]:
    return {str(token_id): 1.0 for token_id in range(1, count + 1)}


def _stops(count: int) -> list[str]:
    return [f"s{i}" for i in range(count)]


def _tgi(**parameters: Any) -> dict[str, Any]:
    return {"parameters": {"max_new_tokens": 2, **parameters}}


CASES = [
    LimitCase(
        "logit-bias-completions",
        "max_logit_bias",
        COMPLETIONS,
        {"logit_bias": _bias(3)},
        {"logit_bias": _bias(4)},
        "logit_bias",
        ("`logit_bias`", "4 entries", "at most 3"),
    ),
    LimitCase(
        "logit-bias-chat",
        "max_logit_bias",
        CHAT,
        {"logit_bias": _bias(3)},
        {"logit_bias": _bias(4)},
        "logit_bias",
        ("`logit_bias`", "4 entries", "at most 3"),
    ),
    LimitCase(
        "prompt-tokens-ids",
        "max_prompt_tokens",
        COMPLETIONS,
        {"prompt": [1] * 40},
        {"prompt": [1] * 41},
        "prompt",
        ("`prompt`", "41 tokens", "at most 40", f"context window: {FAKE_CONTEXT}"),
        code="context_length_exceeded",
    ),
    LimitCase(
        "prompt-tokens-list",
        "max_prompt_tokens",
        COMPLETIONS,
        {"prompt": [[1] * 40, [2] * 3]},
        {"prompt": [[2] * 3, [1] * 41]},
        "prompt[1]",
        ("`prompt[1]`", "41 tokens", "at most 40"),
        code="context_length_exceeded",
    ),
    LimitCase(
        "max-tokens-completions",
        "max_tokens_limit",
        COMPLETIONS,
        {"max_tokens": 5},
        {"max_tokens": 6},
        "max_tokens",
        ("`max_tokens`", "at most 5", "6"),
    ),
    LimitCase(
        "max-tokens-chat",
        "max_tokens_limit",
        CHAT,
        {"max_tokens": 5},
        {"max_tokens": 6},
        "max_tokens",
        ("`max_tokens`", "at most 5", "6"),
    ),
    LimitCase(
        "max-completion-tokens-chat",
        "max_tokens_limit",
        CHAT,
        {"max_completion_tokens": 5},
        {"max_completion_tokens": 6},
        "max_completion_tokens",
        ("`max_completion_tokens`", "at most 5", "6"),
    ),
    LimitCase(
        "max-new-tokens-tgi",
        "max_tokens_limit",
        TGI,
        _tgi(max_new_tokens=5),
        _tgi(max_new_tokens=6),
        "parameters.max_new_tokens",
        ("`parameters.max_new_tokens`", "at most 5", "6"),
    ),
    LimitCase(
        "n-completions",
        "max_n",
        COMPLETIONS,
        {"n": 2},
        {"n": 3},
        "n",
        ("`n`", "at most 2", "3"),
    ),
    LimitCase("n-chat", "max_n", CHAT, {"n": 2}, {"n": 3}, "n", ("`n`", "at most 2", "3")),
    LimitCase(
        "stop-count-completions",
        "max_stop_sequences",
        COMPLETIONS,
        {"stop": _stops(2)},
        {"stop": _stops(3)},
        "stop",
        ("`stop`", "3 sequences", "at most 2"),
    ),
    LimitCase(
        "stop-count-chat",
        "max_stop_sequences",
        CHAT,
        {"stop": _stops(2)},
        {"stop": _stops(3)},
        "stop",
        ("`stop`", "3 sequences", "at most 2"),
    ),
    LimitCase(
        "stop-count-tgi",
        "max_stop_sequences",
        TGI,
        _tgi(stop=_stops(2)),
        _tgi(stop=_stops(3)),
        "parameters.stop",
        ("`parameters.stop`", "3 sequences", "at most 2"),
    ),
    LimitCase(
        "stop-length-completions",
        "max_stop_length",
        COMPLETIONS,
        {"stop": ["ok", "zzzzz"]},
        {"stop": ["ok", "zzzzzz"]},
        "stop",
        ("`stop[1]`", "6 characters", "at most 5"),
    ),
    LimitCase(
        "stop-length-tgi",
        "max_stop_length",
        TGI,
        _tgi(stop=["zzzzz"]),
        _tgi(stop=["zzzzzz"]),
        "parameters.stop",
        ("`parameters.stop[0]`", "6 characters", "at most 5"),
    ),
    LimitCase(
        "logprobs-completions",
        "max_top_logprobs",
        COMPLETIONS,
        {"logprobs": 2},
        {"logprobs": 3},
        "logprobs",
        ("`logprobs`", "at most 2", "3"),
    ),
    LimitCase(
        "top-logprobs-chat",
        "max_top_logprobs",
        CHAT,
        {"logprobs": True, "top_logprobs": 2},
        {"logprobs": True, "top_logprobs": 3},
        "top_logprobs",
        ("`top_logprobs`", "at most 2", "3"),
    ),
    LimitCase(
        "top-n-tokens-tgi",
        "max_top_logprobs",
        TGI,
        _tgi(top_n_tokens=2),
        _tgi(top_n_tokens=3),
        "parameters.top_n_tokens",
        ("`parameters.top_n_tokens`", "at most 2", "3"),
    ),
    LimitCase(
        "prompts-per-request",
        "max_prompts_per_request",
        COMPLETIONS,
        {"prompt": ["a", "b", "c"]},
        {"prompt": ["a", "b", "c", "d"]},
        "prompt",
        ("`prompt`", "4 prompts", "at most 3"),
    ),
]

BASE_BODIES: dict[str, dict[str, Any]] = {
    COMPLETIONS: {"prompt": "Hi", "max_tokens": 2},
    CHAT: {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    TGI: {"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
}


@pytest.fixture
async def limited_app(
    default_model_path: Path, http_tokenizer: Tokenizer
) -> AsyncIterator[FakeApp]:
    settings = fake_settings(default_model_path, **LOWERED)
    async with running_fake_app(settings, FakeEngine(http_tokenizer)) as app:
        yield app


def assert_refused(response, path: str, param: str, words: tuple[str, ...], code: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    expected_keys = {"error", "error_type"} if path in TGI_PATHS else {"error"}
    assert set(body) == expected_keys, body
    error = body["error"]
    assert set(error) == ENVELOPE_KEYS, error
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code, error
    for word in words:
        assert word in error["message"], f"{word!r} missing from {error['message']!r}"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_a_lowered_limit_refuses_one_past_it_and_serves_it(
    limited_app: FakeApp, case: LimitCase
) -> None:
    client, engine = limited_app.client, limited_app.engine
    over = await client.post(case.path, json={**BASE_BODIES[case.path], **case.over_limit})
    assert_refused(over, case.path, case.param, case.words, case.code)
    assert not engine.requests  # refused before any engine work

    at = await client.post(case.path, json={**BASE_BODIES[case.path], **case.at_limit})
    assert at.status_code == 200, at.text
    assert engine.requests


def test_the_cases_cover_every_limit_of_one_request() -> None:
    """Every `max_*` setting the request checks read is lowered here, and every lowered
    setting has a case (max_body_bytes, enforced before routing, has its own test)."""
    repo = Path(__file__).resolve().parents[2]
    read = {
        name
        for path in LIMIT_READERS
        for name in re.findall(r"settings\.(max_\w+)", (repo / path).read_text())
    }
    assert read == set(LOWERED) - {"max_body_bytes"}
    assert {case.setting for case in CASES} == set(LOWERED) - {"max_body_bytes"}


# --- LAMINA_MAX_PROMPT_TOKENS on the routes whose prompt is text --------------------------


async def _count_tokens(app: FakeApp, body: dict[str, Any]) -> int:
    response = await app.client.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()["count"]


@pytest.mark.parametrize("route", ["chat", "tgi"])
async def test_max_prompt_tokens_below_the_context_on_text_prompts(
    default_model_path: Path, http_tokenizer: Tokenizer, route: str
) -> None:
    """The limit is set to a real prompt's own length: that prompt is served, a longer
    one is a 400 naming both numbers, far below the context window."""
    short_text, long_text = "Hello there", "Hello there, friend"
    if route == "chat":
        path, param = CHAT, "messages"

        def body(text: str) -> dict[str, Any]:
            return {"messages": [{"role": "user", "content": text}], "max_tokens": 2}

        def tokenized(text: str) -> dict[str, Any]:
            return {"messages": body(text)["messages"]}
    else:
        path, param = TGI, "inputs"

        def body(text: str) -> dict[str, Any]:
            return {"inputs": text, "parameters": {"max_new_tokens": 2}}

        def tokenized(text: str) -> dict[str, Any]:
            return {"prompt": text}

    async with running_fake_app(
        fake_settings(default_model_path), FakeEngine(http_tokenizer)
    ) as probe:
        limit = await _count_tokens(probe, tokenized(short_text))
        longer = await _count_tokens(probe, tokenized(long_text))
    assert limit < longer < FAKE_CONTEXT // 2

    settings = fake_settings(default_model_path, max_prompt_tokens=limit)
    async with running_fake_app(settings, FakeEngine(http_tokenizer)) as app:
        at = await app.client.post(path, json=body(short_text))
        assert at.status_code == 200, at.text
        assert len(app.engine.requests[-1].prompt_token_ids) == limit
        over = await app.client.post(path, json=body(long_text))
        words = (f"`{param}`", f"{longer} tokens", f"at most {limit}", str(FAKE_CONTEXT))
        assert_refused(over, path, param, words, "context_length_exceeded")
        assert len(app.engine.requests) == 1


# --- LAMINA_MAX_BODY_BYTES, exactly at it ---------------------------------------------------


def _body_of_size(size: int) -> bytes:
    """A valid completion request of exactly `size` bytes (padded by an ignored field)."""
    base = {"prompt": "Hi", "max_tokens": 1, "pad": ""}
    padding = size - len(json.dumps(base).encode())
    assert padding >= 0
    return json.dumps({**base, "pad": "x" * padding}).encode()


async def test_max_body_bytes_serves_exactly_the_limit(limited_app: FakeApp) -> None:
    limit = LOWERED["max_body_bytes"]
    headers = {"content-type": "application/json"}
    at = await limited_app.client.post(COMPLETIONS, content=_body_of_size(limit), headers=headers)
    assert at.status_code == 200, at.text
    over = await limited_app.client.post(
        COMPLETIONS, content=_body_of_size(limit + 1), headers=headers
    )
    assert over.status_code == 413, over.text
    error = over.json()["error"]
    assert set(error) == ENVELOPE_KEYS and error["code"] == "request_too_large"
    assert f"{limit + 1} bytes" in error["message"] and f"at most {limit}" in error["message"]
    assert len(limited_app.engine.requests) == 1
