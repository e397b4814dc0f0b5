"""End to end on the real engine and the default model (the `api_server` process)."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI

from tests.api.conftest import LiveServer

pytestmark = [pytest.mark.system, pytest.mark.slow]

PARIS_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_answers_paris(api_server: LiveServer) -> None:
    client = OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0)
    response = client.chat.completions.create(
        model=api_server.model, messages=PARIS_QUESTION, temperature=0
    )
    assert "Paris" in response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"  # EOS, with max_tokens unset
    streamed = client.chat.completions.create(
        model=api_server.model, messages=PARIS_QUESTION, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == response.choices[0].message.content


def test_model_info_reads_the_models_config(api_server: LiveServer) -> None:
    model = httpx.get(api_server.url + "/model_info", timeout=10).json()
    assert model["model_type"] == "llama" and model["architectures"] == ["LlamaForCausalLM"]
    info = httpx.get(api_server.url + "/server_info", timeout=10).json()
    assert info["served_model_name"] == model["served_model_name"] == api_server.model


def test_a_prompt_filling_the_context_is_a_400_not_a_500(api_server: LiveServer) -> None:
    prompt = [28] * api_server.max_model_len
    response = httpx.post(
        api_server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=60
    )
    assert response.status_code == 400
    assert str(api_server.max_model_len) in response.json()["error"]["message"]
    almost = httpx.post(
        api_server.url + "/v1/completions",
        json={"prompt": prompt[:-1], "max_tokens": 2},
        timeout=60,
    )
    assert almost.status_code == 400
    assert "lower `max_tokens` to at most 1" in almost.json()["error"]["message"]


def test_leaving_a_stream_keeps_the_server_healthy(api_server: LiveServer) -> None:
    body = {
        "prompt": "Count to one thousand:",
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", api_server.url + "/v1/completions", json=body, timeout=60) as r:
        chunks = []
        for line in r.iter_lines():
            if line.startswith("data:"):
                chunks.append(json.loads(line[5:]))
            if len(chunks) == 3:
                break
    assert len(chunks) == 3
    assert httpx.get(api_server.url + "/health", timeout=10).status_code == 200
    again = httpx.post(
        api_server.url + "/v1/completions",
        json={"prompt": "Hello", "max_tokens": 2, "temperature": 0},
        timeout=60,
    )
    assert again.status_code == 200
