"""Tool calls in OpenAI's answer shapes, from the one parser (app/tools/parser.py).

The parser is the served model's call format's (app/tools/formats.py). Streaming:
each choice has its own parser, fed every delta's text; its events become a
chunk's `delta.content` and `delta.tool_calls` (a call's index, id, type and name in its
first fragment, then argument text). Not streaming: the same parser reads the whole
text (`parse_output`) into `message.content` and `message.tool_calls`.
"""

from __future__ import annotations

import secrets

from app.api.schemas import (
    ChatResponseMessage,
    DeltaFunction,
    DeltaToolCall,
    ResponseFunction,
    ResponseToolCall,
)
from app.tools import ArgumentsText, CallOpened, ContentText, ToolCallFormat, parse_output


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolCallStreams:
    """The parser of each choice of a streamed answer, and the ids of its calls."""

    def __init__(self, num_choices: int, call_format: ToolCallFormat) -> None:
        self._parsers = [call_format.new_parser() for _ in range(num_choices)]

    def num_calls(self, index: int) -> int:
        return self._parsers[index].num_calls

    def feed(self, index: int, text: str, finished: bool) -> tuple[str, list[DeltaToolCall]]:
        """Choice `index`'s next text -> (content text, tool-call fragments) to send now;
        `finished`: the text has ended, send what was held back."""
        parser = self._parsers[index]
        events = parser.feed(text)
        if finished:
            events += parser.finish()
        content: list[str] = []
        calls: list[DeltaToolCall] = []
        for event in events:
            if isinstance(event, ContentText):
                content.append(event.text)
            elif isinstance(event, CallOpened):
                function = DeltaFunction(name=event.name, arguments="")
                calls.append(
                    DeltaToolCall(
                        index=event.index, id=new_call_id(), type="function", function=function
                    )
                )
            elif isinstance(event, ArgumentsText):
                if calls and calls[-1].index == event.index:  # one fragment per call a chunk
                    calls[-1].function.arguments += event.text
                else:
                    calls.append(
                        DeltaToolCall(
                            index=event.index, function=DeltaFunction(arguments=event.text)
                        )
                    )
        return "".join(content), calls


def answer_message(text: str, call_format: ToolCallFormat) -> ChatResponseMessage:
    """A whole answer's message: its content (null when there are only calls) and calls."""
    parsed = parse_output(text, call_format.new_parser())
    if not parsed.calls:
        return ChatResponseMessage(content=parsed.content or "")
    calls = [
        ResponseToolCall(
            id=new_call_id(), function=ResponseFunction(name=call.name, arguments=call.arguments)
        )
        for call in parsed.calls
    ]
    return ChatResponseMessage(content=parsed.content, tool_calls=calls)
