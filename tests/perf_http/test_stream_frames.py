"""The template frames of app/api/stream_frames.py say what the pydantic chunk models say.

OpenAI frames must be byte-identical to the models' dumps (no floats in them); TGI token
frames must parse to the same JSON (floats may be spelt differently: -1e-05 vs -1e-5).
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from app.api.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChunk,
    CompletionChunkChoice,
)
from app.api.schemas_tgi import StreamResponse, TGIToken
from app.api.sse import sse_event
from app.api.stream_frames import ChatFrames, CompletionFrames, json_scalar, tgi_token_frame

# Every kind of character a detokenizer can emit, and the ones JSON must escape.
texts = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"]) | st.sampled_from('"\\\n\r\t\x00\x1f\x7f'),
    max_size=12,
)
finish_reasons = st.sampled_from([None, "stop", "length"])
stop_reasons = st.one_of(st.none(), st.integers(0, 2**31), texts)
ids = st.sampled_from(["cmpl-1", "chatcmpl-3f2a", "gen-x:y/z"])
models = st.sampled_from(["smollm2-135m-instruct", 'quo"ted\\model', "modèle"])


@given(ids, st.integers(0, 2**31), models, st.integers(0, 64), texts, finish_reasons, stop_reasons)
def test_completion_frames_match_the_pydantic_chunk(
    response_id, created, model, index, text, finish, stop
):
    choice = CompletionChunkChoice(index=index, text=text, finish_reason=finish, stop_reason=stop)
    expected = sse_event(
        CompletionChunk(id=response_id, created=created, model=model, choices=[choice])
    )
    frames = CompletionFrames(response_id, created, model)
    assert frames.text(index, text, finish, stop) == expected


@given(ids, st.integers(0, 2**31), models, st.integers(0, 64), texts, finish_reasons, stop_reasons)
def test_chat_frames_match_the_pydantic_chunk(
    response_id, created, model, index, text, finish, stop
):
    content = text or None  # an empty delta has no content field
    choice = ChatChunkChoice(
        index=index, delta=ChatDelta(content=content), finish_reason=finish, stop_reason=stop
    )
    expected = sse_event(
        ChatCompletionChunk(id=response_id, created=created, model=model, choices=[choice])
    )
    frames = ChatFrames(response_id, created, model)
    assert frames.content(index, content, finish, stop) == expected


logprobs = st.one_of(
    st.none(), st.floats(-9999.0, 0.0), st.sampled_from([-1e-5, -3.2e-7, -0.0, -1234.5])
)


@given(st.integers(1, 10_000), st.integers(0, 49151), texts, logprobs, st.booleans())
def test_tgi_token_frames_parse_like_the_pydantic_event(index, token_id, text, logprob, special):
    token = TGIToken(id=token_id, text=text, logprob=logprob, special=special)
    expected = sse_event(StreamResponse(index=index, token=token))
    frame = tgi_token_frame(index, token_id, text, logprob, special)
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert json.loads(frame[6:]) == json.loads(expected[6:])


def test_non_finite_numbers_become_null_as_in_pydantic():
    assert json_scalar(float("-inf")) == "null"
    assert json_scalar(float("nan")) == "null"
    assert json_scalar(-0.5) == "-0.5"
    assert json_scalar(True) == "true"
    assert json_scalar(7) == "7"
