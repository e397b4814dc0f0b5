"""Responses API inputs -> what chat completions already knows how to run.

`input` items become chat messages (the same template, forged-turn checks and tool-call
rendering as /v1/chat/completions), function tools become chat tool definitions (the
same grammar and parser), `text.format` becomes the same constraint as
`response_format`. Every broken rule is a 400 naming the exact field; an item or part of
a kind lamina does not run (images, files, audio, reasoning, built-in tools) is a 400
naming it, never dropped.
"""

from __future__ import annotations

from typing import Any

from app.api.constraints import RequestedConstraint, output_format_spec
from app.api.errors import APIError, invalid_request
from app.api.prompts import no_parts
from app.api.responses_fields import MessageSource
from app.api.schemas import (
    CalledFunction,
    ChatMessage,
    FunctionDefinition,
    MessageToolCall,
    NamedFunction,
    NamedToolChoice,
    ToolDefinition,
)
from app.api.schemas_responses import FunctionCallItem, OutputItem, OutputMessage
from app.api.tool_calls import ToolRequest, checked_tools
from app.tools import ToolCallFormat

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")
MAX_METADATA_KEYS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512


def unsupported(param: str, what: str) -> APIError:
    return invalid_request(
        f"`{param}` is {what}, which lamina does not support", param, code="unsupported_field"
    )


def input_messages(
    value: str | list[dict[str, Any]] | None,
) -> tuple[list[ChatMessage], list[MessageSource]]:
    """The conversation `input` holds, as chat messages (consecutive function calls, and
    the assistant text right before them, form one assistant turn), and the item each
    came from (for the errors of chat's checks)."""
    if value is None:
        raise invalid_request("`input` is required: a string or a list of items", "input")
    if isinstance(value, str):
        return [ChatMessage(role="user", content=value)], [MessageSource("input", whole=True)]
    if not value:
        raise invalid_request("`input` must not be empty", "input")
    messages: list[ChatMessage] = []
    sources: list[MessageSource] = []
    for index, item in enumerate(value):
        param = f"input[{index}]"
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(ChatMessage(role=_role(item, param), content=_text(item, param)))
            sources.append(MessageSource(param))
        elif kind == "function_call":
            if _append_call(messages, _call(item, param)):
                sources[-1].calls.append(param)
            else:
                sources.append(MessageSource(param, calls=[param]))
        elif kind == "function_call_output":
            messages.append(_call_output(item, param))
            sources.append(MessageSource(param, text_key="output"))
        else:
            raise unsupported(f"{param}.type", f"{kind!r}")
    return messages, sources


def _required_str(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise invalid_request(f"`{param}.{key}` is required and must be a string", param)
    return value


def _role(item: dict[str, Any], param: str) -> str:
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise invalid_request(
            f"`{param}.role` must be one of {', '.join(MESSAGE_ROLES)} (got {role!r})",
            f"{param}.role",
        )
    return role


def _text(item: dict[str, Any], param: str, key: str = "content") -> str:
    """A message's `content` or a call's `output`: a string, or text parts joined."""
    content = item.get(key)
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_request(
            f"`{param}.{key}` must be a string or a list of text parts", f"{param}.{key}"
        )
    if not content and key == "content":  # as chat's messages[i].content
        raise no_parts(f"{param}.content")
    texts = []
    for index, part in enumerate(content):
        part_param = f"{param}.{key}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise unsupported(
                f"{part_param}.type", f"{kind!r} (supported: input_text, output_text)"
            )
        texts.append(_required_str(part, "text", part_param))
    return "".join(texts)


def _call(item: dict[str, Any], param: str) -> MessageToolCall:
    name = _required_str(item, "name", param)
    arguments = _required_str(item, "arguments", param)
    call_id = _required_str(item, "call_id", param)
    return MessageToolCall(id=call_id, function=CalledFunction(name=name, arguments=arguments))


def _append_call(messages: list[ChatMessage], call: MessageToolCall) -> bool:
    """Add `call` to the last message when that is an assistant's (True), else to a new one."""
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant":
        last.tool_calls = [*(last.tool_calls or []), call]
        return True
    messages.append(ChatMessage(role="assistant", content="", tool_calls=[call]))
    return False


def _call_output(item: dict[str, Any], param: str) -> ChatMessage:
    call_id = _required_str(item, "call_id", param)
    return ChatMessage(role="tool", content=_text(item, param, "output"), tool_call_id=call_id)


def output_messages(items: list[OutputItem]) -> list[ChatMessage]:
    """A response's output as the conversation's next assistant turn (for a follow-up)."""
    messages: list[ChatMessage] = []
    for item in items:
        if isinstance(item, OutputMessage):
            text = "".join(part.text for part in item.content)
            messages.append(ChatMessage(role="assistant", content=text))
        elif isinstance(item, FunctionCallItem):
            function = CalledFunction(name=item.name, arguments=item.arguments)
            _append_call(messages, MessageToolCall(id=item.call_id, function=function))
    return messages


# --- tools ---------------------------------------------------------------------------------


def response_tools(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool | None,
    call_format: ToolCallFormat,
) -> ToolRequest:
    """Function tools (flat: `{"type": "function", "name", "parameters"}`) as chat tools,
    checked as those are; built-in tools are a 400 naming them."""
    definitions = []
    for index, tool in enumerate(tools or ()):
        param = f"tools[{index}]"
        kind = tool.get("type")
        if kind != "function":
            raise unsupported(f"{param}.type", f"{kind!r} (only function tools run here)")
        name = _required_str(tool, "name", param)
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            message = f"`{param}.parameters` must be a JSON schema object"
            raise invalid_request(message, f"{param}.parameters")
        function = FunctionDefinition(
            name=name, description=tool.get("description"), parameters=parameters
        )
        definitions.append(ToolDefinition(type="function", function=function))
    choice = _tool_choice(tool_choice)
    return checked_tools(definitions, choice, parallel_tool_calls, call_format, "")


def _tool_choice(value: str | dict[str, Any] | None) -> str | NamedToolChoice | None:
    if value is None or value in ("none", "auto", "required"):
        return value  # type: ignore[return-value]
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name")
        if not isinstance(name, str):
            raise invalid_request("`tool_choice.name` is required", "tool_choice")
        return NamedToolChoice(type="function", function=NamedFunction(name=name))
    if isinstance(value, dict):
        raise unsupported("tool_choice.type", f"{value.get('type')!r}")
    raise invalid_request(
        '`tool_choice` must be "none", "auto", "required" or {"type": "function", "name": ...}',
        "tool_choice",
    )


# --- text.format, metadata -------------------------------------------------------------------


def text_format_constraint(text: dict[str, Any] | None) -> RequestedConstraint | None:
    """`text.format`: "text" (none), "json_object", or "json_schema" with `schema`."""
    fmt = (text or {}).get("format")
    spec = None if fmt is None else output_format_spec(fmt, "text.format", nested=False)
    return None if spec is None else RequestedConstraint(spec, "text.format")


def check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512."""
    metadata = metadata or {}
    if len(metadata) > MAX_METADATA_KEYS:
        message = f"`metadata` has {len(metadata)} keys; at most {MAX_METADATA_KEYS} are allowed"
        raise invalid_request(message, "metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS or len(value) > MAX_METADATA_VALUE_CHARS:
            raise invalid_request(
                f"`metadata[{key[:64]!r}]`: keys hold at most 64 characters, values 512",
                "metadata",
            )
    return metadata
