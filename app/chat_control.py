"""Chat turns a user cannot forge: control tokens inside message text stay text.

A chat template writes the turn markers (`<|im_start|>system`, `<|im_end|>`) itself. If
a message's content holds the same strings and the rendered prompt is tokenized as one
string, the tokenizer turns them into the real control tokens, and a user can open a
fake system turn. lamina tokenizes the template's own text with its control tokens and
every message's content with control-token strings split into ordinary tokens.

Benign content (no control-token string in it) takes the plain path, so its ids are
exactly what `tokenizer.apply_chat_template(..., tokenize=True)` gives.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

ControlTokenPolicy = Literal["text", "reject"]

# A marker no template changes and no tokenizer merges with its neighbours: private-use
# code points around the message index.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARK = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")


class ForgedTurnError(ValueError):
    """A message holds a control token that lamina will not encode (the parameter named)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def control_token_in(text: str, control_tokens: frozenset[str]) -> str | None:
    """The control-token string that starts first in `text` (longest on a tie), or None."""
    found = [(text.find(token), -len(token), token) for token in control_tokens if token in text]
    return min(found)[2] if found else None


def check_names(messages: list[dict[str, Any]], control_tokens: frozenset[str]) -> None:
    """A `name` is an identifier: a control token in one is refused, whatever the policy."""
    for index, message in enumerate(messages):
        found = control_token_in(str(message.get("name") or ""), control_tokens)
        if found is not None:
            raise ForgedTurnError(
                f"`messages[{index}].name` contains the control token '{found}'",
                f"messages[{index}].name",
            )


def forged_content_index(
    messages: list[dict[str, Any]], control_tokens: frozenset[str]
) -> tuple[int, str] | None:
    """(index, token) of the first message whose content holds a control token."""
    for index, message in enumerate(messages):
        found = control_token_in(str(message.get("content") or ""), control_tokens)
        if found is not None:
            return index, found
    return None


def encode_content_as_text(
    messages: list[dict[str, Any]],
    render: Callable[[list[dict[str, Any]]], str],
    encode_template: Callable[[str], list[int]],
    encode_plain: Callable[[str], list[int]],
) -> list[int]:
    """Token ids of the rendered chat where each message's content is plain text.

    The template is rendered once with a marker in place of each content; the pieces
    between markers are the template's own text (encoded with control tokens), the
    markers are replaced by the contents (encoded with control tokens split). The marked
    rendering with the contents put back must equal the real rendering: a template that
    rewrites content (trims it, say) cannot be split this way, and is refused.
    """
    contents = [str(message.get("content") or "") for message in messages]
    # Empty contents stay as they are: a template may test them (`if message.content`).
    marked = [
        {**message, "content": f"{_MARK_OPEN}{index}{_MARK_CLOSE}"} if content else message
        for index, (message, content) in enumerate(zip(messages, contents))
    ]
    marked_text = render(marked)
    pieces = _MARK.split(marked_text)  # template, index, template, index, ..., template
    restored = "".join(
        contents[int(piece)] if position % 2 else piece for position, piece in enumerate(pieces)
    )
    if restored != render(messages):
        raise ForgedTurnError(
            "a message contains a control token, and this model's chat template changes "
            "message text, so it cannot be encoded as plain text",
            "messages",
        )
    token_ids: list[int] = []
    for position, piece in enumerate(pieces):
        if position % 2:
            token_ids += encode_plain(contents[int(piece)])
        elif piece:
            token_ids += encode_template(piece)
    return token_ids
