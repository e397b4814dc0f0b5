"""The tool-call parser: model text in, content and calls out, streamed or all at once.

Format (Hermes / ChatML, Qwen 2.5's, and lamina's fallback for templates without tools):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

There is one parser. It is fed text chunks (`feed`) and told when the text ends
(`finish`); it returns events: content text, a call opened (its name), argument text.
The non-streaming answer is the same parser fed the whole text once (`parse_output`),
so streaming and non-streaming answers agree by construction; a property test checks
that every split of a text into chunks gives the same result.

Rules, the same under every split:
- Text outside calls is content. Whitespace next to a call (before its opening tag,
  after its closing tag) is not content; an answer without calls keeps its text as is.
- A call whose text starts `{"name": "...", "arguments": ` streams: the name first, then
  the arguments' text as it comes, holding back what may be the closing `}` and tag.
  The arguments are the text between that head and the body's last `}`.
- Any other body is read whole at the closing tag: a JSON object with a string `name`
  and `arguments` (or `parameters`) is a call; anything else stays content, tags included.
- Text that ends inside a call (max_tokens) ends it where the text stops: the arguments
  are then incomplete, as OpenAI's are when a call is cut short (a `}` that closes the
  body, not the arguments, is left out). A call cut before its
  arguments began (`<tool_call>\n{"na`, or `<tool_call>` and blanks) is dropped, and so
  is the start of an opening tag the text ends with right after a call
  (`</tool_call>\n<tool_`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Protocol

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
# A call body's start up to the first character of its arguments. Its match on a prefix
# of the body is its match on the whole body, so it is found the same under every split.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')


@dataclass(frozen=True)
class ContentText:
    """Text of the answer's content."""

    text: str


@dataclass(frozen=True)
class CallOpened:
    """Call number `index` (0-based, in output order) begins; its function's name."""

    index: int
    name: str


@dataclass(frozen=True)
class ArgumentsText:
    """More of call `index`'s arguments (JSON text, as the model wrote it)."""

    index: int
    text: str


ToolEvent = ContentText | CallOpened | ArgumentsText


class ToolParser(Protocol):
    """What every call format's parser does (this one, llama_parser.py's)."""

    num_calls: int  # calls opened so far

    def feed(self, text: str) -> list[ToolEvent]: ...

    def finish(self) -> list[ToolEvent]: ...


def held_prefix_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is the start of `tag` (not all of it)."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


class HermesToolParser:
    """Incremental parser of `<tool_call>` blocks (the module's docstring has the rules)."""

    def __init__(self) -> None:
        self._buffer = ""  # text fed but not yet turned into events
        self._state = "text"  # "text", "head" (in a call, name unknown), "arguments"
        self._held_space = ""  # content's trailing whitespace, sent if more text follows
        self._after_call = False  # whitespace right after a closing tag is dropped
        self.num_calls = 0  # calls opened so far
        self._sent_arguments = 0  # characters of the open call's arguments sent
        self._space_before_call = ""  # put back if the block turns out not to be a call

    def feed(self, text: str) -> list[ToolEvent]:
        self._buffer += text
        events: list[ToolEvent] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[ToolEvent]:
        """The text has ended: what is still held back, as it stands."""
        events: list[ToolEvent] = []
        rest, self._buffer = self._buffer, ""
        if self._state == "arguments":
            arguments = _cut_arguments(rest)
            if len(arguments) > self._sent_arguments:
                events.append(ArgumentsText(self.num_calls - 1, arguments[self._sent_arguments :]))
        elif self._state == "head":
            # A call cut before its name (its body blank, or begun) is dropped.
            if rest.strip() and not rest.lstrip().startswith("{"):
                events += self._not_a_call(OPEN_TAG + rest)
        elif not (self._after_call and rest and OPEN_TAG.startswith(rest)):
            # (right after a call, a cut start of the next call's tag is dropped)
            events += self._content(rest)
        if self.num_calls == 0 and self._held_space:
            events.append(ContentText(self._held_space))
        self._held_space = ""
        self._state = "text"
        return events

    # --- one step of the state machine: True if it made progress ----------------------

    def _step(self, events: list[ToolEvent]) -> bool:
        if self._state == "text":
            return self._step_text(events)
        if self._state == "head":
            return self._step_head(events)
        return self._step_arguments(events)

    def _step_text(self, events: list[ToolEvent]) -> bool:
        start = self._buffer.find(OPEN_TAG)
        if start < 0:
            keep = held_prefix_length(self._buffer, OPEN_TAG)
            cut = len(self._buffer) - keep
            events += self._content(self._buffer[:cut])
            self._buffer = self._buffer[cut:]
            return False
        events += self._content(self._buffer[:start])
        # whitespace before a call is not content (put back if no call follows)
        self._space_before_call, self._held_space = self._held_space, ""
        self._buffer = self._buffer[start + len(OPEN_TAG) :]
        self._state = "head"
        return True

    def _step_head(self, events: list[ToolEvent]) -> bool:
        end = self._buffer.find(CLOSE_TAG)
        body = self._buffer if end < 0 else self._buffer[:end]
        head = _CALL_HEAD.match(body)
        name = _json_string(head.group(1)) if head else None
        if name is not None:
            events.append(CallOpened(self.num_calls, name))
            self.num_calls += 1
            self._buffer = self._buffer[head.end() :]
            self._sent_arguments = 0
            self._state = "arguments"
            return True
        if end < 0:
            return False  # wait for more of the body, or its closing tag
        self._buffer = self._buffer[end + len(CLOSE_TAG) :]
        self._state = "text"
        call = _whole_call(body)
        if call is None:  # not a call: the block stays content
            events += self._not_a_call(OPEN_TAG + body + CLOSE_TAG)
            return True
        events.append(CallOpened(self.num_calls, call[0]))
        events.append(ArgumentsText(self.num_calls, call[1]))
        self.num_calls += 1
        self._after_call = True
        return True

    def _step_arguments(self, events: list[ToolEvent]) -> bool:
        index = self.num_calls - 1
        end = self._buffer.find(CLOSE_TAG)
        if end < 0:
            ready = _sendable_arguments(self._buffer)
            if ready > self._sent_arguments:
                events.append(ArgumentsText(index, self._buffer[self._sent_arguments : ready]))
                self._sent_arguments = ready
            return False
        arguments = _arguments_of_body(self._buffer[:end])
        if len(arguments) > self._sent_arguments:
            events.append(ArgumentsText(index, arguments[self._sent_arguments :]))
        self._buffer = self._buffer[end + len(CLOSE_TAG) :]
        self._state = "text"
        self._after_call = True
        return True

    def _not_a_call(self, block: str) -> list[ToolEvent]:
        self._held_space = self._space_before_call
        return self._content(block)

    def _content(self, text: str) -> list[ToolEvent]:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return []
            self._after_call = False
        text = self._held_space + text
        body = text.rstrip()
        self._held_space = text[len(body) :]
        return [ContentText(body)] if body else []


def _json_string(quoted: str) -> str | None:
    try:
        value = json.loads(quoted)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None


def _arguments_of_body(body: str) -> str:
    """The arguments' text of a complete streamed call: up to the body's last `}`."""
    text = body.rstrip()
    if text.endswith("}"):
        text = text[:-1].rstrip()
    return text


def _cut_arguments(text: str) -> str:
    """The arguments of a call whose text ended before its closing tag: all of it but a
    start of the tag and whitespace, and but the body's own `}` if it was written."""
    text = text[: len(text) - held_prefix_length(text, CLOSE_TAG)].rstrip()
    if text.endswith("}") and not _is_json(text) and _is_json(text[:-1].rstrip()):
        return text[:-1].rstrip()
    return text


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _sendable_arguments(text: str) -> int:
    """How much of an open call's arguments text can be sent: all but an end that may
    still turn out to be the body's closing `}`, whitespace, or the closing tag."""
    end = len(text) - held_prefix_length(text, CLOSE_TAG)
    end = len(text[:end].rstrip())
    if end and text[end - 1] == "}":
        end = len(text[: end - 1].rstrip())
    return end


def _whole_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of a call body read whole, or None if it is not one."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters"))
    if arguments is None:
        return None
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return value["name"], arguments


@dataclass
class ParsedCall:
    name: str
    arguments: str = ""


@dataclass
class ParsedOutput:
    """What events add up to: the content (None if there was none) and the calls."""

    content_parts: list[str] = field(default_factory=list)
    calls: list[ParsedCall] = field(default_factory=list)

    @property
    def content(self) -> str | None:
        return "".join(self.content_parts) if self.content_parts else None

    def add(self, events: list[ToolEvent]) -> None:
        for event in events:
            if isinstance(event, ContentText):
                self.content_parts.append(event.text)
            elif isinstance(event, CallOpened):
                self.calls.append(ParsedCall(event.name))
            else:
                self.calls[event.index].arguments += event.text


def parse_output(text: str, parser: ToolParser | None = None) -> ParsedOutput:
    """The whole text at once: a new streaming parser (Hermes unless given) fed one
    chunk."""
    parser = parser or HermesToolParser()
    parsed = ParsedOutput()
    parsed.add(parser.feed(text))
    parsed.add(parser.finish())
    return parsed
