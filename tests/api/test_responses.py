"""POST /v1/responses through the official `openai` client, which parses every answer
and typed stream event itself. The tests of what a model may change run on the fake
engine and on the real server (`live_server`; assertions hold for any model); those of
shapes and the store on the fake engine only."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from tests.api.conftest import LiveServer

QUESTION = "What is the capital of France?"
# The events of a streamed answer with one message, in order (deltas may repeat).
MESSAGE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def client_of(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def client(live_server: LiveServer) -> OpenAI:
    """On the fake engine, then on the real server: for what a real model may change."""
    return client_of(live_server)


@pytest.fixture
def fake_client(threaded_fake_server: LiveServer) -> OpenAI:
    """The fake engine only: for shapes and bookkeeping no model changes."""
    return client_of(threaded_fake_server)


def collapsed(types: list[str]) -> list[str]:
    """Event types with runs of one type (the deltas) written once."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


def test_create(client: OpenAI, live_server: LiveServer) -> None:
    response = client.responses.create(
        model=live_server.model, input=QUESTION, max_output_tokens=24, temperature=0,
        metadata={"ticket": "42"},
    )  # fmt: skip
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert response.model == live_server.model
    assert response.metadata == {"ticket": "42"}
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert response.output_text == message.content[0].text and response.output_text
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert usage.input_tokens_details.cached_tokens >= 0


def test_streamed_events_in_order_and_text_equals_plain(client: OpenAI) -> None:
    request = {"input": QUESTION, "max_output_tokens": 24, "temperature": 0}
    plain = client.responses.create(**request)
    events = list(client.responses.create(**request, stream=True))
    types = [event.type for event in events]
    last = "response.incomplete" if plain.status == "incomplete" else "response.completed"
    assert collapsed(types) == [*MESSAGE_EVENTS, last]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    assert deltas == done.text == final.output_text == plain.output_text
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert isinstance(events[-1], openai.types.responses.ResponseCompletedEvent) == (
        last == "response.completed"
    )


def test_max_output_tokens_makes_it_incomplete(fake_client: OpenAI) -> None:
    response = fake_client.responses.create(input="Tell me a long story.", max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"
    assert response.usage.output_tokens == 3


def test_input_items_and_instructions(fake_client: OpenAI) -> None:
    items = [
        {"role": "user", "content": "Say hello."},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hello!"}]},
        {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
    ]  # fmt: skip
    response = fake_client.responses.create(
        input=items, instructions="Answer in one short sentence.", max_output_tokens=8
    )
    assert response.instructions == "Answer in one short sentence."
    assert response.usage.input_tokens > 20  # the three turns and the system message


def test_previous_response_id_continues_the_conversation(
    client: OpenAI, live_server: LiveServer
) -> None:
    first = client.responses.create(input=QUESTION, max_output_tokens=12, temperature=0)
    second = client.responses.create(
        input="And of Italy?", previous_response_id=first.id, max_output_tokens=12, temperature=0
    )
    assert second.previous_response_id == first.id
    # The second prompt holds the first turn: its input and its answer.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    if live_server.is_real:  # the first turn's prompt is in the prefix cache
        assert second.usage.input_tokens_details.cached_tokens > 0
    else:
        prompt = live_server.engine.requests[-1].prompt_token_ids
        assert first.output_text.strip() in live_server.engine.tokenizer.decode(prompt)


def test_previous_response_id_of_a_streamed_response(fake_client: OpenAI) -> None:
    events = list(fake_client.responses.create(input=QUESTION, max_output_tokens=8, stream=True))
    first = events[-1].response
    second = fake_client.responses.create(
        input="Thanks.", previous_response_id=first.id, max_output_tokens=4
    )
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_retrieve_and_delete(fake_client: OpenAI) -> None:
    created = fake_client.responses.create(input=QUESTION, max_output_tokens=8)
    retrieved = fake_client.responses.retrieve(created.id)
    assert retrieved.id == created.id and retrieved.status == created.status
    assert retrieved.output_text == created.output_text
    assert retrieved.usage.output_tokens == created.usage.output_tokens
    fake_client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as caught:
        fake_client.responses.retrieve(created.id)
    assert caught.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        fake_client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        fake_client.responses.create(input="Hi", previous_response_id=created.id)


def test_store_false_keeps_nothing(fake_client: OpenAI) -> None:
    created = fake_client.responses.create(input=QUESTION, max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        fake_client.responses.retrieve(created.id)


def test_unknown_ids_are_404s(fake_client: OpenAI) -> None:
    responses = fake_client.responses
    for call in (responses.retrieve, responses.cancel, responses.delete):
        with pytest.raises(openai.NotFoundError) as caught:
            call("resp_unknown")
        assert caught.value.body["type"] == "not_found_error"


def test_cancelling_a_finished_response_is_a_400(fake_client: OpenAI) -> None:
    created = fake_client.responses.create(input=QUESTION, max_output_tokens=4)
    with pytest.raises(openai.BadRequestError) as caught:
        fake_client.responses.cancel(created.id)
    assert caught.value.body["code"] == "response_not_cancellable"
