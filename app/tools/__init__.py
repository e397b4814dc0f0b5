"""Tool calling: the call formats models write, their prompt fallback, and the parsers.

No torch, no HTTP: the API (app/api/tool_calls.py, dialect_openai.py) validates the
request and renders the answer; app/structured builds the grammar that enforces calls.
"""

from app.tools.formats import (
    FORMATS,
    HERMES,
    LLAMA3_JSON,
    FormatSetting,
    ToolCallFormat,
    choose_format,
)
from app.tools.llama_parser import Llama3JsonToolParser
from app.tools.parser import (
    ArgumentsText,
    CallOpened,
    ContentText,
    HermesToolParser,
    ParsedOutput,
    ToolEvent,
    ToolParser,
    parse_output,
)

__all__ = [
    "FORMATS",
    "HERMES",
    "LLAMA3_JSON",
    "ArgumentsText",
    "CallOpened",
    "ContentText",
    "FormatSetting",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "ParsedOutput",
    "ToolCallFormat",
    "ToolEvent",
    "ToolParser",
    "choose_format",
    "parse_output",
]
