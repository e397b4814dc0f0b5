"""Per-token SSE frames written from templates, without building pydantic models.

A streamed token is one small JSON object whose fields, apart from the text, are the
same for the whole response (id, created, model) or drawn from a handful of values.
Building and dumping a pydantic chunk costs ~5 us per token; filling a template
prepared once per response costs a fraction of that. The output is the JSON the
pydantic chunk models of schemas.py / schemas_tgi.py produce (tests/perf_http checks
it field by field), so /docs stays the reference for what a chunk contains. Anything
beyond plain text (logprobs, usage, TGI top tokens and details) still goes through the
models.
"""

from __future__ import annotations

import json
import math

# The C encoder behind json.dumps(ensure_ascii=False): escapes quotes, backslashes and
# control characters, and writes every other character as UTF-8, as pydantic does.
_json_string = json.encoder.encode_basestring  # type: ignore[attr-defined]
# JSON has no -inf; a token the sampler masked out gets this instead (as vLLM does).
MIN_LOGPROB = -9999.0


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def json_scalar(value: str | int | float | bool | None) -> str:
    """A JSON literal for a string, number, bool or None."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return json.dumps(value) if math.isfinite(value) else "null"  # as pydantic does
    return str(int(value))


def _frame(*parts: str) -> bytes:
    return ("data: " + "".join(parts) + "\n\n").encode("utf-8")


def _header(response_id: str, object_name: str, created: int, model: str) -> str:
    return (
        f'{{"id":{_json_string(response_id)},"object":"{object_name}",'
        f'"created":{int(created)},"model":{_json_string(model)},"choices":[{{"index":'
    )


def _ending(finish_reason: str | None, stop_reason: str | int | None) -> str:
    """`"finish_reason":...[,"stop_reason":...]}]}`: stop_reason is left out when None."""
    stop = "" if stop_reason is None else ',"stop_reason":' + json_scalar(stop_reason)
    return '"finish_reason":' + json_scalar(finish_reason) + stop + "}]}"


class CompletionFrames:
    """`data: {CompletionChunk}` frames of one /v1/completions response, one choice each."""

    def __init__(self, response_id: str, created: int, model: str) -> None:
        self._head = _header(response_id, "text_completion", created, model)

    def text(
        self,
        index: int,
        text: str,
        finish_reason: str | None = None,
        stop_reason: str | int | None = None,
    ) -> bytes:
        body = f'{index},"text":{_json_string(text)},"logprobs":null,'
        return _frame(self._head, body, _ending(finish_reason, stop_reason))


class ChatFrames:
    """`data: {ChatCompletionChunk}` frames of one /v1/chat/completions response."""

    def __init__(self, response_id: str, created: int, model: str) -> None:
        self._head = _header(response_id, "chat.completion.chunk", created, model)

    def content(
        self,
        index: int,
        content: str | None,
        finish_reason: str | None = None,
        stop_reason: str | int | None = None,
    ) -> bytes:
        delta = "{}" if content is None else '{"content":' + _json_string(content) + "}"
        body = f'{index},"delta":{delta},"logprobs":null,'
        return _frame(self._head, body, _ending(finish_reason, stop_reason))


def tgi_token_frame(
    index: int, token_id: int, text: str, logprob: float | None, special: bool
) -> bytes:
    """`data: {StreamResponse}` of TGI's /generate_stream for a token that is not the
    last one and carries no top tokens."""
    token = (
        f'{{"id":{int(token_id)},"text":{_json_string(text)},'
        f'"logprob":{json_scalar(logprob)},"special":{json_scalar(special)}}}'
    )
    return _frame(
        f'{{"index":{int(index)},"token":{token},'
        '"top_tokens":null,"generated_text":null,"details":null}'
    )
