"""Real client libraries against a real socket: the official `openai` client and
huggingface_hub's InferenceClient. Each test runs on the fake engine and on the real
server (`live_server`); assertions hold for any model."""

from __future__ import annotations

import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI

from tests.api.conftest import LiveServer

PROMPT = "The three primary colors are"
QUESTION = [{"role": "user", "content": "Name a large animal."}]


@pytest.fixture
def openai_client(live_server: LiveServer) -> OpenAI:
    return OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_model(openai_client: OpenAI, live_server: LiveServer) -> None:
    models = openai_client.models.list().data
    assert [model.id for model in models] == [live_server.model]
    assert openai_client.models.retrieve(live_server.model).id == live_server.model


def test_completion(openai_client: OpenAI, live_server: LiveServer) -> None:
    response = openai_client.completions.create(
        model=live_server.model, prompt=PROMPT, max_tokens=8, temperature=0
    )
    choice = response.choices[0]
    assert choice.text
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage is not None and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert response.id.startswith("cmpl-")


def test_completion_stream_joins_to_the_same_text(
    openai_client: OpenAI, live_server: LiveServer
) -> None:
    request = {"model": live_server.model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    whole = openai_client.completions.create(**request).choices[0].text
    chunks = list(openai_client.completions.create(**request, stream=True))
    assert len({chunk.id for chunk in chunks}) == 1
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat(openai_client: OpenAI, live_server: LiveServer) -> None:
    response = openai_client.chat.completions.create(
        model=live_server.model, messages=QUESTION, max_tokens=16, temperature=0
    )
    message = response.choices[0].message
    assert message.role == "assistant" and message.content
    assert response.usage is not None and response.usage.prompt_tokens > 5


def test_chat_stream_role_text_finish_and_usage(
    openai_client: OpenAI, live_server: LiveServer
) -> None:
    request = {"model": live_server.model, "messages": QUESTION, "max_tokens": 16, "temperature": 0}
    whole = openai_client.chat.completions.create(**request)
    chunks = list(
        openai_client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(reason is None for reason in finishes[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_choices(openai_client: OpenAI, live_server: LiveServer) -> None:
    response = openai_client.chat.completions.create(
        model=live_server.model, messages=QUESTION, max_tokens=6, n=2, temperature=0.8, seed=3
    )
    assert sorted(choice.index for choice in response.choices) == [0, 1]
    assert all(choice.message.content for choice in response.choices)
    streamed = openai_client.completions.create(
        model=live_server.model, prompt=PROMPT, max_tokens=4, n=2, stream=True
    )
    finished = {c.choices[0].index for c in streamed if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_logprobs(openai_client: OpenAI, live_server: LiveServer) -> None:
    completion = openai_client.completions.create(
        model=live_server.model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens) == completion.usage.completion_tokens
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) >= 2 for top in logprobs.top_logprobs)
    chat = openai_client.chat.completions.create(
        model=live_server.model,
        messages=QUESTION,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(entry.logprob <= 0 for entry in content)


def test_stop_string_ends_the_text_before_it(
    openai_client: OpenAI, live_server: LiveServer
) -> None:
    request = {"model": live_server.model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    text = openai_client.completions.create(**request).choices[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    stopped = openai_client.completions.create(**request, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.index(stop)]


def test_seed_repeats_a_sampled_answer(openai_client: OpenAI, live_server: LiveServer) -> None:
    request = {
        "model": live_server.model,
        "prompt": PROMPT,
        "max_tokens": 10,
        "temperature": 1.0,
        "seed": 1234,
    }
    first = openai_client.completions.create(**request).choices[0].text
    second = openai_client.completions.create(**request).choices[0].text
    assert first == second


def test_hf_text_generation(live_server: LiveServer) -> None:
    client = InferenceClient(base_url=live_server.url, timeout=120)
    text = client.text_generation(PROMPT, max_new_tokens=8)
    assert isinstance(text, str) and text
    streamed = list(client.text_generation(PROMPT, max_new_tokens=8, stream=True))
    assert "".join(streamed) == text
    details = client.text_generation(PROMPT, max_new_tokens=8, details=True)
    assert details.generated_text == text
    assert details.details.generated_tokens == len(details.details.tokens)
    assert details.details.finish_reason in ("length", "eos_token", "stop_sequence")
    last = list(client.text_generation(PROMPT, max_new_tokens=8, stream=True, details=True))[-1]
    assert last.generated_text == text and last.details is not None


def test_hf_chat_completion(live_server: LiveServer) -> None:
    client = InferenceClient(base_url=live_server.url, timeout=120)
    response = client.chat_completion(QUESTION, max_tokens=8, temperature=0)
    assert response.choices[0].message.content
    streamed = client.chat_completion(QUESTION, max_tokens=8, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == response.choices[0].message.content
