"""The grammar that makes a model's tool calls valid: Lark text for llguidance.

A call is written in the model's call format (app/tools/formats.py), Hermes:

    <tool_call>\\n{"name": "NAME", "arguments": ARGS}\\n</tool_call>

or Llama 3 JSON: `{"name": "NAME", "parameters": ARGS}`, several joined by `; `.
ARGS is enforced by the function's JSON schema (inlined with `%json`, laid out like the
other JSON constraints: one space after `,` and `:`), and NAME is one of the offered
functions. `required` output is calls only. `auto` output, Hermes: free text in which
the opening tag, once written, switches the constraint on (llguidance's lazy lexeme:
the text lexeme ends at the first `<tool_call>`), with text allowed again after a call;
Llama 3: calls, or text that does not start with `{` (the format has no tag).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from app.structured.spec import JSON_LAYOUT, ConstraintSpec
from app.tools.formats import HERMES, ToolCallFormat

# Functions declared without parameters take none.
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


# Keywords whose value is a schema, a list of schemas, or a map of name -> schema.
_SCHEMA_KEYWORDS = ("items", "additionalItems", "not", "if", "then", "else", "contains")
_SCHEMA_LIST_KEYWORDS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAP_KEYWORDS = ("properties", "$defs", "definitions", "patternProperties")


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` where an object schema with `properties` and no word on
    `additionalProperties` takes only its declared properties.

    JSON Schema allows any extra property by default, and a small model given that
    freedom adds keys until max_tokens; OpenAI's strict function schemas must say
    `additionalProperties: false` anyway. A schema that says otherwise is kept.
    """
    if not isinstance(schema, dict):
        return schema
    result = dict(schema)
    for key in _SCHEMA_KEYWORDS:
        if key in result:
            result[key] = closed_objects(result[key])
    for key in _SCHEMA_LIST_KEYWORDS:
        if isinstance(result.get(key), list):
            result[key] = [closed_objects(item) for item in result[key]]
    for key in _SCHEMA_MAP_KEYWORDS:
        if isinstance(result.get(key), dict):
            result[key] = {name: closed_objects(item) for name, item in result[key].items()}
    if isinstance(result.get("additionalProperties"), dict):
        result["additionalProperties"] = closed_objects(result["additionalProperties"])
    elif "properties" in result and "additionalProperties" not in result:
        result["additionalProperties"] = False
    return result


def _function_rule(index: int, name: str, parameters: dict | None, arguments_key: str) -> str:
    """fn_<index>: the JSON text of one call to `name` (its schema enforced)."""
    schema = closed_objects(parameters if parameters is not None else NO_PARAMETERS)
    schema.setdefault("x-guidance", JSON_LAYOUT)
    head = _literal('{"name": ' + json.dumps(name) + ", " + json.dumps(arguments_key) + ": ")
    return f'fn_{index}: {head} %json {json.dumps(schema)} "}}"'


def _body_lines(functions: Sequence[tuple[str, dict | None]], arguments_key: str) -> list[str]:
    """`body`: one call's JSON object, to any of `functions`; then each `fn_<i>`."""
    if not functions:
        raise ValueError("a tool-call grammar needs at least one function")
    return [
        "body: " + " | ".join(f"fn_{i}" for i in range(len(functions))),
        *(
            _function_rule(i, name, parameters, arguments_key)
            for i, (name, parameters) in enumerate(functions)
        ),
    ]


def tool_call_lark(
    functions: Sequence[tuple[str, dict | None]],
    required: bool,
    parallel: bool,
    call_format: ToolCallFormat = HERMES,
) -> str:
    """Lark for calls to `functions` ((name, parameters schema) each), laid out as
    `call_format` writes them (its opening, arguments key, closing and separator).

    required: the output is one call (or several with `parallel`) and nothing else.
    Otherwise (`auto`) text or calls: in a format with a tag, free text in which the tag,
    once written, starts a call (with `parallel`, text and calls may follow; without,
    the output ends with the call); in a tagless one, calls, or text that does not
    begin as a call does (with the body's `{`).
    """
    tag, separator = call_format.tag, _literal(call_format.separator)
    rest = [call_format.opening[len(tag) :], "body", call_format.closing]
    lines = [
        *_body_lines(functions, call_format.arguments_key),
        "call_rest: " + " ".join(p if p == "body" else _literal(p) for p in rest if p),
    ]
    calls = f"call ({separator} call)*" if parallel else "call"
    if required or not tag:
        lines.append(f"call: {_literal(tag)} call_rest" if tag else "call: call_rest")
    if required:
        start = f"start: {calls}"
    elif tag:
        lines += ["TEXT: /(.|\\n)*/", f"call_head[lazy]: TEXT {_literal(tag)}"]
        start = (
            "start: (call_head call_rest)* TEXT"
            if parallel
            else "start: TEXT | call_head call_rest"
        )
    else:
        lines.append("TEXT: /\\s*[^{\\s](.|\\n)*/")  # its first non-blank is not `{`
        start = f"start: {calls} | TEXT"
    return "\n".join([start, *lines]) + "\n"


def _literal(text: str) -> str:
    """`text` as a Lark string literal."""
    return json.dumps(text)


# fn_<i> is line FIRST_FUNCTION_LINE + i of the grammar (1-based, as llguidance counts).
FIRST_FUNCTION_LINE = 3


def tool_call_spec(
    functions: Sequence[tuple[str, dict | None]],
    required: bool,
    parallel: bool,
    call_format: ToolCallFormat = HERMES,
) -> ConstraintSpec:
    return ConstraintSpec("lark", tool_call_lark(functions, required, parallel, call_format))
