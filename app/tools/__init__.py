"""Tool calling: the call format a model writes, its prompt fallback, and the one parser.

No torch, no HTTP: the API (app/api/tool_request.py, dialect_openai.py) validates the
request and renders the answer; app/structured builds the grammar that enforces calls.
"""

from app.tools.parser import (
    ArgumentsText,
    CallOpened,
    ContentText,
    HermesToolParser,
    ParsedOutput,
    ToolEvent,
    parse_output,
)

__all__ = [
    "ArgumentsText",
    "CallOpened",
    "ContentText",
    "HermesToolParser",
    "ParsedOutput",
    "ToolEvent",
    "parse_output",
]
