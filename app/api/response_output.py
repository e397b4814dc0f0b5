"""A response's output items as its text comes, and the typed stream events they make.

The model's text goes through the served model's tool-call parser (app/tools) when the
request offers tools: content text opens (or extends) a `message` item with one `output_text`
part, each call a `function_call` item. Streamed, every change is an event:

    response.output_item.added, response.content_part.added,
    response.output_text.delta ..., response.output_text.done,
    response.content_part.done, response.output_item.done
    (for a call: output_item.added, function_call_arguments.delta ..., .done,
    output_item.done)

each with the next `sequence_number` (`EventWriter`). The non-streamed answer is the
same builder fed the whole text at once with its events dropped, so both answers hold
the same items by construction.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

from pydantic import BaseModel

from app.api.schemas_responses import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    FunctionCallItem,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
)
from app.api.sse import sse_event
from app.api.tool_calls import new_call_id
from app.tools import ArgumentsText, CallOpened, ContentText, ToolEvent, ToolParser


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class EventWriter:
    """Numbers events (`sequence_number` from 0) and frames them as `event:` + `data:`;
    `keep=False` numbers them and drops the frames (the non-streamed answer)."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.frames: list[bytes] = []
        self._next_number = 0

    def emit(self, event_type: type[StreamEvent], type: str, **fields: object) -> None:  # noqa: A002
        event = event_type(type=type, sequence_number=self._next_number, **fields)
        self._next_number += 1
        if self.keep:
            self.frames.append(event_frame(event))

    def take(self) -> list[bytes]:
        frames, self.frames = self.frames, []
        return frames


def event_frame(event: BaseModel) -> bytes:
    """`event: <type>` then the `data:` line, as OpenAI streams typed events."""
    return b"event: " + event.type.encode() + b"\n" + sse_event(event)  # type: ignore[attr-defined]


class OutputItems:
    """The output items of one response, built from its text as it streams."""

    def __init__(self, writer: EventWriter, parser: ToolParser | None = None) -> None:
        """`parser`: the served model's call format's parser, when calls are parsed."""
        self.writer = writer
        self.items: list[OutputItem] = []
        self._parser = parser
        self._open: OutputItem | None = None  # the item text goes to now

    def feed(self, text: str, finished: bool, status: str = "completed") -> None:
        """More of the model's text; `finished`: it ended, every item closes with
        `status` ("incomplete" when max_output_tokens cut it)."""
        for event in self._events(text, finished):
            if isinstance(event, ContentText):
                self._content(event.text)
            elif isinstance(event, CallOpened):
                self._open_call(event.name)
            elif isinstance(event, ArgumentsText):
                self._arguments(event.text)
        if finished:
            if not self.items:  # an empty answer is an empty message, not no output
                self._content("")
            self._close(status)

    def cut(self) -> None:
        """The text stopped for good (a cancel, a failure): the item it went to is left
        "incomplete", with no more events."""
        if self._open is not None:
            self._open.status = "incomplete"
            self._open = None

    def _events(self, text: str, finished: bool) -> Iterator[ToolEvent]:
        if self._parser is None:
            if text:
                yield ContentText(text)
            return
        yield from self._parser.feed(text)
        if finished:
            yield from self._parser.finish()

    @property
    def _index(self) -> int:
        return len(self.items) - 1

    def _content(self, text: str) -> None:
        message = self._open
        if not isinstance(message, OutputMessage):
            self._close("completed")
            message = OutputMessage(id=new_item_id("msg"), status="in_progress", content=[])
            self._add(message)
            part = OutputText(text="")
            message.content.append(part)
            self.writer.emit(
                ContentPartEvent, "response.content_part.added", item_id=message.id,
                output_index=self._index, content_index=0, part=part.model_copy(),
            )  # fmt: skip
        if not text:
            return
        message.content[0].text += text
        self.writer.emit(
            TextDeltaEvent, "response.output_text.delta", item_id=message.id,
            output_index=self._index, content_index=0, delta=text,
        )  # fmt: skip

    def _open_call(self, name: str) -> None:
        self._close("completed")
        call = FunctionCallItem(
            id=new_item_id("fc"), call_id=new_call_id(), name=name, arguments="",
            status="in_progress",
        )  # fmt: skip
        self._add(call)

    def _arguments(self, text: str) -> None:
        call = self._open
        assert isinstance(call, FunctionCallItem), "arguments come after their call opened"
        call.arguments += text
        self.writer.emit(
            ArgumentsDeltaEvent, "response.function_call_arguments.delta", item_id=call.id,
            output_index=self._index, delta=text,
        )  # fmt: skip

    def _add(self, item: OutputItem) -> None:
        self.items.append(item)
        self._open = item
        self.writer.emit(
            OutputItemEvent, "response.output_item.added", output_index=self._index,
            item=item.model_copy(deep=True),
        )  # fmt: skip

    def _close(self, status: str) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        index = self.items.index(item)
        if isinstance(item, OutputMessage):
            part = item.content[0]
            common = {"item_id": item.id, "output_index": index, "content_index": 0}
            self.writer.emit(TextDoneEvent, "response.output_text.done", text=part.text, **common)
            self.writer.emit(ContentPartEvent, "response.content_part.done", part=part, **common)
        else:
            self.writer.emit(
                ArgumentsDoneEvent, "response.function_call_arguments.done", item_id=item.id,
                output_index=index, arguments=item.arguments,
            )  # fmt: skip
        item.status = status  # type: ignore[assignment]
        self.writer.emit(
            OutputItemEvent, "response.output_item.done", output_index=index, item=item
        )
