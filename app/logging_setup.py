"""Process logging: one JSON object per line (or readable text), a request id on every line.

`configure_logging` gives the root logger one handler; lamina's loggers and uvicorn's
("uvicorn", "uvicorn.error") propagate into it, so every line has the same shape.
uvicorn's own access log is silenced: lamina writes one access line per request itself
(app/api/request_record.py), with the request id, token counts and timings.

The request id lives in a context variable (`request_id_var`) that the HTTP middleware
sets for the life of a request. Tasks the request starts copy the context, so a line
logged anywhere while serving it (routes, streaming, error handlers) carries the id:
`RequestContextFilter`, on the handler, copies it onto every record.

Fields passed with `extra={...}` become JSON keys (text: `key=value`). Prompt and output
text are never logged unless Settings.log_prompts is on (request_record.log_access decides).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from typing import IO, Any

request_id_var: ContextVar[str | None] = ContextVar("lamina_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "request_id",
    "taskName",
    "color_message",  # uvicorn's copy of the message with terminal colours
}
# uvicorn's loggers: sent to the root handler. "uvicorn.access" stays off (see above).
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.asgi")
UVICORN_ACCESS_LOGGER = "uvicorn.access"


# Characters a terminal or log viewer would act on rather than show: C0 and C1 controls
# (ESC starts colour and cursor sequences), and the bidi and line-separator controls that
# reorder or break what a reader sees. A client chooses the URL path, headers and body, so
# anything of theirs on a log line could otherwise recolour, hide or forge lines.
_UNSAFE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(char: re.Match[str]) -> str:
    text = char.group()
    if text in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[text]
    code = ord(text)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character written as a visible escape (`\\x1b`)."""
    return _UNSAFE_CHARS.sub(_escaped, text)


def _json_escaped(char: re.Match[str]) -> str:
    return f"\\u{ord(char.group()):04x}"


class RequestContextFilter(logging.Filter):
    """Puts the current request id (or None) on every record that passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What the caller passed with `extra=`, in the order given."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD_ATTRS and not key.startswith("_")
    }


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, extras, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update(extra_fields(record))
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        # json.dumps escapes newlines and C0 controls, so a hostile path or prompt cannot
        # forge a line; the rest (DEL, C1, bidi) become \\u escapes, still valid JSON.
        return _UNSAFE_CHARS.sub(_json_escaped, json.dumps(entry, ensure_ascii=False, default=str))


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(ch.isspace() or ch in '"=' for ch in text):
        text = json.dumps(text, ensure_ascii=False)
    return escape_controls(text)


class TextFormatter(logging.Formatter):
    """For a terminal: `time LEVEL logger [request id] message key=value ...`."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}",
            f"{record.levelname:<7}",
            record.name,
        ]
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            parts.append(f"[{escape_controls(str(request_id))}]")
        parts.append(escape_controls(record.getMessage()))
        parts.extend(f"{key}={_text_value(value)}" for key, value in extra_fields(record).items())
        line = " ".join(parts)
        if record.exc_info:
            # A traceback keeps its lines; anything else in it is escaped like the rest.
            trace = self.formatException(record.exc_info).split("\n")
            line += "\n" + "\n".join(escape_controls(part) for part in trace)
        return line


def make_handler(log_format: str, stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler with lamina's formatter ("json" or "text") and request ids."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestContextFilter())
    return handler


def configure_logging(log_format: str, log_level: str, stream: IO[str] | None = None) -> None:
    """Send every log line of the process through one lamina handler.

    Call before uvicorn starts, and run uvicorn with `log_config=None` (so it does not
    install its own handlers) and `access_log=False` (lamina logs each request once).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(make_handler(log_format, stream))
    root.setLevel(log_level.upper())
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        # A dictConfig run earlier (uvicorn's default log_config) may have disabled or
        # raised them; make them follow the root logger again.
        logger.disabled = False
        logger.setLevel(logging.NOTSET)
    access = logging.getLogger(UVICORN_ACCESS_LOGGER)
    access.handlers.clear()
    access.propagate = False
    logging.captureWarnings(True)
