"""Log formatting, request-id propagation and request-id validation (no server)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from app.api.observability import MAX_REQUEST_ID_LENGTH, accept_request_id
from app.api.request_record import failure_for_status
from app.logging_setup import (
    UVICORN_ACCESS_LOGGER,
    configure_logging,
    make_handler,
    request_id_var,
)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging rewires the root and uvicorn loggers: put them back after."""
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.asgi", UVICORN_ACCESS_LOGGER]
    saved = {
        name: (list(lg.handlers), lg.level, lg.propagate)
        for name in names
        for lg in [logging.getLogger(name)]
    }
    yield
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
    logging.captureWarnings(False)


def _logger_with(log_format: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    log = logging.getLogger(f"lamina.test.{log_format}")
    log.handlers[:] = [make_handler(log_format, stream)]
    log.setLevel(logging.DEBUG)
    log.propagate = False
    return log, stream


def test_json_lines_carry_level_logger_request_id_and_extras() -> None:
    log, stream = _logger_with("json")
    token = request_id_var.set("req-1")
    try:
        log.info("served %s", "x\ny", extra={"status": 200, "ttft_s": 0.25})
    finally:
        request_id_var.reset(token)
    log.warning("outside any request")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the newline in the message stays inside its JSON string
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "info" and first["logger"] == "lamina.test.json"
    assert first["message"] == "served x\ny"
    assert first["request_id"] == "req-1"
    assert first["status"] == 200 and first["ttft_s"] == 0.25
    assert first["ts"].endswith("Z")
    assert second["level"] == "warning" and "request_id" not in second


def test_json_lines_include_the_traceback() -> None:
    log, stream = _logger_with("json")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    entry = json.loads(stream.getvalue())
    assert "ValueError: boom" in entry["exc_info"]


def test_text_lines_show_request_id_and_quoted_extras() -> None:
    log, stream = _logger_with("text")
    token = request_id_var.set("req-2")
    try:
        log.info("hello", extra={"route": "/v1/completions", "note": "two words"})
    finally:
        request_id_var.reset(token)
    line = stream.getvalue().strip()
    assert "INFO" in line and "[req-2]" in line and "hello" in line
    assert "route=/v1/completions" in line and 'note="two words"' in line


HOSTILE = "/v1/\x1b[2J\x1b[31mfake\u202eeulav\x9b\x7f\x00end"
# Every character a terminal acts on: C0, DEL, C1, bidi and line separators.
UNSAFE = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]] + ["\u202e", "\u2028", "\u2066"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_control_characters_never_reach_a_line_raw(log_format: str) -> None:
    log, stream = _logger_with(log_format)
    token = request_id_var.set("req-\x1b3")
    try:
        log.warning("path %s", HOSTILE, extra={"path": HOSTILE, "plain": "a\x1bb"})
        try:
            raise ValueError(HOSTILE)
        except ValueError:
            log.exception("failed on %s", HOSTILE)
    finally:
        request_id_var.reset(token)
    output = stream.getvalue()
    assert not [char for char in UNSAFE if char in output.replace("\n", "")]
    if log_format == "json":  # still JSON, and the values come back intact
        first = json.loads(output.splitlines()[0])
        assert first["path"] == HOSTILE and first["message"] == f"path {HOSTILE}"
    else:
        first = output.splitlines()[0]
        assert "\\x1b[2J" in first and "\\u202e" in first and "plain=a\\x1bb" in first


def test_request_id_reaches_tasks_started_by_the_request() -> None:
    log, stream = _logger_with("json")

    async def request(request_id: str) -> None:
        request_id_var.set(request_id)  # what the middleware does, per request task
        await asyncio.sleep(0)
        await asyncio.ensure_future(asyncio.sleep(0, result=None))
        task = asyncio.ensure_future(_log_later(log))
        await task

    async def both() -> None:
        await asyncio.gather(request("a"), request("b"))

    asyncio.run(both())
    ids = sorted(json.loads(line)["request_id"] for line in stream.getvalue().splitlines())
    assert ids == ["a", "b"]


async def _log_later(log: logging.Logger) -> None:
    await asyncio.sleep(0.01)
    log.info("from a child task")


def test_configure_logging_routes_uvicorn_through_one_handler(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream)
    logging.getLogger("uvicorn.error").info("Started server process [1]")
    logging.getLogger("uvicorn.access").info('127.0.0.1 - "GET / HTTP/1.1" 200')
    logging.getLogger("lamina.api").debug("below the level")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [entry["logger"] for entry in lines] == ["uvicorn.error"]
    assert len(logging.getLogger().handlers) == 1


@pytest.mark.parametrize(
    ("given", "accepted"),
    [
        ("3f2a9c", True),
        ("trace-01.abc_DEF:7", True),
        ("YWJj+/ZA==", True),
        ("x" * MAX_REQUEST_ID_LENGTH, True),
        ("x" * (MAX_REQUEST_ID_LENGTH + 1), False),
        ("", False),
        ("has space", False),
        ("new\nline", False),
        ('quote"', False),
        ("semi;colon", False),
        ("ünïcode", False),
    ],
)
def test_request_id_validation(given: str, accepted: bool) -> None:
    assert (accept_request_id(given) == given) is accepted
    if not accepted:
        assert accept_request_id(given) is None


def test_failure_reason_from_status() -> None:
    assert [failure_for_status(s) for s in (200, 400, 401, 404, 408, 413, 429, 499, 500, 503)] == [
        None,
        "validation",
        "unauthorized",
        "validation",
        "timeout",
        "validation",
        "overloaded",
        "aborted",
        "error",
        "error",
    ]
