"""Reject JSON bodies that carry lone UTF-16 surrogates (`"\\ud800"` with no partner).

JSON may escape any code unit, so `"\\ud800"` is well-formed JSON, and Python's json
module turns it into a str holding a lone surrogate. That is not Unicode text: the
tokenizer, the chat template and the response encoder all fail on it (a 500). TGI's
own server (serde_json) refuses such bodies; lamina answers 400 before any route runs
(middleware.BodyGuard).

A raw surrogate cannot appear any other way (its UTF-8 form is invalid UTF-8, which the
JSON parser already refuses), so scanning the body's escape sequences is enough.
"""

from __future__ import annotations

import re

# Every escape sequence, in order: `\uXXXX` (with its hex digits) or `\` + one character.
# Scanning them left to right handles `\\u...` (an escaped backslash) correctly.
_ESCAPE = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)
HIGH = range(0xD800, 0xDC00)
LOW = range(0xDC00, 0xE000)


def lone_surrogate_offset(body: bytes) -> int | None:
    """Byte offset of the first `\\uXXXX` escape that is half of a missing pair."""
    if b"\\u" not in body:
        return None
    pending_high: re.Match[bytes] | None = None
    for match in _ESCAPE.finditer(body):
        unit = int(match.group(1), 16) if match.group(1) else None
        if pending_high is not None:
            paired = unit in LOW and match.start() == pending_high.end()
            if not paired:
                return pending_high.start()
            pending_high = None
            continue
        if unit in HIGH:
            pending_high = match
        elif unit in LOW:
            return match.start()
    return None if pending_high is None else pending_high.start()
