"""Tools in the prompt for a chat template that knows nothing of them (the fallback).

Messages come in transformers' tool format (`apply_chat_template(tools=...)`): an
assistant message may carry `tool_calls` ([{"id", "type", "function": {"name",
"arguments": dict}}]), a `tool` message carries `tool_call_id` and the result as
`content`. A template that does not render tools gets plain messages instead:

- the tool definitions, and how to call them, at the end of the system message (one
  is added first if the conversation has none);
- each assistant tool call as the text the model is asked to write (parser.py's
  format), after the message's own content;
- each run of `tool` messages as one `user` message of `<tool_response>` blocks
  (templates that insist on alternating user/assistant turns still render it).
"""

from __future__ import annotations

import json
from typing import Any

from app.tools.parser import CLOSE_TAG, OPEN_TAG

TOOLS_INSTRUCTIONS = (
    "You can call functions to help with the user's request. The functions are listed "
    "as JSON between <tools></tools> tags:\n<tools>\n@TOOLS@\n</tools>\n\n"
    "To call a function, write a JSON object with its name and arguments between "
    "<tool_call></tool_call> tags, like this:\n"
    f'{OPEN_TAG}\n{{"name": "function name", "arguments": {{"argument": "value"}}}}\n{CLOSE_TAG}'
)


def tools_system_text(tools: list[dict[str, Any]]) -> str:
    """The system prompt's tools section: one JSON definition per line."""
    listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return TOOLS_INSTRUCTIONS.replace("@TOOLS@", listing)


def call_text(function: dict[str, Any]) -> str:
    """One call as the model writes it (arguments: a dict, or JSON text)."""
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    body = json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
    return f"{OPEN_TAG}\n{body}\n{CLOSE_TAG}"


def response_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def fallback_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Plain role + content messages that say what `messages` and `tools` say."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "tool":
            text = response_text(str(message.get("content") or ""))
            if rendered and rendered[-1].get("from_tools"):
                rendered[-1]["content"] += "\n" + text
            else:
                rendered.append({"role": "user", "content": text, "from_tools": True})
            continue
        entry = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}
        calls = message.get("tool_calls") or []
        if calls:
            parts = [str(entry.get("content") or "")] + [call_text(c["function"]) for c in calls]
            entry["content"] = "\n".join(part for part in parts if part)
        rendered.append(entry)
    for entry in rendered:
        entry.pop("from_tools", None)
    if tools:
        section = tools_system_text(tools)
        if rendered and rendered[0]["role"] == "system":
            own = str(rendered[0].get("content") or "")
            rendered[0]["content"] = f"{own}\n\n{section}" if own else section
        else:
            rendered.insert(0, {"role": "system", "content": section})
    return rendered
