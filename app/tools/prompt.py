"""Tools in the prompt for a chat template that knows nothing of them (the fallback).

Messages come in transformers' tool format (`apply_chat_template(tools=...)`): an
assistant message may carry `tool_calls` ([{"id", "type", "function": {"name",
"arguments": dict}}]), a `tool` message carries `tool_call_id` and the result as
`content`. A template that does not render tools gets plain messages instead:

- the tool definitions, and how to call them, at the end of the system message (one
  is added first if the conversation has none);
- each assistant tool call as the text the model is asked to write (in the model's
  call format, formats.py), after the message's own content;
- each run of `tool` messages as one `user` message of `<tool_response>` blocks
  (templates that insist on alternating user/assistant turns still render it).
"""

from __future__ import annotations

import json
from typing import Any

from app.tools.formats import ToolCallFormat

TOOLS_LISTING = (
    "You can call functions to help with the user's request. The functions are listed "
    "as JSON between <tools></tools> tags:\n<tools>\n@TOOLS@\n</tools>\n\n"
)


def tools_system_text(tools: list[dict[str, Any]], call_format: ToolCallFormat) -> str:
    """The system prompt's tools section: one JSON definition per line, then how to call."""
    listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return TOOLS_LISTING.replace("@TOOLS@", listing) + call_format.how_to_call


def response_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def fallback_messages(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    call_format: ToolCallFormat,
) -> list[dict[str, Any]]:
    """Plain role + content messages that say what `messages` and `tools` say, calls
    written in `call_format`."""
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
            written = [call_format.call_text(call["function"]) for call in calls]
            parts = (str(entry.get("content") or ""), call_format.separator.join(written))
            entry["content"] = "\n".join(part for part in parts if part)
        rendered.append(entry)
    for entry in rendered:
        entry.pop("from_tools", None)
    if tools:
        section = tools_system_text(tools, call_format)
        if rendered and rendered[0]["role"] == "system":
            own = str(rendered[0].get("content") or "")
            rendered[0]["content"] = f"{own}\n\n{section}" if own else section
        else:
            rendered.insert(0, {"role": "system", "content": section})
    return rendered
