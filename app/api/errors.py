"""One error contract for every route: the OpenAI envelope.

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

Routes raise `APIError`; the handlers installed by `install_error_handlers` turn it, and
FastAPI's validation errors (422 -> 400), unknown routes (404), wrong methods (405) and
unexpected exceptions (500, no traceback in the body) into that envelope. On the TGI
routes (RouteFacts.tgi_errors) the body also carries TGI's `error_type`, so TGI clients
raise typed errors.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.route_facts import facts_for

logger = logging.getLogger("lamina.api")


class APIError(Exception):
    """A request that cannot be served, with the HTTP status and the envelope's fields."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str,  # noqa: A002 - the envelope's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self, tgi: bool = False) -> dict[str, Any]:
        """The envelope (ErrorResponse, as /docs shows it); with `tgi`, also TGI's
        `error_type`."""
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        body = ErrorResponse(error=detail).model_dump()
        if tgi:
            body["error_type"] = tgi_error_type(self.status_code)
        return body


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; nobody reads the response."""


def invalid_request(
    message: str, param: str | None = None, code: str = "invalid_value"
) -> APIError:
    return APIError(400, message, type="invalid_request_error", param=param, code=code)


def model_not_found(requested: str, served: str) -> APIError:
    message = f"model '{requested}' does not exist; this server serves '{served}' (GET /v1/models)"
    return APIError(404, message, type="not_found_error", param="model", code="model_not_found")


def not_found(message: str, param: str | None = None, code: str = "not_found") -> APIError:
    return APIError(404, message, type="not_found_error", param=param, code=code)


def request_too_large(message: str) -> APIError:
    return APIError(413, message, type="invalid_request_error", code="request_too_large")


def service_unavailable(message: str, code: str = "not_ready") -> APIError:
    return APIError(503, message, type="service_unavailable_error", code=code)


def server_error(message: str, code: str = "internal_error") -> APIError:
    return APIError(500, message, type="server_error", code=code)


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, naming the field and the allowed values")
    type: str = Field(description="invalid_request_error, not_found_error, server_error, ...")
    param: str | None = Field(default=None, description="The request field at fault, if any")
    code: str | None = Field(default=None, description="A stable machine-readable code")


class ErrorResponse(BaseModel):
    """The body of every non-2xx answer."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or invalid API key (when keys are set)"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    429: {"model": ErrorResponse, "description": "Queue full: retry after `Retry-After` seconds"},
    503: {"model": ErrorResponse, "description": "Not ready, draining, or the engine is down"},
    504: {"model": ErrorResponse, "description": "The request's deadline passed"},
}


def tgi_error_type(status_code: int) -> str:
    """TGI's `error_type` for a status, which huggingface_hub maps to exception classes."""
    if status_code == 429:
        return "overloaded"
    if status_code < 500:
        return "validation"
    return "generation"


def error_response(error: APIError, path: str | None = None) -> JSONResponse:
    """The JSON answer for `error` on the route at `path` (its error flavour)."""
    body = error.body(tgi=facts_for(path).tgi_errors)
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


# --- request validation: pydantic errors -> one readable sentence ------------------


def _field_path(loc: tuple[Any, ...]) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _readable(msg: str) -> str:
    if msg.startswith("Value error, "):
        return msg[len("Value error, ") :]
    if msg.startswith("Input should be "):
        return "must be " + msg[len("Input should be ") :]
    if msg == "Field required":
        return "is required"
    return msg


def _shown_value(value: Any) -> str | None:
    if isinstance(value, (dict, list)):
        return None
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_validation_error(error: dict[str, Any]) -> tuple[str, str | None]:
    """One sentence for one pydantic error, and the field it names."""
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "malformed JSON")
        position = error.get("loc", (None, None))[-1]
        where = f" at character {position}" if isinstance(position, int) else ""
        return f"request body is not valid JSON: {detail}{where}", None
    param = _field_path(tuple(error.get("loc", ()))) or None
    if param is None and error.get("type") in ("model_attributes_type", "dict_type"):
        if isinstance(error.get("input"), bytes):  # FastAPI did not parse it as JSON
            return "request body must be JSON, sent with Content-Type: application/json", None
        return "request body must be a JSON object", None
    message = _readable(str(error.get("msg", "invalid value")))
    shown = (
        None
        if error.get("type") in ("value_error", "missing")
        else _shown_value(error.get("input"))
    )
    subject = f"`{param}`" if param else "request body"
    sentence = (
        f"{subject} {message}" if message.startswith(("must", "is ")) else (f"{subject}: {message}")
    )
    if shown is not None:
        sentence += f" (got {shown})"
    return sentence, param


def validation_error_to_api_error(errors: list[dict[str, Any]]) -> APIError:
    sentences: list[str] = []
    first_param: str | None = None
    for error in errors:
        sentence, param = describe_validation_error(error)
        if sentence not in sentences:
            sentences.append(sentence)
        first_param = first_param or param
    return invalid_request("; ".join(sentences[:3]), param=first_param)


# --- handlers ----------------------------------------------------------------------


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc, request.url.path)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error_to_api_error(list(exc.errors())), request.url.path)


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    method, path = request.method, request.url.path
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        error = not_found(f"no route for {method} {path}", code="route_not_found")
    elif exc.status_code == 405:
        allowed = headers.pop("allow", None) or headers.pop("Allow", None)
        if allowed:
            if "GET" in allowed.split(", ") and "HEAD" not in allowed:
                allowed += ", HEAD"  # answered on every GET route (head.py)
            headers["Allow"] = allowed
        error = APIError(
            405,
            f"method {method} is not allowed on {path}; allowed: {allowed or '?'}",
            type="invalid_request_error",
            code="method_not_allowed",
            headers=headers,
        )
    elif exc.detail == "There was an error parsing the body":  # FastAPI's, for the rest
        error = invalid_request("request body could not be parsed as JSON", code="invalid_body")
    else:
        error = APIError(
            exc.status_code, str(exc.detail), type="invalid_request_error", headers=headers
        )
    return error_response(error, path)


async def _on_client_disconnected(request: Request, exc: Exception) -> Response:
    logger.debug("client left %s %s before the answer was ready", request.method, request.url.path)
    return Response(status_code=499)  # nginx's "client closed request"; never delivered


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    error = server_error("internal server error; the request failed unexpectedly")
    return error_response(error, request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(ClientDisconnected, _on_client_disconnected)
    app.add_exception_handler(Exception, _on_unexpected)
