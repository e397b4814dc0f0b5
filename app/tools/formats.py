"""Tool-call formats: how a model family writes a call, and which one a model gets.

A format names its parser (what the answer's text becomes), how a call is written (the
grammar that enforces calls and the prompt fallback both follow it) and the fallback's
instructions. Supported:

- `hermes`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks
  anywhere in the answer (Hermes, Qwen 2.5 / 3, and lamina's fallback for templates
  that do not render tools).
- `llama3_json`: the answer is a `{"name": ..., "parameters": {...}}` call, or text
  (Llama 3.1 / 3.2 / 3.3; one call an answer, as their templates take it back; the
  parser also reads calls joined by `; `).

The chat template decides (`LAMINA_TOOL_CALL_FORMAT=auto`): a template that renders
tools and writes `<tool_call>` is Hermes, one that knows `<|python_tag|>` or the
`ipython` role is Llama 3; a template that renders tools in another format, or none,
gets the fallback prompt in the Hermes format, so the instructions the model reads and
the grammar that checks its calls agree. Naming a format forces it (with the template's
own tool rendering if it has one, the fallback's otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from app.tools.llama_parser import Llama3JsonToolParser
from app.tools.parser import CLOSE_TAG, OPEN_TAG, HermesToolParser, ToolParser

FormatSetting = Literal["auto", "hermes", "llama3_json"]


@dataclass(frozen=True)
class ToolCallFormat:
    """How calls are written: `opening` + {"name": NAME, `arguments_key`: ARGS} +
    `closing`, several joined by `separator`."""

    name: str
    new_parser: Callable[[], ToolParser]
    arguments_key: str
    opening: str
    closing: str
    separator: str
    how_to_call: str  # the fallback prompt's instructions, after the tool list
    # The start of `opening` that announces a call in free text ("" for a format whose
    # calls are the whole answer): under `auto` the grammar enforces calls from there.
    tag: str
    # Several calls in one answer: Llama 3.x templates refuse an assistant turn with more
    # than one call, so a parallel answer sent back as history would fail every later
    # request; its grammar asks for one call.
    parallel_calls: bool = True

    def call_text(self, function: dict[str, Any]) -> str:
        """One call as the model writes it (arguments: a dict, or JSON text)."""
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        body = {"name": function["name"], self.arguments_key: arguments}
        return self.opening + json.dumps(body, ensure_ascii=False) + self.closing


HERMES = ToolCallFormat(
    name="hermes",
    new_parser=HermesToolParser,
    arguments_key="arguments",
    opening=OPEN_TAG + "\n",
    closing="\n" + CLOSE_TAG,
    tag=OPEN_TAG,
    separator="\n",
    how_to_call=(
        "To call a function, write a JSON object with its name and arguments between "
        "<tool_call></tool_call> tags, like this:\n"
        f'{OPEN_TAG}\n{{"name": "function name", "arguments": {{"argument": "value"}}}}\n'
        f"{CLOSE_TAG}"
    ),
)
LLAMA3_JSON = ToolCallFormat(
    name="llama3_json",
    new_parser=Llama3JsonToolParser,
    arguments_key="parameters",
    opening="",
    closing="",
    tag="",
    separator="; ",
    how_to_call=(
        "To call a function, answer with only a JSON object with its name and parameters, "
        'like this:\n{"name": "function name", "parameters": {"argument": "value"}}'
    ),
    parallel_calls=False,
)
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON)}


def template_format(template: str) -> ToolCallFormat | None:
    """The format a template that renders tools writes calls in, if lamina knows it."""
    if OPEN_TAG in template:
        return HERMES
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3_JSON
    return None


def choose_format(
    template: str | None, renders_tools: bool, setting: FormatSetting = "auto"
) -> tuple[ToolCallFormat, bool]:
    """(the format, whether the template renders tools itself) for a model.

    `template`: its chat template (the tool-use one when it has several);
    `renders_tools`: whether that template reads `tools`.
    """
    if setting != "auto":
        return FORMATS[setting], renders_tools
    known = template_format(template or "") if renders_tools else None
    if known is None:
        return HERMES, False  # the fallback prompt, in the format the grammar enforces
    return known, True
