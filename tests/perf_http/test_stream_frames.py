"""The template frames (sse.TextFrames, dialect_tgi.tgi_token_frame) say what the
pydantic chunk models say.

OpenAI frames must be byte-identical to the models' dumps (no floats in them); TGI token
frames must parse to the same JSON (floats may be spelt differently: -1e-05 vs -1e-5).
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from app.api.dialect_tgi import tgi_token_frame
from app.api.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChunk,
    CompletionChunkChoice,
)
from app.api.schemas_tgi import StreamResponse, TGIToken
from app.api.sse import TextFrames, sse_event

# Every kind of character a detokenizer can emit, and the ones JSON must escape.
texts = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"]) | st.sampled_from('"\\\n\r\t\x00\x1f\x7f'),
    max_size=12,
)
ids = st.sampled_from(["cmpl-1", "chatcmpl-3f2a", "gen-x:y/z"])
models = st.sampled_from(["smollm2-135m-instruct", 'quo"ted\\model', "modèle"])


@given(ids, st.integers(0, 2**31), models, st.integers(0, 64), texts)
def test_completion_frames_match_the_pydantic_chunk(response_id, created, model, index, text):
    def chunk(index: int, text: str) -> CompletionChunk:
        choice = CompletionChunkChoice(index=index, text=text)
        return CompletionChunk(id=response_id, created=created, model=model, choices=[choice])

    frames = TextFrames(chunk)
    assert frames.frame(index, text) == sse_event(chunk(index, text))
    assert frames.frame(index, text + "!") == sse_event(chunk(index, text + "!"))  # reused


@given(ids, st.integers(0, 2**31), models, st.integers(0, 64), texts.filter(bool))
def test_chat_frames_match_the_pydantic_chunk(response_id, created, model, index, text):
    def chunk(index: int, text: str) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=index, delta=ChatDelta(content=text))
        return ChatCompletionChunk(id=response_id, created=created, model=model, choices=[choice])

    assert TextFrames(chunk).frame(index, text) == sse_event(chunk(index, text))


def test_a_model_name_holding_the_marker_falls_back_to_the_model():
    def chunk(index: int, text: str) -> CompletionChunk:
        choice = CompletionChunkChoice(index=index, text=text)
        return CompletionChunk(id="x", created=1, model=TextFrames.MARK, choices=[choice])

    assert TextFrames(chunk).frame(0, "hi") == sse_event(chunk(0, "hi"))


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
