"""The Responses API's store (bounded LRU with a lifetime, fake clock) and its output
items (streamed in any split, they hold what the whole text gives at once)."""

from __future__ import annotations

import json

import pytest

from app.api.response_output import EventWriter, OutputItems
from app.api.response_store import ResponseStore, StoredResponse
from app.api.schemas_responses import ResponseObject
from app.tools import HermesToolParser


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stored(response_id: str) -> StoredResponse:
    response = ResponseObject(id=response_id, created_at=0, status="completed", model="m")
    return StoredResponse(response, messages=[])


def test_the_least_recently_used_leaves_first() -> None:
    store = ResponseStore(max_entries=2, ttl_s=60, clock=FakeClock())
    store.put(stored("a"))
    store.put(stored("b"))
    assert store.get("a") is not None  # a is now the most recently used
    store.put(stored("c"))
    assert store.ids() == ["a", "c"] and store.get("b") is None


def test_a_response_expires_ttl_after_its_last_write() -> None:
    clock = FakeClock()
    store = ResponseStore(max_entries=10, ttl_s=60, clock=clock)
    entry = stored("a")
    store.put(entry)
    clock.now += 59
    assert store.get("a") is entry  # reading does not extend its life
    store.put(entry)  # a write does
    clock.now += 59
    assert store.get("a") is entry
    clock.now += 1
    assert store.get("a") is None and len(store) == 0


def test_delete_and_a_store_of_size_zero() -> None:
    store = ResponseStore(max_entries=10, ttl_s=60, clock=FakeClock())
    store.put(stored("a"))
    assert store.delete("a") and not store.delete("a") and store.get("a") is None
    empty = ResponseStore(max_entries=0, ttl_s=60)
    empty.put(stored("a"))
    assert empty.get("a") is None


CALL = '<tool_call>\n{"name": "f", "arguments": {"x": [1, 2]}}\n</tool_call>'
TEXTS = ["Plain text, no calls.", "Let me check.\n" + CALL, CALL + "\n" + CALL, ""]


def items_of(chunks: list[str], parses_calls: bool) -> tuple[list[dict], list[str]]:
    writer = EventWriter()
    items = OutputItems(writer, HermesToolParser() if parses_calls else None)
    for index, chunk in enumerate(chunks):
        items.feed(chunk, finished=index == len(chunks) - 1)
    events = [json.loads(frame.split(b"data: ", 1)[1]) for frame in writer.take()]
    shapes = [item.model_dump(exclude={"id", "call_id"}) for item in items.items]
    return shapes, [event["type"] for event in events]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("parses_calls", [False, True])
def test_items_are_the_same_under_every_split(text: str, parses_calls: bool) -> None:
    whole, _ = items_of([text], parses_calls)
    for size in (1, 2, 5):
        chunks = [text[i : i + size] for i in range(0, len(text), size)] or [""]
        assert items_of(chunks, parses_calls)[0] == whole


def test_calls_and_text_become_items_with_their_events() -> None:
    shapes, types = items_of(["Let me check.\n", CALL], parses_calls=True)
    assert [(s["type"], s["status"]) for s in shapes] == [
        ("message", "completed"),
        ("function_call", "completed"),
    ]
    assert shapes[1]["name"] == "f" and json.loads(shapes[1]["arguments"]) == {"x": [1, 2]}
    assert types[:3] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert types[-3:] == [
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]


def test_an_empty_answer_is_one_empty_message() -> None:
    shapes, types = items_of([""], parses_calls=False)
    assert shapes == [
        {"type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "", "annotations": []}]}
    ]  # fmt: skip
    assert "response.output_text.delta" not in types


def test_a_writer_keeping_nothing_drops_frames_and_a_kept_stream_counts_from_zero() -> None:
    writer = EventWriter(keep=False)
    OutputItems(writer).feed("hi", finished=True)
    assert writer.take() == []
    kept = EventWriter()
    OutputItems(kept).feed("hi", finished=True)
    numbers = [json.loads(f.split(b"data: ", 1)[1])["sequence_number"] for f in kept.take()]
    assert numbers == list(range(len(numbers)))
