"""OpenAI `response_format` (and vLLM's `guided_*`, `structured_outputs`) -> a compiled
grammar constraint, before the engine sees it.

Parsing is sync (`request_constraint`, in the dialect's parse); compiling is async
(`compile_constraint`: the server's ConstraintCompiler works in its own thread, cached by
content hash), awaited before any engine request or stream opens, so a schema the
grammar engine cannot compile is a 400 naming what is unsupported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from app.api.errors import invalid_request
from app.structured import CompiledConstraint, ConstraintCompiler, ConstraintError, ConstraintSpec

PARAM = "response_format"


def output_format_spec(value: Any, param: str, nested: bool) -> ConstraintSpec | None:
    """An OpenAI output format: `{"type": "text"}` (None), "json_object", or "json_schema"
    with its schema: at `json_schema.schema` (`nested`: chat's `response_format`) or at
    `schema` (the Responses API's `text.format`).

    json_schema's `strict` is accepted either way: the grammar always enforces the schema.
    """
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ConstraintSpec("json_object")
    if kind == "json_schema":
        holder, path = (
            (value.get("json_schema"), "json_schema.schema") if nested else (value, "schema")
        )
        return ConstraintSpec("json_schema", schema_in(holder, param, path))
    raise invalid_request(
        f'`{param}.type` must be "text", "json_object" or "json_schema" (got {kind!r})',
        param=param,
    )


def schema_in(holder: Any, param: str, path: str) -> dict[str, Any] | bool:
    """The JSON schema `holder["schema"]` of a "json_schema" format, or the 400 saying
    where `param` should hold it (`path`)."""
    if not isinstance(holder, dict) or not isinstance(holder.get("schema"), dict | bool):
        raise invalid_request(
            f'`{param}` of type "json_schema" needs `{path}`, a JSON schema object', param=param
        )
    return holder["schema"]


# vLLM's older field names, and the kind each one asks for
GUIDED_FIELDS = {
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
# vLLM's `structured_outputs` keys, and the kind each one asks for
STRUCTURED_OUTPUTS_KEYS = {
    "json": "json_schema",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}


@dataclass(frozen=True)
class RequestedConstraint:
    """The one constraint a request asks for, and the field that asked (for errors)."""

    spec: ConstraintSpec
    param: str
    # What a compile error means for this request (e.g. which tool's schema failed);
    # None: the engine's message as it is.
    explain: Callable[[str], str] | None = None


def request_constraint(extra_fields: Mapping[str, Any] | None) -> RequestedConstraint | None:
    """The request's constraint from whichever field asks for one; a 400 if several do."""
    extra = extra_fields or {}
    found: list[RequestedConstraint] = []
    spec = None if extra.get(PARAM) is None else output_format_spec(extra[PARAM], PARAM, True)
    if spec is not None:
        found.append(RequestedConstraint(spec, PARAM))
    for name, kind in GUIDED_FIELDS.items():
        if extra.get(name) is not None:
            found.append(RequestedConstraint(_spec(kind, extra[name], name), name))
    if extra.get("structured_outputs") is not None:
        found.append(structured_outputs_constraint(extra["structured_outputs"]))
    if len(found) > 1:
        names = ", ".join(f"`{c.param}`" for c in found)
        raise invalid_request(
            f"{names} each ask for an output constraint; send at most one", param=found[1].param
        )
    return found[0] if found else None


def structured_outputs_constraint(value: Any) -> RequestedConstraint:
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar."""
    param = "structured_outputs"
    if not isinstance(value, dict):
        raise invalid_request(f"`{param}` must be an object", param=param)
    unknown = sorted(set(value) - set(STRUCTURED_OUTPUTS_KEYS))
    if unknown:
        raise invalid_request(
            f"`{param}.{unknown[0]}` is not supported; supported: "
            + ", ".join(STRUCTURED_OUTPUTS_KEYS),
            param=param,
            code="unsupported_field",
        )
    given = [key for key, item in value.items() if item is not None]
    if len(given) != 1:
        raise invalid_request(
            f"`{param}` needs exactly one of " + ", ".join(STRUCTURED_OUTPUTS_KEYS), param=param
        )
    (key,) = given
    return RequestedConstraint(_spec(STRUCTURED_OUTPUTS_KEYS[key], value[key], param), param)


TGI_GRAMMAR_PARAM = "parameters.grammar"


def tgi_grammar_constraint(grammar: Any) -> RequestedConstraint | None:
    """TGI's `parameters.grammar`: `{"type": "json", "value": schema}` (the schema may also
    come as a JSON string; `json_object` is TGI's alias of `json`), `{"type": "regex",
    "value": pattern}` or `{"type": "json_schema", "value": {"name", "schema"}}`."""
    if grammar is None:
        return None
    kind, value = grammar.type, grammar.value
    if kind == "regex":
        if not isinstance(value, str):
            raise invalid_request(
                "`parameters.grammar.value` must be a regular expression (a string)",
                param=TGI_GRAMMAR_PARAM,
            )
        return RequestedConstraint(ConstraintSpec("regex", value), TGI_GRAMMAR_PARAM)
    if kind == "json_schema":
        value = schema_in(value, TGI_GRAMMAR_PARAM, "value.schema")
    spec = _spec("json_schema", value, TGI_GRAMMAR_PARAM)
    return RequestedConstraint(spec, TGI_GRAMMAR_PARAM)


def _spec(kind: str, value: Any, param: str) -> ConstraintSpec:
    if kind == "choice" and isinstance(value, list):
        value = tuple(value)
    if kind == "json_schema" and not isinstance(value, dict | bool | str):
        raise invalid_request(f"`{param}` must be a JSON schema (an object)", param=param)
    return ConstraintSpec(kind, value)


async def compile_constraint(
    requested: RequestedConstraint, compiler: ConstraintCompiler | None
) -> CompiledConstraint:
    """The compiled constraint, or a 400 saying why there is none (nothing has started)."""
    param = requested.param
    if compiler is None:  # an engine without grammar support (the tests' fake engine)
        raise invalid_request(
            f"`{param}` is not supported: this server's engine cannot constrain its output",
            param=param,
            code="unsupported_field",
        )
    try:
        return await compiler.compile(requested.spec)
    except ConstraintError as exc:
        if requested.explain is not None:
            raise invalid_request(requested.explain(str(exc)), param=param) from None
        raise invalid_request(f"`{param}` cannot be enforced: {exc}", param=param) from None
