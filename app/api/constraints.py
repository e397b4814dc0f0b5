"""OpenAI `response_format` -> a compiled grammar constraint, before the engine sees it.

Parsing is sync (`response_format_spec`, in the dialect's parse); compiling is async
(`compile_constraint`: the server's ConstraintCompiler works in its own thread, cached by
content hash), awaited before any engine request or stream opens, so a schema the
grammar engine cannot compile is a 400 naming what is unsupported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.api.errors import APIError, invalid_request
from app.structured import CompiledConstraint, ConstraintCompiler, ConstraintError, ConstraintSpec

PARAM = "response_format"


def response_format_spec(extra_fields: Mapping[str, Any] | None) -> ConstraintSpec | None:
    """The constraint `response_format` asks for; None for none or `{"type": "text"}`.

    json_schema's `strict` is accepted either way: the grammar always enforces the schema.
    """
    value = (extra_fields or {}).get(PARAM)
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ConstraintSpec("json_object")
    if kind == "json_schema":
        wrapper = value.get("json_schema")
        if not isinstance(wrapper, dict) or not isinstance(wrapper.get("schema"), dict | bool):
            raise invalid_request(
                '`response_format` of type "json_schema" needs `json_schema.schema`, a JSON '
                "schema object",
                param=PARAM,
            )
        return ConstraintSpec("json_schema", wrapper["schema"])
    raise invalid_request(
        f'`response_format.type` must be "text", "json_object" or "json_schema" (got {kind!r})',
        param=PARAM,
    )


async def compile_constraint(
    spec: ConstraintSpec, compiler: ConstraintCompiler | None
) -> CompiledConstraint:
    """The compiled constraint, or a 400 saying why there is none (nothing has started)."""
    if compiler is None:  # an engine without grammar support (the tests' fake engine)
        raise invalid_request(
            f"`{PARAM}` is not supported: this server's engine cannot constrain its output",
            param=PARAM,
            code="unsupported_field",
        )
    try:
        return await compiler.compile(spec)
    except ConstraintError as exc:
        raise constraint_refused(exc) from None


def constraint_refused(exc: ConstraintError) -> APIError:
    return invalid_request(f"`{PARAM}` cannot be enforced: {exc}", param=PARAM)
