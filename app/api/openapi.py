"""The OpenAPI document served at /openapi.json (and rendered at /docs).

FastAPI's defaults are adjusted to the real contract: validation errors are 400s with
the error envelope (not 422s), and streaming routes document their `data:` events.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api.route_facts import declared_routes

REF_TEMPLATE = "#/components/schemas/{model}"


def _add_event_streams(schema: dict[str, Any]) -> None:
    """Each streaming route (RouteFacts.event_model) documents its `data:` events."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, facts in declared_routes().items():
        operation = schema.get("paths", {}).get(path, {}).get("post")
        model = facts.event_model
        if operation is None or model is None:
            continue
        model_schema = model.model_json_schema(ref_template=REF_TEMPLATE)
        components.update(model_schema.pop("$defs", {}))
        components[model.__name__] = model_schema
        ok = operation.setdefault("responses", {}).setdefault("200", {})
        ok.setdefault("content", {})["text/event-stream"] = {
            "schema": {"$ref": REF_TEMPLATE.format(model=model.__name__)}
        }
        ok["description"] = (
            "JSON, or with `stream` a text/event-stream of `data: {event}` lines"
            + (" ending with `data: [DONE]`" if facts.ends_with_done else "")
        )


def _drop_422(schema: dict[str, Any]) -> None:
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _drop_422(schema)
            _add_event_streams(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
