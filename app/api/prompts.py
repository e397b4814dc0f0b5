"""Turning request prompts into token ids: plain text, token ids, or chat messages.

Runs on the event-loop thread with the HTTP layer's own tokenizer. Every rule broken
becomes a 400 naming the field, what was given and what is allowed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from typing import Any

from app.api.errors import APIError, invalid_request
from app.api.schemas import ChatMessage
from app.chat_control import ForgedTurnError
from app.tokenizer import ChatTemplateError, Tokenizer


def check_token_ids(token_ids: SequenceOf[int], param: str, vocab_size: int) -> None:
    for position, token_id in enumerate(token_ids):
        if not 0 <= token_id < vocab_size:
            raise invalid_request(
                f"`{param}[{position}]` is token id {token_id}, outside the vocabulary "
                f"[0, {vocab_size})",
                param=param,
            )


def named_prompts(
    value: str | list[str] | list[int] | list[list[int]],
    param: str,
    max_prompts: int | None = None,
    noun: str = "prompts",
) -> list[tuple[str, str | list[int]]]:
    """The prompts of a field such as /v1/completions' `prompt`, each with the name errors
    give it: a string or a list of token ids is one prompt; a list of either holds
    several, at most `max_prompts` (each one is an engine request); `noun` names them."""
    if isinstance(value, str) or all(isinstance(item, int) for item in value):
        return [(param, value)]  # type: ignore[list-item]
    if max_prompts is not None and len(value) > max_prompts:
        raise invalid_request(
            f"`{param}` holds {len(value)} {noun}; at most {max_prompts} are allowed in one "
            "request",
            param=param,
        )
    return [(f"{param}[{i}]", item) for i, item in enumerate(value)]  # type: ignore[misc]


def encode_prompt(prompt: str | list[int], param: str, tokenizer: Tokenizer) -> list[int]:
    """A text prompt's token ids (special tokens added, as the tokenizer does), or token
    ids checked against the vocabulary."""
    if isinstance(prompt, str):
        return require_tokens(tokenizer.encode(prompt), param)
    check_token_ids(prompt, param, tokenizer.vocab_size)
    return require_tokens([int(token_id) for token_id in prompt], param)


def require_tokens(token_ids: list[int], param: str) -> list[int]:
    if not token_ids:
        raise invalid_request(f"`{param}` is empty: it must hold at least one token", param)
    return token_ids


def no_parts(param: str) -> APIError:
    """The 400 for a content list without parts (as at OpenAI: a list holds one or more)."""
    return invalid_request(f"`{param}` is an empty list: it must hold at least one part", param)


def message_text(message: ChatMessage, index: int) -> str:
    """The text of one chat message; content parts must all be text. Only an assistant
    message that carries tool calls may have no content (as at OpenAI): elsewhere a
    missing `content` is a client's mistake (a misspelt key) that would be answered as an
    empty turn."""
    if message.content is None:
        if message.role == "assistant" and message.tool_calls:
            return ""
        param = f"messages[{index}].content"
        raise invalid_request(
            f"`{param}` is required: only an assistant message with `tool_calls` may have none",
            param,
        )
    if isinstance(message.content, str):
        return message.content
    if not message.content:
        raise no_parts(f"messages[{index}].content")
    texts = []
    for part_index, part in enumerate(message.content):
        param = f"messages[{index}].content[{part_index}]"
        if part.type != "text":
            raise invalid_request(
                f"`{param}.type` is '{part.type}'; only 'text' parts are supported", param
            )
        if part.text is None:
            raise invalid_request(f"`{param}.text` is required for a text part", param)
        texts.append(part.text)
    return "".join(texts)


def chat_template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: role + plain-text content, and the
    tool calls and tool results in transformers' format (app/tools/prompt.py)."""
    rendered = []
    for index, message in enumerate(messages):
        # OpenAI renamed "system" to "developer"; chat templates know "system".
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": message_text(message, index)}
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = template_tool_calls(message, index)
        if role == "tool":
            if not message.tool_call_id:
                param = f"messages[{index}].tool_call_id"
                raise invalid_request(
                    f"`{param}` is required: a tool message answers one call, by its id", param
                )
            entry["tool_call_id"] = message.tool_call_id
        rendered.append(entry)
    return rendered


def template_tool_calls(message: ChatMessage, index: int) -> list[dict[str, Any]]:
    """An assistant message's calls, arguments parsed (templates write them as JSON)."""
    if message.role != "assistant":
        param = f"messages[{index}].tool_calls"
        raise invalid_request(f"`{param}`: only assistant messages carry tool calls", param)
    calls = []
    for call_index, call in enumerate(message.tool_calls or ()):
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            param = f"messages[{index}].tool_calls[{call_index}].function.arguments"
            raise invalid_request(f"`{param}` must be a JSON object, as text", param)
        function = {"name": call.function.name, "arguments": arguments}
        calls.append({"id": call.id, "type": "function", "function": function})
    return calls


# A chat field's path (`messages[2].tool_calls[0].function.arguments`) -> the field the
# request sent it in (the Responses API's `input[3].arguments`).
FieldNames = Callable[[str], str]


def encode_chat(
    messages: list[ChatMessage],
    tokenizer: Tokenizer,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    fields: FieldNames | None = None,
) -> list[int]:
    """The prompt's token ids; `tools` (OpenAI definitions) shown to the model if given.
    A 400 names chat's `messages` fields, or what `fields` maps them to."""
    try:
        return _encode_chat(messages, tokenizer, add_generation_prompt, tools)
    except APIError as error:
        if fields is None or error.param is None:
            raise
        raise renamed(error, fields(error.param)) from None


def renamed(error: APIError, param: str) -> APIError:
    """`error` naming `param` instead of its own, in its message too."""
    message = error.message.replace(f"`{error.param}`", f"`{param}`")
    return APIError(error.status_code, message, type=error.type, param=param, code=error.code)


def _encode_chat(
    messages: list[ChatMessage],
    tokenizer: Tokenizer,
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
) -> list[int]:
    try:
        token_ids = tokenizer.apply_chat_template(
            chat_template_messages(messages),
            add_generation_prompt=add_generation_prompt,
            tools=tools,
        )
    except ChatTemplateError as exc:
        raise invalid_request(str(exc), param="messages", code="chat_template_error") from None
    except ForgedTurnError as exc:
        raise invalid_request(str(exc), exc.param, code="control_token_in_message") from None
    if not token_ids:
        raise invalid_request("`messages` rendered to an empty prompt", param="messages")
    return token_ids
