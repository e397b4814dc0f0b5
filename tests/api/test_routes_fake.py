"""Route behaviour over the fake engine, where the exact output is known in advance."""

from __future__ import annotations

import json

import pytest

from app import __version__
from app.core import SamplingParams
from tests.api.conftest import FakeApp, fake_settings, running_fake_app
from tests.api.fake_engine import DEFAULT_REPLY, FakeEngine

pytestmark = pytest.mark.anyio


def sse_payloads(body: str) -> list[str]:
    """The data of each `data:` event, in order."""
    return [line[len("data: ") :] for line in body.split("\n") if line.startswith("data: ")]


def sse_json(body: str) -> list[dict]:
    return [json.loads(data) for data in sse_payloads(body) if data != "[DONE]"]


def reply_prefix(engine: FakeEngine, num_tokens: int) -> str:
    return engine.tokenizer.decode(engine.reply_ids()[:num_tokens])


async def test_completion_text_usage_and_engine_params(fake_app: FakeApp) -> None:
    response = await fake_app.client.post(
        "/v1/completions",
        json={
            "model": fake_app.model,
            "prompt": "Hello there",
            "max_tokens": 5,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 7,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "seed": 42,
            "stop": "zzz",
            "stop_token_ids": [13],
            "logit_bias": {"100": -5, "7": 2},
            "ignore_eos": True,
            "min_tokens": 2,
            "user": "someone",
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == fake_app.model
    choice = body["choices"][0]
    assert choice["text"] == reply_prefix(fake_app.engine, 5)
    assert choice["finish_reason"] == "length"
    prompt_ids = fake_app.engine.tokenizer.encode("Hello there")
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["usage"]["completion_tokens"] == 5 and body["usage"]["total_tokens"] == 5 + len(
        prompt_ids
    )
    request = fake_app.engine.requests[-1]
    assert request.prompt_token_ids == prompt_ids and request.n == 1
    assert request.request_id == body["id"]
    assert request.params == SamplingParams(
        max_tokens=5,
        temperature=0.5,
        top_p=0.9,
        top_k=7,
        min_p=0.1,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias=((7, 2.0), (100, -5.0)),
        seed=42,
        stop=("zzz",),
        stop_token_ids=(13,),
        ignore_eos=True,
        min_tokens=2,
    )


async def test_defaults_mean_off_and_unset_max_tokens_is_the_default_cap(
    fake_app: FakeApp,
) -> None:
    response = await fake_app.client.post("/v1/completions", json={"prompt": "Hi", "top_k": -1})
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == DEFAULT_REPLY
    assert response.json()["choices"][0]["finish_reason"] == "stop"
    assert fake_app.engine.requests[-1].params == SamplingParams(max_tokens=1024)


async def test_the_default_max_tokens_is_what_the_context_leaves_at_most(
    default_model_path, http_tokenizer
) -> None:
    engine = FakeEngine(http_tokenizer)
    settings = fake_settings(default_model_path, default_max_tokens=5000)
    async with running_fake_app(settings, engine) as fake:
        prompt = "word " * 4000  # thousands of tokens: less than 5000 left in 8192
        for path, body in (
            ("/v1/completions", {"prompt": prompt}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}),
            ("/generate", {"inputs": prompt}),
        ):
            response = await fake.client.post(path, json=body)
            assert response.status_code == 200, response.text
            request = engine.requests[-1]
            room = FakeEngine.max_model_len - len(request.prompt_token_ids)
            assert room < 5000 and request.params.max_tokens == room, path


async def test_max_tokens_limit_caps_an_unset_max_tokens(
    default_model_path, http_tokenizer
) -> None:
    engine = FakeEngine(http_tokenizer)
    settings = fake_settings(default_model_path, max_tokens_limit=3)
    async with running_fake_app(settings, engine) as fake:
        client = fake.client
        response = await client.post("/v1/completions", json={"prompt": "Hi"})
        assert response.json()["choices"][0]["finish_reason"] == "length"
        assert engine.requests[-1].params.max_tokens == 3
        too_many = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
        assert too_many.status_code == 400
        assert "at most 3" in too_many.json()["error"]["message"]


async def test_unknown_and_ignorable_fields_are_accepted(fake_app: FakeApp) -> None:
    response = await fake_app.client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Hi", "vendor_field": 1}],
            "max_tokens": 2,
            "vendor_extension": {"x": 1},
            "service_tier": "auto",
            "metadata": {"k": "v"},
            "response_format": {"type": "text"},
            "tool_choice": "none",
        },
    )
    assert response.status_code == 200, response.text


UNIMPLEMENTED_REQUESTS = [
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    (
        "/v1/chat/completions",
        "response_format",
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
    ),
    ("/v1/completions", "response_format", {"type": "json_object"}),
    # the fake engine cannot constrain output, so it cannot enforce tool calls
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "function_call", "auto"),
    ("/v1/chat/completions", "guided_json", {"type": "object"}),
    ("/v1/completions", "guided_regex", "[a-z]+"),
    ("/v1/chat/completions", "structured_outputs", {"choice": ["a", "b"]}),
    ("/v1/completions", "suffix", "end"),
    ("/v1/completions", "best_of", 3),
    ("/v1/chat/completions", "modalities", ["text", "audio"]),
    # vLLM's extensions that would change the prompt or the output
    ("/v1/chat/completions", "chat_template_kwargs", {"enable_thinking": False}),
    ("/v1/chat/completions", "continue_final_message", True),
    ("/v1/chat/completions", "chat_template", "{{ messages }}"),
    ("/v1/chat/completions", "echo", True),
    ("/v1/completions", "truncate_prompt_tokens", 8),
    ("/v1/completions", "use_beam_search", True),
    ("/v1/completions", "allowed_token_ids", [1, 2]),
    ("/v1/chat/completions", "return_tokens_as_token_ids", True),
    ("/v1/chat/completions", "cache_salt", "tenant-a"),
    ("/v1/chat/completions", "reasoning_effort", "low"),
]


@pytest.mark.parametrize(("path", "field", "value"), UNIMPLEMENTED_REQUESTS)
async def test_an_unimplemented_field_is_refused_by_name(
    fake_app: FakeApp, path: str, field: str, value: object
) -> None:
    prompt = (
        {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"}
    )
    before = len(fake_app.engine.requests)
    response = await fake_app.client.post(path, json={**prompt, "max_tokens": 2, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_field"
    assert f"`{field}` is not supported" in error["message"]
    assert len(fake_app.engine.requests) == before  # nothing reached the engine


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_vllms_continuous_usage_stats_is_refused_by_name(fake_app: FakeApp, path) -> None:
    prompt = (
        {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"}
    )
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {**prompt, "max_tokens": 2, "stream": True, "stream_options": options}
    response = await fake_app.client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    param = "stream_options.continuous_usage_stats"
    assert (error["param"], error["code"]) == (param, "unsupported_field")
    options["continuous_usage_stats"] = False
    assert (await fake_app.client.post(path, json=body)).status_code == 200


async def test_vllm_extensions_at_their_defaults_are_served(fake_app: FakeApp) -> None:
    defaults = {
        "use_beam_search": False,
        "length_penalty": 1.0,
        "bad_words": [],
        "echo": False,
        "continue_final_message": False,
        "chat_template_kwargs": {},
        "return_tokens_as_token_ids": False,
    }
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **defaults}
    response = await fake_app.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_max_completion_tokens_wins_on_both_routes(fake_app: FakeApp, path: str) -> None:
    prompt = (
        {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"}
    )
    response = await fake_app.client.post(
        path, json={**prompt, "max_tokens": 5, "max_completion_tokens": 2}
    )
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    assert fake_app.engine.requests[-1].params.max_tokens == 2


async def test_several_prompts_and_n_number_choices_in_order(fake_app: FakeApp) -> None:
    response = await fake_app.client.post(
        "/v1/completions", json={"prompt": ["One", "Two words"], "max_tokens": 2, "n": 2}
    )
    body = response.json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2, 3]
    requests = fake_app.engine.requests[-2:]
    assert [r.n for r in requests] == [2, 2]
    assert requests[0].request_id != requests[1].request_id
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 8,
        "total_tokens": prompt_tokens + 8,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_token_id_prompts(fake_app: FakeApp) -> None:
    response = await fake_app.client.post(
        "/v1/completions", json={"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 1}
    )
    assert response.status_code == 200
    assert [r.prompt_token_ids for r in fake_app.engine.requests[-2:]] == [[1, 2, 3], [4, 5]]


async def test_echo_prepends_the_prompt(fake_app: FakeApp) -> None:
    request = {"prompt": "Say:", "max_tokens": 3, "echo": True}
    whole = (await fake_app.client.post("/v1/completions", json=request)).json()
    assert whole["choices"][0]["text"] == "Say:" + reply_prefix(fake_app.engine, 3)
    streamed = await fake_app.client.post("/v1/completions", json={**request, "stream": True})
    chunks = sse_json(streamed.text)
    assert chunks[0]["choices"][0]["text"] == "Say:"
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


async def test_stop_string_and_stop_reason(fake_app: FakeApp) -> None:
    response = await fake_app.client.post(
        "/v1/completions", json={"prompt": "Hi", "stop": [" fox"], "max_tokens": 20}
    )
    choice = response.json()["choices"][0]
    assert choice["text"] == " The quick brown"
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == " fox"


async def test_completion_stream_frames(fake_app: FakeApp) -> None:
    response = await fake_app.client.post(
        "/v1/completions",
        json={
            "prompt": "Hi",
            "max_tokens": 3,
            "stream": True,
            "logprobs": 1,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.text.endswith("data: [DONE]\n\n")
    chunks = sse_json(response.text)
    assert len({chunk["id"] for chunk in chunks}) == 1
    texts = [c["choices"][0]["text"] for c in chunks[:-1]]
    assert "".join(texts) == reply_prefix(fake_app.engine, 3)
    offsets = [c["choices"][0]["logprobs"]["text_offset"][0] for c in chunks[:-1]]
    assert offsets == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


async def test_chat_roles_content_parts_and_template(fake_app: FakeApp) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}],
        },
    ]
    response = await fake_app.client.post(
        "/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 2}
    )
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": reply_prefix(fake_app.engine, 2),
    }
    expected = fake_app.engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    )
    assert fake_app.engine.requests[-1].prompt_token_ids == expected
    assert fake_app.engine.requests[-1].params.max_tokens == 2


async def test_chat_stream_frames(fake_app: FakeApp) -> None:
    response = await fake_app.client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2,
            "n": 2,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 1,
        },
    )
    chunks = sse_json(response.text)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": ""},
    ]
    finals = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finals) == [0, 1]
    entry = chunks[2]["choices"][0]["logprobs"]["content"][0]
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
    assert entry["bytes"] == list(entry["token"].encode()) and len(entry["top_logprobs"]) == 1
    assert response.text.endswith("data: [DONE]\n\n") and "usage" not in chunks[-1]


async def test_tgi_generate_details_and_compat_route(fake_app: FakeApp) -> None:
    request = {
        "inputs": "Hi",
        "parameters": {
            "max_new_tokens": 3,
            "details": True,
            "return_full_text": True,
            "top_n_tokens": 2,
        },
    }
    body = (await fake_app.client.post("/generate", json=request)).json()
    assert body["generated_text"] == "Hi" + reply_prefix(fake_app.engine, 3)
    details = body["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 3
    assert [t["id"] for t in details["tokens"]] == fake_app.engine.reply_ids()[:3]
    assert all(len(top) == 2 for top in details["top_tokens"])
    assert fake_app.engine.requests[-1].params.temperature == 0.0  # greedy unless sampling
    compat = (await fake_app.client.post("/", json=request)).json()
    assert isinstance(compat, list) and compat[0]["generated_text"] == body["generated_text"]


async def test_tgi_sampling_truncate_and_eos(fake_app: FakeApp) -> None:
    request = {
        "inputs": "one two three four",
        "parameters": {"do_sample": True, "seed": 5, "truncate": 2, "details": True},
    }
    body = (await fake_app.client.post("/generate", json=request)).json()
    sent = fake_app.engine.requests[-1]
    assert len(sent.prompt_token_ids) == 2
    assert sent.params.temperature == 1.0 and sent.params.seed == 5
    assert body["details"]["finish_reason"] == "eos_token" and body["details"]["seed"] == 5
    assert body["generated_text"] == DEFAULT_REPLY


async def test_tgi_stream_one_event_per_token(fake_app: FakeApp) -> None:
    response = await fake_app.client.post(
        "/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}}
    )
    events = sse_json(response.text)
    assert [e["token"]["id"] for e in events] == fake_app.engine.reply_ids()[:4]
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert events[-1]["details"] == {
        "finish_reason": "length",
        "generated_tokens": 4,
        "seed": None,
        "input_length": len(fake_app.engine.tokenizer.encode("Hi")),
    }
    assert "[DONE]" not in response.text


async def test_models_tokenize_detokenize(fake_app: FakeApp) -> None:
    models = (await fake_app.client.get("/v1/models")).json()
    assert models["data"][0]["id"] == fake_app.model
    assert models["data"][0]["max_model_len"] == 8192
    card = (await fake_app.client.get(f"/v1/models/{fake_app.model}")).json()
    assert card["id"] == fake_app.model
    tokens = (await fake_app.client.post("/tokenize", json={"prompt": "Hello world"})).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 8192
    text = (await fake_app.client.post("/detokenize", json={"tokens": tokens["tokens"]})).json()
    assert text == {"prompt": "Hello world"}
    chat = await fake_app.client.post(
        "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}
    )
    expected = fake_app.engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat.json()["tokens"] == expected
    info = (await fake_app.client.get("/info")).json()
    assert info["model_id"] == fake_app.model and info["max_total_tokens"] == 8192


async def test_server_info_and_model_info_for_routers(fake_app: FakeApp) -> None:
    """What SGLang's model gateway registers a replica with (docs/router-comparison.md)."""
    settings = fake_app.app.state.server.settings
    info = (await fake_app.client.get("/server_info")).json()
    assert info == {
        "served_model_name": fake_app.model,
        "version": __version__,
        "max_model_len": 8192,
        "max_running_requests": settings.max_num_seqs,
        "max_prefill_tokens": settings.max_num_batched_tokens,
        "lamina_enable_prefix_caching": settings.enable_prefix_caching,
    }
    assert "model_path" not in info  # the router would load a tokenizer from it
    model = (await fake_app.client.get("/model_info")).json()
    # The fake loader reads no config.json: no type, no architectures.
    assert model == {
        "served_model_name": fake_app.model,
        "is_generation": True,
        "model_type": None,
        "architectures": [],
    }


async def test_unknown_fields_are_logged_at_debug_level(fake_app: FakeApp, caplog) -> None:
    with caplog.at_level("DEBUG", logger="lamina.api"):
        await fake_app.client.post(
            "/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "best_of": 3}
        )
    assert any("best_of" in record.getMessage() for record in caplog.records)


async def test_chunked_body_over_the_limit_is_413(fake_app: FakeApp) -> None:
    async def body():
        yield b'{"prompt": "hi", "pad": "'
        for _ in range(5):
            yield b"x" * 1_000_000
        yield b'"}'

    response = await fake_app.client.post(
        "/v1/completions", content=body(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


async def test_abort_in_engine_is_503_and_bugs_are_opaque_500s(fake_app: FakeApp) -> None:
    aborted = await fake_app.client.post("/v1/completions", json={"prompt": "ABORT_IN_ENGINE"})
    assert aborted.status_code == 503
    assert aborted.json()["error"]["code"] == "request_aborted"

    def broken_generate(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    fake_app.engine.add_request = broken_generate  # type: ignore[method-assign]
    response = await fake_app.client.post("/v1/completions", json={"prompt": "Hi"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "secret" not in response.text
    assert "Traceback" not in response.text


async def test_cors_when_origins_are_configured(default_model_path, http_tokenizer) -> None:
    settings = fake_settings(default_model_path, cors_origins=("https://app.example",))
    async with running_fake_app(settings, FakeEngine(http_tokenizer)) as fake:
        response = await fake.client.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
            },
        )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"


@pytest.mark.parametrize("stream", [False, True])
async def test_logprob_bytes_are_the_tokens_own_bytes(
    default_model_path, http_tokenizer, stream: bool
) -> None:
    """A token holding part of a UTF-8 character reports its bytes, not U+FFFD's."""
    engine = FakeEngine(http_tokenizer, reply="😀 ok")
    async with running_fake_app(fake_settings(default_model_path), engine) as app:
        response = await app.client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
                "logprobs": True,
                "top_logprobs": 2,
                "stream": stream,
            },
        )
    if stream:
        choices = [c["choices"][0] for c in sse_json(response.text)]
        entries = [e for c in choices if c.get("logprobs") for e in c["logprobs"]["content"]]
    else:
        entries = response.json()["choices"][0]["logprobs"]["content"]
    reply_ids = engine.reply_ids()
    assert entries[0]["token"] == "\ufffd" and entries[0]["bytes"][0] == 0xF0
    assert b"".join(bytes(e["bytes"]) for e in entries[:3]) == "😀".encode()
    for entry, token_id in zip(entries, reply_ids):
        assert bytes(entry["bytes"]) == http_tokenizer.token_bytes(token_id)
        for top in entry["top_logprobs"]:
            assert top["bytes"] and (top["token"] != "\ufffd" or top["bytes"] != [239, 191, 189])


async def test_a_server_that_stores_no_responses_says_store_false(
    default_model_path, http_tokenizer
) -> None:
    """LAMINA_RESPONSES_STORE_MAX_ENTRIES=0 keeps nothing: a response asked to be stored
    says it was not, rather than `store: true` and a 404 on the follow-up."""
    settings = fake_settings(default_model_path, responses_store_max_entries=0)
    async with running_fake_app(settings, FakeEngine(http_tokenizer)) as fake:
        body = {"input": "Hi", "max_output_tokens": 2, "store": True}
        response = await fake.client.post("/v1/responses", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["store"] is False
    async with running_fake_app(
        fake_settings(default_model_path), FakeEngine(http_tokenizer)
    ) as fake:
        response = await fake.client.post("/v1/responses", json=body)
        assert response.json()["store"] is True


@pytest.mark.parametrize("path", ["/health", "/ready", "/v1/models", "/info"])
async def test_head_answers_like_get_without_a_body(fake_app: FakeApp, path: str) -> None:
    got = await fake_app.client.get(path)
    head = await fake_app.client.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert int(head.headers["content-length"]) == len(got.content) > 0


async def test_other_wrong_methods_stay_405_and_allow_names_head(fake_app: FakeApp) -> None:
    response = await fake_app.client.delete("/health")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert "allowed: GET, HEAD" in response.json()["error"]["message"]
    # A POST route takes no HEAD: 405, as before.
    head = await fake_app.client.head("/v1/chat/completions")
    assert head.status_code == 405 and head.headers["allow"] == "POST"
    paths = fake_app.app.openapi()["paths"].values()
    assert not any("head" in operations for operations in paths)


async def test_a_head_counts_under_its_route(fake_app: FakeApp) -> None:
    await fake_app.client.head("/health")
    metrics = (await fake_app.client.get("/metrics")).text
    assert any(
        'method="HEAD"' in line and 'route="/health"' in line for line in metrics.split("\n")
    )
