"""One bad request per rule, with the answer each must get (status, param, message words).

Shared by the fake-engine and real-server tests. The limits assumed are the Settings
defaults (max_n 8, 8 stop sequences of <= 256 characters, 20 top logprobs, 4 MiB
bodies); the context window is the server's (GET /v1/models), passed to `bad_requests`.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from typing import Any

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
USER_MESSAGES = [{"role": "user", "content": "Hi"}]


@dataclass(frozen=True)
class BadRequest:
    id: str
    path: str
    body: Any = None  # JSON body (POST); None with `raw` or for GET
    status: int = 400
    param: str | None = None
    words: tuple[str, ...] = ()  # all must appear in error.message
    method: str = "POST"
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _completion(**fields: Any) -> dict[str, Any]:
    return {"prompt": "Hello", "max_tokens": 4, **fields}


def _chat(**fields: Any) -> dict[str, Any]:
    return {"messages": USER_MESSAGES, "max_tokens": 4, **fields}


def bad_requests(context: int) -> list[BadRequest]:
    """The table for a server whose context window is `context` tokens."""
    return [
        BadRequest(
            "temperature-high",
            COMPLETIONS,
            _completion(temperature=5),
            param="temperature",
            words=("temperature", "less than or equal to 2", "5"),
        ),
        BadRequest(
            "temperature-negative",
            CHAT,
            _chat(temperature=-1),
            param="temperature",
            words=("temperature", "greater than or equal to 0", "-1"),
        ),
        BadRequest(
            "top-p-zero",
            COMPLETIONS,
            _completion(top_p=0),
            param="top_p",
            words=("top_p", "greater than 0"),
        ),
        BadRequest(
            "top-p-high",
            COMPLETIONS,
            _completion(top_p=1.5),
            param="top_p",
            words=("top_p", "less than or equal to 1", "1.5"),
        ),
        BadRequest(
            "top-k-negative",
            COMPLETIONS,
            _completion(top_k=-5),
            param="top_k",
            words=("top_k", "-1", "-5"),
        ),
        BadRequest(
            "min-p-high",
            COMPLETIONS,
            _completion(min_p=2),
            param="min_p",
            words=("min_p", "less than or equal to 1"),
        ),
        BadRequest(
            "presence-penalty",
            COMPLETIONS,
            _completion(presence_penalty=3),
            param="presence_penalty",
            words=("presence_penalty", "2", "3"),
        ),
        BadRequest(
            "repetition-penalty",
            COMPLETIONS,
            _completion(repetition_penalty=0),
            param="repetition_penalty",
            words=("repetition_penalty", "greater than 0"),
        ),
        BadRequest(
            "max-tokens-negative",
            COMPLETIONS,
            _completion(max_tokens=-1),
            param="max_tokens",
            words=("max_tokens", "greater than or equal to 0", "-1"),
        ),
        BadRequest(
            "chat-max-tokens-zero",
            CHAT,
            _chat(max_tokens=0),
            param="max_tokens",
            words=("max_tokens", "greater than or equal to 1", "0"),
        ),
        BadRequest(
            "max-tokens-text",
            COMPLETIONS,
            _completion(max_tokens="many"),
            param="max_tokens",
            words=("max_tokens", "integer", "many"),
        ),
        BadRequest(
            "seed-text",
            COMPLETIONS,
            _completion(seed="abc"),
            param="seed",
            words=("seed", "integer"),
        ),
        BadRequest(
            "n-too-many", COMPLETIONS, _completion(n=9), param="n", words=("`n`", "at most 8", "9")
        ),
        BadRequest(
            "n-zero", CHAT, _chat(n=0), param="n", words=("`n`", "greater than or equal to 1")
        ),
        BadRequest(
            "prompt-missing",
            COMPLETIONS,
            {"max_tokens": 4},
            param="prompt",
            words=("prompt", "required"),
        ),
        BadRequest(
            "prompt-object",
            COMPLETIONS,
            {"prompt": {"text": "hi"}},
            param="prompt",
            words=("prompt", "string", "token ids"),
        ),
        BadRequest(
            "prompt-empty-list",
            COMPLETIONS,
            {"prompt": []},
            param="prompt",
            words=("prompt", "empty"),
        ),
        BadRequest(
            "prompt-bad-token",
            COMPLETIONS,
            {"prompt": [1, 99999]},
            param="prompt",
            words=("prompt[1]", "99999", "vocabulary"),
        ),
        BadRequest(
            "prompt-too-long",
            COMPLETIONS,
            {"prompt": [1] * (context + 10)},
            param="prompt",
            words=("prompt", str(context + 10), str(context - 1)),
        ),
        BadRequest(
            "prompt-plus-max-tokens",
            COMPLETIONS,
            _completion(max_tokens=context),
            param="max_tokens",
            words=("max_tokens", str(context), "context window"),
        ),
        BadRequest(
            "chat-plus-max-tokens",
            CHAT,
            _chat(max_completion_tokens=context),
            param="max_completion_tokens",
            words=("max_completion_tokens", str(context), "context window"),
        ),
        BadRequest(
            "stop-too-many",
            COMPLETIONS,
            _completion(stop=[f"s{i}" for i in range(9)]),
            param="stop",
            words=("stop", "9", "at most 8"),
        ),
        BadRequest(
            "stop-empty",
            COMPLETIONS,
            _completion(stop=["ok", ""]),
            param="stop",
            words=("stop[1]", "empty"),
        ),
        BadRequest(
            "stop-too-long",
            COMPLETIONS,
            _completion(stop="x" * 300),
            param="stop",
            words=("stop[0]", "300", "256"),
        ),
        BadRequest(
            "stop-number",
            COMPLETIONS,
            _completion(stop=3),
            param="stop",
            words=("stop", "string or a list of strings"),
        ),
        BadRequest(
            "stop-token-ids",
            COMPLETIONS,
            _completion(stop_token_ids=[-1]),
            param="stop_token_ids",
            words=("stop_token_ids[0]", "-1", "vocabulary"),
        ),
        BadRequest(
            "logit-bias-key",
            COMPLETIONS,
            _completion(logit_bias={"abc": 1}),
            param="logit_bias",
            words=("logit_bias", "abc", "token id"),
        ),
        BadRequest(
            "logit-bias-value",
            COMPLETIONS,
            _completion(logit_bias={"5": 500}),
            param="logit_bias",
            words=("logit_bias", "-100", "100", "500"),
        ),
        BadRequest(
            "logit-bias-vocab",
            COMPLETIONS,
            _completion(logit_bias={"999999": 1}),
            param="logit_bias",
            words=("logit_bias", "999999", "vocabulary"),
        ),
        BadRequest(
            "logprobs-too-many",
            COMPLETIONS,
            _completion(logprobs=21),
            param="logprobs",
            words=("logprobs", "at most 20", "21"),
        ),
        BadRequest(
            "prompt-logprobs-too-many",
            COMPLETIONS,
            _completion(prompt_logprobs=21),
            param="prompt_logprobs",
            words=("prompt_logprobs", "at most 20", "21"),
        ),
        BadRequest(
            "chat-prompt-logprobs-streamed",
            CHAT,
            _chat(prompt_logprobs=1, stream=True),
            param="prompt_logprobs",
            words=("prompt_logprobs", "stream"),
        ),
        BadRequest(
            "min-tokens-over-max",
            COMPLETIONS,
            _completion(min_tokens=10, max_tokens=5),
            param="min_tokens",
            words=("min_tokens", "10", "5"),
        ),
        BadRequest(
            "unknown-model",
            COMPLETIONS,
            _completion(model="gpt-4"),
            status=404,
            param="model",
            words=("gpt-4", "does not exist"),
        ),
        BadRequest(
            "stream-with-bad-value",
            CHAT,
            _chat(stream=True, temperature=9),
            param="temperature",
            words=("temperature", "9"),
        ),
        BadRequest(
            "messages-missing",
            CHAT,
            {"max_tokens": 4},
            param="messages",
            words=("messages", "required"),
        ),
        BadRequest(
            "messages-empty",
            CHAT,
            {"messages": []},
            param="messages",
            words=("messages", "at least 1"),
        ),
        BadRequest(
            "message-role",
            CHAT,
            {"messages": [{"role": "robot", "content": "x"}]},
            param="messages[0].role",
            words=("messages[0].role", "robot", "user"),
        ),
        BadRequest(
            "message-content-misspelt",
            CHAT,
            {"messages": [{"role": "user", "contents": "Hi"}], "max_tokens": 4},
            param="messages[0].content",
            words=("messages[0].content", "required", "tool_calls"),
        ),
        BadRequest(
            "message-content-no-parts",
            CHAT,
            {"messages": [{"role": "user", "content": []}], "max_tokens": 4},
            param="messages[0].content",
            words=("messages[0].content", "empty list"),
        ),
        BadRequest(
            "message-content-null",
            CHAT,
            {"messages": [{"role": "assistant", "content": None}], "max_tokens": 4},
            param="messages[0].content",
            words=("messages[0].content", "required"),
        ),
        BadRequest(
            "message-image",
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            param="messages[0].content[0]",
            words=("image_url", "only 'text'"),
        ),
        BadRequest(
            "top-logprobs-alone",
            CHAT,
            _chat(top_logprobs=2),
            param="top_logprobs",
            words=("top_logprobs", "logprobs"),
        ),
        BadRequest(
            "top-logprobs-too-many",
            CHAT,
            _chat(logprobs=True, top_logprobs=50),
            param="top_logprobs",
            words=("top_logprobs", "at most 20", "50"),
        ),
        BadRequest(
            "invalid-json",
            COMPLETIONS,
            raw=b'{"prompt": "hi",',
            words=("not valid JSON",),
            headers={"content-type": "application/json"},
        ),
        BadRequest("json-array", COMPLETIONS, [1, 2], words=("JSON object",)),
        BadRequest(
            "max-tokens-bool",
            COMPLETIONS,
            _completion(max_tokens=True),
            param="max_tokens",
            words=("max_tokens", "valid integer", "True"),
        ),
        BadRequest(
            "max-tokens-string",
            CHAT,
            _chat(max_tokens="4"),
            param="max_tokens",
            words=("max_tokens", "valid integer", "'4'"),
        ),
        BadRequest(
            "stream-string",
            CHAT,
            _chat(stream="yes"),
            param="stream",
            words=("stream", "valid boolean", "'yes'"),
        ),
        BadRequest(
            "temperature-string",
            COMPLETIONS,
            _completion(temperature="0.5"),
            param="temperature",
            words=("temperature", "valid number"),
        ),
        BadRequest(
            "tgi-max-new-tokens-string",
            "/generate",
            {"inputs": "Hi", "parameters": {"max_new_tokens": "4"}},
            param="parameters.max_new_tokens",
            words=("parameters.max_new_tokens", "valid integer"),
        ),
        BadRequest(
            "no-content-type",
            COMPLETIONS,
            raw=b'{"prompt": "hi"}',
            status=415,
            words=("Content-Type: application/json", "got none"),
        ),
        BadRequest(
            "text-plain",
            CHAT,
            raw=b'{"messages": []}',
            status=415,
            words=("Content-Type: application/json", "text/plain"),
            headers={"content-type": "text/plain"},
        ),
        BadRequest(
            "gzip-body",
            COMPLETIONS,
            raw=gzip.compress(b'{"prompt": "hi", "max_tokens": 1}'),
            status=415,
            words=("Content-Encoding 'gzip'", "uncompressed"),
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        ),
        BadRequest(
            "invalid-utf8",
            COMPLETIONS,
            raw=b'{"prompt": "caf\xe9"}',
            words=("not valid UTF-8", "0xe9", "offset 15"),
            headers={"content-type": "application/json"},
        ),
        BadRequest(
            "json-too-deep",
            COMPLETIONS,
            raw=b'{"prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}",
            words=("too deeply",),
            headers={"content-type": "application/json"},
        ),
        BadRequest(
            "tgi-inputs-missing",
            "/generate",
            {"parameters": {}},
            param="inputs",
            words=("inputs", "required"),
        ),
        BadRequest(
            "tgi-temperature-zero",
            "/generate",
            {"inputs": "Hi", "parameters": {"temperature": 0}},
            param="parameters.temperature",
            words=("parameters.temperature", "greater than 0"),
        ),
        BadRequest(
            "tgi-best-of",
            "/generate",
            {"inputs": "Hi", "parameters": {"best_of": 2}},
            param="parameters.best_of",
            words=("best_of", "not supported"),
        ),
        BadRequest(
            "tgi-stream-max-new-tokens",
            "/generate_stream",
            {"inputs": "Hi", "parameters": {"max_new_tokens": context}},
            param="parameters.max_new_tokens",
            words=("parameters.max_new_tokens", str(context), "context window"),
        ),
        BadRequest(
            "tokenize-both",
            "/tokenize",
            {"prompt": "a", "messages": USER_MESSAGES},
            param="prompt",
            words=("exactly one",),
        ),
        BadRequest(
            "detokenize-loose-id",
            "/detokenize",
            {"tokens": [5, "6"]},
            param="tokens[1]",
            words=("tokens[1]", "integer"),
        ),
        BadRequest(
            "tokenize-loose-bool",
            "/tokenize",
            {"prompt": "Hi", "add_special_tokens": "no"},
            param="add_special_tokens",
            words=("add_special_tokens", "boolean", "no"),
        ),
        BadRequest(
            "detokenize-range",
            "/detokenize",
            {"tokens": [5, -3]},
            param="tokens",
            words=("tokens[1]", "-3", "vocabulary"),
        ),
        BadRequest(
            "unknown-model-route",
            "/v1/models/gpt-4",
            method="GET",
            status=404,
            param="model",
            words=("gpt-4",),
        ),
        BadRequest(
            "unknown-route",
            "/v1/audio/speech",
            {"input": "x"},
            status=404,
            words=("no route", "/v1/audio/speech"),
        ),
        BadRequest("wrong-method", CHAT, method="GET", status=405, words=("GET", "POST")),
        BadRequest(
            "body-too-large",
            COMPLETIONS,
            raw=b"x" * (4 * 1024 * 1024 + 1),
            status=413,
            words=("4194304 bytes",),
            headers={"content-type": "application/json"},
        ),
    ]
