"""OpenAI tools: what a request asks of calls, and the calls of its answer.

The request: `tools`, `tool_choice` and `parallel_tool_calls` are checked here, before
the engine sees anything: function names (OpenAI's rule), no name twice, a named choice
that names an offered function, `required` or a named choice only with tools
(`checked_tools`; the Responses API converts its flat tools to these). A parameters
schema the grammar engine cannot compile is a 400 too, when the dialect compiles the
constraint (constraints.compile_constraint, param `tools`).

The answer: the one parser (app/tools/parser.py) of the served model's call format
(app/tools/formats.py). Streaming: each choice has its own parser, fed every delta's
text; its events become a chunk's `delta.content` and `delta.tool_calls` (a call's
index, id, type and name in its first fragment, then argument text). Not streaming: the
same parser reads the whole text (`parse_output`) into `message.content` and
`message.tool_calls`.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from app.api.constraints import RequestedConstraint
from app.api.errors import invalid_request
from app.api.schemas import (
    ChatResponseMessage,
    DeltaFunction,
    DeltaToolCall,
    NamedToolChoice,
    ResponseFunction,
    ResponseToolCall,
    ToolDefinition,
)
from app.structured.spec import number_out_of_range
from app.structured.tool_grammar import FIRST_FUNCTION_LINE, tool_call_spec
from app.tools import ArgumentsText, CallOpened, ContentText, ToolCallFormat, parse_output

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
    function_path: str = "function."  # where a tool's own fields are (checked_tools)

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
        self._check_numbers()
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

    def _check_numbers(self) -> None:
        """A parameters schema with a number the grammar engine cannot take is a 400 here:
        inlined in the calls' grammar it would fail with no word of where."""
        for position, tool in enumerate(self.tools):
            problem = number_out_of_range(tool["function"].get("parameters") or {})
            if problem is not None:
                field = f"tools[{position}].{self.function_path}parameters"
                name = tool["function"]["name"]
                message = f"`{field}` ({name!r}) cannot be enforced: {problem}"
                raise invalid_request(message, param="tools")

    def joined_with(self, requested: RequestedConstraint | None) -> RequestedConstraint | None:
        """The request's one constraint: the calls' grammar, or `requested` (what the
        body asks the output to match, e.g. `response_format`); a 400 when both ask."""
        calls = self.constraint()
        if calls is None:
            return requested
        if requested is not None:
            raise invalid_request(
                f"`{requested.param}` and tool calls each constrain the output; send one (or "
                '`tool_choice: "none"`)',
                param=requested.param,
            )
        return calls

    def _explain(self, error: str, names: list[str]) -> str:
        """The grammar engine's error, said of the function whose schema it is about."""
        where = _GRAMMAR_LINE.search(error)
        index = int(where.group(1)) - FIRST_FUNCTION_LINE if where else -1
        if not 0 <= index < len(names):
            return f"`tools` cannot be enforced: {error}"
        position = [t["function"]["name"] for t in self.tools].index(names[index])
        detail = error[where.end() :].strip()
        return (
            f"`tools[{position}].{self.function_path}parameters` ({names[index]!r}) cannot be "
            f"enforced: {detail}"
        )


def checked_tools(
    definitions: list[ToolDefinition],
    tool_choice: str | NamedToolChoice | None,
    parallel_tool_calls: bool | None,
    call_format: ToolCallFormat,
    function_path: str = "function.",
) -> ToolRequest:
    """Tools in chat completions' shape, checked: a 400 naming the field on the first
    broken rule, for a model that writes calls in `call_format`. `function_path` is
    where errors say a tool's name and parameters are: chat nests them in `function`;
    the Responses API converts its flat tools to this shape and passes ""."""
    tools = tuple(tool.model_dump(exclude_none=True) for tool in definitions)
    names = [tool["function"]["name"] for tool in tools]
    for index, name in enumerate(names):
        param = f"tools[{index}].{function_path}name"
        if not FUNCTION_NAME.fullmatch(name):
            raise invalid_request(
                f"`{param}` is {name!r}: a name has 1 to 64 letters, digits, '_' or '-'", param
            )
        if name in names[:index]:
            raise invalid_request(f"`{param}`: the function {name!r} is declared twice", param)
    choice, named = _choice(tool_choice, tools, names)
    parallel = parallel_tool_calls is not False
    return ToolRequest(tools, choice, named, parallel, call_format, function_path)


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


# --- the answer's calls ---------------------------------------------------------------


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolCallStreams:
    """The parser of each choice of a streamed answer, and the ids of its calls."""

    def __init__(self, num_choices: int, call_format: ToolCallFormat) -> None:
        self._parsers = [call_format.new_parser() for _ in range(num_choices)]

    def num_calls(self, index: int) -> int:
        return self._parsers[index].num_calls

    def feed(self, index: int, text: str, finished: bool) -> tuple[str, list[DeltaToolCall]]:
        """Choice `index`'s next text -> (content text, tool-call fragments) to send now;
        `finished`: the text has ended, send what was held back."""
        parser = self._parsers[index]
        events = parser.feed(text)
        if finished:
            events += parser.finish()
        content: list[str] = []
        calls: list[DeltaToolCall] = []
        for event in events:
            if isinstance(event, ContentText):
                content.append(event.text)
            elif isinstance(event, CallOpened):
                function = DeltaFunction(name=event.name, arguments="")
                calls.append(
                    DeltaToolCall(
                        index=event.index, id=new_call_id(), type="function", function=function
                    )
                )
            elif isinstance(event, ArgumentsText):
                if calls and calls[-1].index == event.index:  # one fragment per call a chunk
                    calls[-1].function.arguments += event.text
                else:
                    calls.append(
                        DeltaToolCall(
                            index=event.index, function=DeltaFunction(arguments=event.text)
                        )
                    )
        return "".join(content), calls


def answer_message(text: str, call_format: ToolCallFormat) -> ChatResponseMessage:
    """A whole answer's message: its content (null when there are only calls) and calls."""
    parsed = parse_output(text, call_format.new_parser())
    if not parsed.calls:
        return ChatResponseMessage(content=parsed.content or "")
    calls = [
        ResponseToolCall(
            id=new_call_id(), function=ResponseFunction(name=call.name, arguments=call.arguments)
        )
        for call in parsed.calls
    ]
    return ChatResponseMessage(content=parsed.content, tool_calls=calls)
