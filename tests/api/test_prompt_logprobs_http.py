"""Prompt log-probabilities through HTTP on the real engine (the `api_server` process):
completions' `echo` with `logprobs` (with `max_tokens` 0 or more, streamed or not) and
vLLM's `prompt_logprobs` on completions and chat. Their values are checked against
transformers in tests/engine/test_prompt_outputs.py and, through lm-eval, tests/eval."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI

from tests.api.conftest import LiveServer

pytestmark = [pytest.mark.system, pytest.mark.slow]

PROMPT = "The capital of France is Paris. The capital of Italy is"


def client_for(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_echo_with_logprobs_scores_every_prompt_token(api_server: LiveServer) -> None:
    client = client_for(api_server)
    scored = client.completions.create(
        model=api_server.model, prompt=PROMPT, echo=True, logprobs=3, max_tokens=0
    )
    choice = scored.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    logprobs = choice.logprobs
    num_prompt = scored.usage.prompt_tokens
    assert scored.usage.completion_tokens == 0
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == num_prompt
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    for token, logprob, top in zip(
        logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]
    ):
        assert top[token] == logprob and len(top) in (3, 4)  # the token and the top 3
    assert "".join(logprobs.tokens) == PROMPT
    assert logprobs.text_offset == [
        sum(len(t) for t in logprobs.tokens[:i]) for i in range(num_prompt)
    ]
    # One token more (what lm-eval asks): the same prompt part, then the token's entry.
    more = client.completions.create(
        model=api_server.model, prompt=PROMPT, echo=True, logprobs=3, max_tokens=1, temperature=0
    ).choices[0]
    assert more.logprobs.token_logprobs[:num_prompt] == logprobs.token_logprobs
    assert more.logprobs.tokens[:num_prompt] == logprobs.tokens
    assert len(more.logprobs.tokens) == num_prompt + 1
    assert more.text == PROMPT + more.logprobs.tokens[-1]
    assert more.logprobs.text_offset[-1] == len(PROMPT)


def test_streamed_echo_with_logprobs_equals_the_answer(api_server: LiveServer) -> None:
    body = {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0}
    answer = httpx.post(api_server.url + "/v1/completions", json=body, timeout=60).json()
    text, tokens, token_logprobs = "", [], []
    streamed = {**body, "stream": True}
    with httpx.stream("POST", api_server.url + "/v1/completions", json=streamed, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                (choice,) = json.loads(line[6:])["choices"]
                text += choice["text"]
                if choice["logprobs"]:
                    tokens += choice["logprobs"]["tokens"]
                    token_logprobs += choice["logprobs"]["token_logprobs"]
    expected = answer["choices"][0]
    assert text == expected["text"]
    assert tokens == expected["logprobs"]["tokens"]
    assert token_logprobs == expected["logprobs"]["token_logprobs"]


def test_vllm_prompt_logprobs_on_completions_and_chat(api_server: LiveServer) -> None:
    url = api_server.url
    body = {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 2, "echo": True, "logprobs": 0}
    choice = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    entries = choice["prompt_logprobs"]
    assert entries[0] is None
    echoed = choice["logprobs"]
    for position, entry in enumerate(entries[1:], start=1):
        assert 1 <= len(entry) <= 3  # the prompt token and the top 2
        token = [e for e in entry.values() if e["decoded_token"] == echoed["tokens"][position]]
        assert token and token[0]["logprob"] == echoed["token_logprobs"][position]
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[0] == 1
    messages = [{"role": "user", "content": "Hi"}]
    chat = {"messages": messages, "max_tokens": 1, "prompt_logprobs": 0}
    answer = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).json()
    prompt_entries = answer["prompt_logprobs"]
    assert len(prompt_entries) == answer["usage"]["prompt_tokens"]
    assert prompt_entries[0] is None and all(len(e) == 1 for e in prompt_entries[1:])


def test_tgi_decoder_input_details(api_server: LiveServer) -> None:
    parameters = {"max_new_tokens": 1, "details": True, "decoder_input_details": True}
    body = {"inputs": PROMPT, "parameters": parameters}
    details = httpx.post(api_server.url + "/generate", json=body, timeout=60).json()["details"]
    scored = {"prompt": PROMPT, "echo": True, "logprobs": 0, "max_tokens": 0}
    choice = httpx.post(api_server.url + "/v1/completions", json=scored, timeout=60).json()
    echoed = choice["choices"][0]["logprobs"]
    assert [t["text"] for t in details["prefill"]] == echoed["tokens"]
    assert [t["logprob"] for t in details["prefill"]] == echoed["token_logprobs"]
    streamed = httpx.post(api_server.url + "/generate_stream", json=body, timeout=60)
    assert streamed.status_code == 400
    assert "decoder_input_details" in streamed.json()["error"]["message"]
