"""Which field of a Responses request each chat message came from, for its errors.

POST /v1/responses runs its conversation through chat's checks (prompts.encode_chat),
which name what they refuse as chat's `messages[i]...`. `ResponseFields` maps such a
path to what the client sent: an item's `input[k].content` (a function_call_output's
`input[k].output`), a function_call item's `input[k].arguments`, a result's
`input[k].call_id`, and `instructions` or `previous_response_id` (the stored
conversation) as whole fields. Items do not map one to one onto messages: consecutive
function_call items (and the assistant message right before them) are one message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from app.api.schemas import ChatMessage

# messages[i], then maybe .key, then maybe [j] (a call or a content part), then the rest.
_CHAT_PATH = re.compile(r"messages\[(\d+)\](?:\.(\w+))?(?:\[(\d+)\])?.*")


@dataclass
class MessageSource:
    """Where one chat message came from.

    item: "input[k]", or a whole field ("instructions", "previous_response_id") when
    `whole`. text_key: the item's key that holds the text. calls: the item of each of
    the message's tool calls.
    """

    item: str
    text_key: str = "content"
    calls: list[str] = field(default_factory=list)
    whole: bool = False

    @classmethod
    def whole_field(cls, name: str, message: ChatMessage) -> MessageSource:
        return cls(name, calls=[name] * len(message.tool_calls or ()), whole=True)

    def at(self, item: str, key: str) -> str:
        return item if self.whole else f"{item}.{key}"


class ResponseFields:
    """prompts.FieldNames for a conversation of `sources`, one per chat message."""

    def __init__(self, sources: list[MessageSource]) -> None:
        self.sources = sources

    def __call__(self, path: str) -> str:
        if path == "messages":
            return "input"
        match = _CHAT_PATH.fullmatch(path)
        if match is None or int(match[1]) >= len(self.sources):
            return path
        source, key, position = self.sources[int(match[1])], match[2], match[3]
        if key == "tool_calls" and source.calls:
            if position is None:  # the calls as a whole: named by the first one's item
                return source.calls[0]
            return source.at(source.calls[int(position)], "arguments")
        if key == "tool_call_id":
            return source.at(source.item, "call_id")
        if key == "content":
            return source.at(source.item, source.text_key)
        return source.item


def conversation_fields(
    instructions: list[ChatMessage],
    stored: list[ChatMessage],
    input_sources: list[MessageSource],
) -> ResponseFields:
    """The fields of `instructions` + the stored conversation + the input's messages."""
    sources = [MessageSource.whole_field("instructions", m) for m in instructions]
    sources += [MessageSource.whole_field("previous_response_id", m) for m in stored]
    return ResponseFields(sources + input_sources)
