"""TGI stream events from engine deltas: one per token, text on the token that added it."""

from __future__ import annotations

import json
from types import SimpleNamespace

from app.api.dialect_tgi import TGIDialect
from app.api.schemas_tgi import GenerateRequest
from app.api.state import Limits
from app.core import FinishReason, TokenDelta, Usage
from tests.api.conftest import fake_settings

PROMPT = "One two three"


def render_all(deltas: list[TokenDelta], tokenizer) -> list[dict]:
    """The events of a greedy /generate_stream request of PROMPT, given the deltas."""
    limits = Limits(fake_settings(tokenizer.model_dir), 2048, tokenizer.vocab_size)
    serving = SimpleNamespace(limits=limits, tokenizer=tokenizer)
    dialect = TGIDialect(GenerateRequest(inputs=PROMPT), serving, "id", True)
    frames = [frame for delta in deltas for frame in dialect.render_delta(0, delta)]
    return [json.loads(frame.decode()[len("data: ") :]) for frame in frames]


def test_text_goes_on_the_last_token_and_carries_over(http_tokenizer) -> None:
    deltas = [
        TokenDelta("r", 0, "a", (5,)),
        TokenDelta("r", 0, "", (6,)),  # held back (half a character, stop prefix)
        TokenDelta("r", 0, "bc", (7, 8)),
        TokenDelta("r", 0, "x", ()),  # text released without a new token
        TokenDelta("r", 0, "d", (9,), finish_reason=FinishReason.LENGTH, usage=Usage(3, 5)),
    ]
    events = render_all(deltas, http_tokenizer)
    assert [e["token"]["id"] for e in events] == [5, 6, 7, 8, 9]
    assert [e["token"]["text"] for e in events] == ["a", "", "", "bc", "xd"]
    assert [e["index"] for e in events] == [1, 2, 3, 4, 5]
    assert events[-1]["generated_text"] == "abcxd"
    assert events[-1]["details"] == {
        "finish_reason": "length",
        "generated_tokens": 5,
        "seed": None,
        "input_length": len(http_tokenizer.encode(PROMPT)),
    }
    assert all(e["details"] is None for e in events[:-1])


def test_a_choice_ending_without_a_token_closes_with_a_special_event(http_tokenizer) -> None:
    deltas = [
        TokenDelta("r", 0, "hi", (5,)),
        TokenDelta(
            "r", 0, "", (), finish_reason=FinishReason.STOP, stop_reason="!", usage=Usage(3, 1)
        ),
    ]
    events = render_all(deltas, http_tokenizer)
    assert len(events) == 2
    assert events[-1]["token"] == {"id": 5, "text": "", "logprob": None, "special": True}
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    assert events[-1]["generated_text"] == "hi"
