"""The Llama 3 JSON tool-call parser: calls as bare JSON objects at the start of the answer.

Format (Llama 3.1 / 3.2 / 3.3 chat templates with custom tools):

    {"name": "get_weather", "parameters": {"city": "Paris"}}

several calls separated by `;` (or whitespace), optionally after `<|python_tag|>` when
the detokenizer keeps special tokens. The model writes either calls or text: an answer
whose first non-blank character is not `{` is content, all of it, as written.

Same contract as the Hermes parser (parser.py): `feed` text chunks, `finish` at the end,
events out, the same result under every split into chunks. Rules:
- The answer's leading whitespace (and a leading `<|python_tag|>`) is not content when
  a call follows; an answer that is not a call keeps its text as is.
- A call whose text starts `{"name": "...", "parameters": {` (or `"arguments": {`)
  streams: the name first, then the arguments' JSON object as it comes; it ends where
  it closes (brackets and strings followed, so a `}` inside a string is text).
- Any other `{...}` answer is held to the end and read whole: a JSON object with a
  string `name` and `parameters` (or `arguments`) is a call, anything else content.
- After a call: `;` and whitespace separate calls; other text is content.
- Text that ends inside a call's arguments ends the arguments there (incomplete JSON,
  as OpenAI's are when cut short by max_tokens); text cut before the arguments began
  is content.
"""

from __future__ import annotations

import re

from app.tools.parser import (
    ArgumentsText,
    CallOpened,
    ContentText,
    ToolEvent,
    _json_string,
    _whole_call,
)

PYTHON_TAG = "<|python_tag|>"
_CALL_HEAD = re.compile(
    r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:parameters|arguments)"\s*:\s*(?=\S)'
)


class JsonValueEnd:
    """Follows a JSON value fed in pieces and says where it ends.

    Objects, arrays and strings end at their closing character; a bare literal
    (number, true, false, null) at the first character that cannot continue it.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._literal = False
        self._started = False

    def feed(self, text: str) -> int | None:
        """Index in `text` just past the value's end, or None if it goes on."""
        for index, char in enumerate(text):
            if self._literal:
                if char in ",}] \t\r\n;":
                    return index
                continue
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
                    if self._depth == 0:
                        return index + 1
                continue
            if char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return index + 1
            elif not self._started and not char.isspace():
                self._literal = True
            self._started = True
        return None


class Llama3JsonToolParser:
    """Incremental parser of Llama 3 JSON calls (the module's docstring has the rules)."""

    def __init__(self) -> None:
        self._buffer = ""  # text fed but not yet turned into events
        # "start", "content", "head" (in a call, name unknown), "arguments",
        # "body_rest" (the call's own closing `}` to come), "between" (after a call)
        self._state = "start"
        self._leading = ""  # the answer's opening text, content if no call follows
        self._scanner = JsonValueEnd()
        self.num_calls = 0

    def feed(self, text: str) -> list[ToolEvent]:
        self._buffer += text
        events: list[ToolEvent] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[ToolEvent]:
        """The text has ended: what is still held back, as it stands."""
        rest, self._buffer = self._buffer, ""
        events: list[ToolEvent] = []
        if self._state == "start":
            events += _content(self._leading + rest)
        elif self._state == "head":
            call = _whole_call(rest.strip())
            if call is not None:
                index, (name, arguments) = self.num_calls, call
                events += [CallOpened(index, name), ArgumentsText(index, arguments)]
                self.num_calls += 1
            elif self.num_calls == 0:
                events += _content(self._leading + rest)
            else:
                events += _content(rest)
        elif self._state == "arguments":
            events += self._arguments(rest.rstrip())
        elif self._state == "content":
            events += _content(rest)
        # "body_rest", "between": the text ended after a call (a `;` at most): nothing
        self._state = "start"
        return events

    # --- one step of the state machine: True if it made progress ----------------------

    def _step(self, events: list[ToolEvent]) -> bool:
        step = {
            "start": self._step_start,
            "content": self._step_content,
            "head": self._step_head,
            "arguments": self._step_arguments,
            "body_rest": self._step_body_rest,
            "between": self._step_between,
        }[self._state]
        return step(events)

    def _step_start(self, events: list[ToolEvent]) -> bool:
        text = self._buffer.lstrip()
        if text.startswith(PYTHON_TAG):
            text = text[len(PYTHON_TAG) :].lstrip()
        elif PYTHON_TAG.startswith(text):  # blank so far, or maybe the tag: wait
            return False
        if not text:
            return False
        cut = len(self._buffer) - len(text)
        self._leading, self._buffer = self._buffer[:cut], self._buffer[cut:]
        self._state = "head" if text.startswith("{") else "content"
        return True

    def _step_content(self, events: list[ToolEvent]) -> bool:
        events += _content(self._leading + self._buffer)
        self._leading = self._buffer = ""
        return False

    def _step_head(self, events: list[ToolEvent]) -> bool:
        head = _CALL_HEAD.match(self._buffer)
        name = _json_string(head.group(1)) if head else None
        if name is None or self._buffer[head.end()] != "{":
            return False  # wait for more, or read it whole at the end (arguments that
            # are not an object are a call only if the whole text says so)
        events.append(CallOpened(self.num_calls, name))
        self.num_calls += 1
        self._buffer = self._buffer[head.end() :]
        self._scanner = JsonValueEnd()
        self._state = "arguments"
        return True

    def _step_arguments(self, events: list[ToolEvent]) -> bool:
        end = self._scanner.feed(self._buffer)
        if end is None:
            events += self._arguments(self._buffer)
            self._buffer = ""
            return False
        events += self._arguments(self._buffer[:end])
        self._buffer = self._buffer[end:]
        self._scanner = JsonValueEnd()
        self._scanner.feed("{")  # the call's own object is still open
        self._state = "body_rest"
        return True

    def _step_body_rest(self, events: list[ToolEvent]) -> bool:
        # Keys after the arguments (none in the format) are skipped with the body.
        end = self._scanner.feed(self._buffer)
        if end is None:
            self._buffer = ""
            return False
        self._buffer = self._buffer[end:]
        self._state = "between"
        return True

    def _step_between(self, events: list[ToolEvent]) -> bool:
        text = self._buffer.lstrip()
        if text.startswith(";"):
            text = text[1:].lstrip()
        if not text:
            return False  # a separator, or the end: wait
        self._buffer = text
        self._state = "head" if text.startswith("{") else "content"
        return True

    def _arguments(self, text: str) -> list[ToolEvent]:
        return [ArgumentsText(self.num_calls - 1, text)] if text else []


def _content(text: str) -> list[ToolEvent]:
    return [ContentText(text)] if text else []
