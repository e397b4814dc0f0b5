"""OpenAI `tools`, `tool_choice` and `parallel_tool_calls` -> what the request asks of calls.

Checked here, before the engine sees anything: function names (OpenAI's rule), no name
twice, a named choice that names an offered function, `required` or a named choice only
with tools. A parameters schema the grammar engine cannot compile is a 400 too, when
the dialect compiles the constraint (constraints.compile_constraint, param `tools`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from app.api.constraints import RequestedConstraint
from app.api.errors import invalid_request
from app.api.schemas import ChatCompletionRequest, NamedToolChoice, ToolDefinition
from app.structured.tool_grammar import FIRST_FUNCTION_LINE, tool_call_spec
from app.tools import ToolCallFormat

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# llguidance names the grammar line ("at 4(7): ...") where a compile error is.
_GRAMMAR_LINE = re.compile(r"\bat (\d+)\(\d+\):")


@dataclass(frozen=True)
class ToolRequest:
    """The request's tools as the prompt and the grammar need them.

    choice: "none" (tools not offered: plain text), "auto", "required", or "named"
    (`named` is then the function). call_format: how the served model writes calls.
    """

    tools: tuple[dict[str, Any], ...]  # OpenAI tool definitions, as sent
    choice: str
    named: str | None
    parallel: bool
    call_format: ToolCallFormat

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    @property
    def prompt_tools(self) -> list[dict[str, Any]] | None:
        """The tools the prompt shows the model: none with `tool_choice: "none"`."""
        return list(self.tools) if self.parses_calls else None

    def constraint(self) -> RequestedConstraint | None:
        """The grammar that makes calls valid (None with "none")."""
        if not self.parses_calls:
            return None
        functions = [(t["function"]["name"], t["function"].get("parameters")) for t in self.tools]
        if self.named is not None:
            functions = [f for f in functions if f[0] == self.named]
        required = self.choice in ("required", "named")
        param = "tool_choice" if self.named is not None else "tools"
        # A named choice asks for that call: one, as OpenAI and vLLM give it; so does a
        # format whose templates take one call a turn.
        parallel = self.parallel and self.named is None and self.call_format.parallel_calls
        spec = tool_call_spec(functions, required, parallel, self.call_format)
        names = [name for name, _ in functions]
        return RequestedConstraint(spec, param, explain=lambda error: self._explain(error, names))

    def _explain(self, error: str, names: list[str]) -> str:
        """The grammar engine's error, said of the function whose schema it is about."""
        where = _GRAMMAR_LINE.search(error)
        index = int(where.group(1)) - FIRST_FUNCTION_LINE if where else -1
        if not 0 <= index < len(names):
            return f"`tools` cannot be enforced: {error}"
        position = [t["function"]["name"] for t in self.tools].index(names[index])
        detail = error[where.end() :].strip()
        return (
            f"`tools[{position}].function.parameters` ({names[index]!r}) cannot be "
            f"enforced: {detail}"
        )


def tool_request(body: ChatCompletionRequest, call_format: ToolCallFormat) -> ToolRequest:
    """The request's tools, checked (a 400 naming the field on the first broken rule),
    for a model that writes calls in `call_format`."""
    tools, choice, parallel = body.tools or [], body.tool_choice, body.parallel_tool_calls
    return checked_tools(tools, choice, parallel, call_format)


def checked_tools(
    definitions: list[ToolDefinition],
    tool_choice: str | NamedToolChoice | None,
    parallel_tool_calls: bool | None,
    call_format: ToolCallFormat,
) -> ToolRequest:
    """Tools in chat completions' shape, checked (the Responses API converts to it)."""
    tools = tuple(tool.model_dump(exclude_none=True) for tool in definitions)
    names = [tool["function"]["name"] for tool in tools]
    for index, name in enumerate(names):
        param = f"tools[{index}].function.name"
        if not FUNCTION_NAME.fullmatch(name):
            raise invalid_request(
                f"`{param}` is {name!r}: a name has 1 to 64 letters, digits, '_' or '-'", param
            )
        if name in names[:index]:
            raise invalid_request(f"`{param}`: the function {name!r} is declared twice", param)
    choice, named = _choice(tool_choice, tools, names)
    parallel = parallel_tool_calls is not False
    return ToolRequest(tools, choice, named, parallel, call_format)


def _choice(
    value: str | NamedToolChoice | None, tools: tuple[dict[str, Any], ...], names: list[str]
) -> tuple[str, str | None]:
    if value is None:
        return ("auto" if tools else "none"), None
    if isinstance(value, NamedToolChoice):
        name = value.function.name
        if name not in names:
            offered = ", ".join(names) or "none"
            raise invalid_request(
                f"`tool_choice` names the function {name!r}, which `tools` does not offer "
                f"(offered: {offered})",
                "tool_choice",
            )
        return "named", name
    if not tools:
        if value == "required":
            raise invalid_request('`tool_choice` "required" needs `tools`', "tool_choice")
        return "none", None  # "auto" with nothing to call is plain text
    return value, None
