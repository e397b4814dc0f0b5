"""Tool calling over HTTP: OpenAI `tools` through the official client.

The real server (the default 135M model) proves the grammar does the work: with
`required`, a named choice and `auto` (a few-shot conversation makes this model call),
streaming and not, every call names an offered function and its arguments validate
against its schema; a second turn sends the result back. The fake engine, replying a
fixed text, proves the answer's shape (content, tool_calls, ids, finish_reason, chunks)
and the refusals (a 400 naming the field; nothing reaches the engine).
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from app.tokenizer import Tokenizer
from tests.api.conftest import FakeApp, LiveServer
from tests.tool_schemas import WEATHER

pytestmark = pytest.mark.anyio
MODEL = "tgi"  # a placeholder name: the served model, whatever it is
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 20}},
    "required": ["timezone"],
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [
    {
        "type": "function",
        "function": {"name": name, "description": f"{name.replace('_', ' ')}", "parameters": s},
    }
    for name, s in SCHEMAS.items()
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def past_call(city: str, number: int) -> dict:
    arguments = json.dumps({"city": city, "unit": "celsius"})
    call = {"id": f"call_{number}", "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": arguments}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


# Two questions answered by calls: this model then calls for the third by itself.
FEW_SHOT = [
    {"role": "user", "content": "Weather in Rome?"},
    past_call("Rome", 1),
    {"role": "user", "content": "Weather in Oslo?"},
    past_call("Oslo", 2),
    {"role": "user", "content": "Weather in Paris?"},
]


def collect_stream(chunks: list) -> tuple[str | None, list[tuple[str, str, str]], str]:
    """(content, [(id, name, arguments)], finish_reason) of a streamed answer."""
    content: list[str] = []
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content.append(delta.content)
            for call in delta.tool_calls or ():
                if call.index not in calls:
                    assert call.id and call.function.name and call.type == "function"
                    calls[call.index] = [call.id, call.function.name, ""]
                else:
                    assert call.id is None and call.function.name is None
                calls[call.index][2] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return ("".join(content) or None), [tuple(calls[i]) for i in sorted(calls)], finish


def answer(client: OpenAI, stream: bool, **request) -> tuple:
    """(content, [(name, arguments)], finish_reason), streamed or not."""
    request = {"model": MODEL, "temperature": 0, "max_tokens": 60, **request}
    if stream:
        content, calls, finish = collect_stream(
            list(client.chat.completions.create(**request, stream=True))
        )
        return content, [(name, arguments) for _id, name, arguments in calls], finish
    choice = client.chat.completions.create(**request).choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]
    for call in choice.message.tool_calls or ():
        assert call.id.startswith("call_") and call.type == "function"
    return choice.message.content, calls, choice.finish_reason


def assert_valid_calls(calls: list[tuple[str, str]]) -> None:
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.fixture(scope="module")
def client(request: pytest.FixtureRequest) -> OpenAI:
    server: LiveServer = request.getfixturevalue("api_server")
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def both_ways(client: OpenAI, **request) -> tuple:
    """The answer not streamed, after checking the streamed one is the same (greedy)."""
    whole = answer(client, False, **request)
    assert answer(client, True, **request) == whole
    return whole


@pytest.mark.system
@pytest.mark.slow
class TestRealServer:
    def test_required_gives_one_valid_call(self, client: OpenAI) -> None:
        content, calls, finish = both_ways(
            client, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False
        )
        assert finish == "tool_calls" and content is None and len(calls) == 1
        assert_valid_calls(calls)

    def test_a_named_choice_calls_that_function(self, client: OpenAI) -> None:
        choice = {"type": "function", "function": {"name": "get_time"}}
        content, calls, finish = both_ways(client, messages=ASK, tools=TOOLS, tool_choice=choice)
        assert finish == "tool_calls" and content is None
        assert [name for name, _ in calls] == ["get_time"]  # one call, to that function
        assert_valid_calls(calls)

    def test_auto_lets_the_model_call(self, client: OpenAI) -> None:
        content, calls, finish = both_ways(client, messages=FEW_SHOT, tools=TOOLS)
        assert finish == "tool_calls", (content, calls)
        assert_valid_calls(calls)
        assert json.loads(calls[0][1])["city"] == "Paris"

    def test_parallel_calls_are_each_valid(self, client: OpenAI) -> None:
        _, calls, finish = answer(
            client, False, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120
        )
        complete = calls if finish == "tool_calls" else calls[:-1]  # the last may be cut
        assert complete, calls
        assert_valid_calls(complete)

    def test_a_second_turn_sends_the_result_back(self, client: OpenAI) -> None:
        first = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
            parallel_tool_calls=False, max_tokens=60, temperature=0,
        ).choices[0].message  # fmt: skip
        call = first.tool_calls[0]
        conversation = [
            *ASK,
            first.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "21 degrees, sunny"},
        ]
        content, calls, finish = both_ways(
            client, messages=conversation, tools=TOOLS, tool_choice="none", max_tokens=30
        )
        assert calls == [] and finish in ("stop", "length") and content

    def test_the_clients_pydantic_tools_parse(self, client: OpenAI) -> None:
        class GetWeather(BaseModel):
            city: str = Field(max_length=20)
            days: int = Field(ge=1, le=7)

        completion = client.chat.completions.parse(
            model=MODEL, messages=ASK, tools=[openai.pydantic_function_tool(GetWeather)],
            tool_choice="required", parallel_tool_calls=False, max_tokens=60, temperature=0,
        )  # fmt: skip
        call = completion.choices[0].message.tool_calls[0]
        assert call.function.name == "GetWeather"
        assert isinstance(call.function.parsed_arguments, GetWeather)


# --- the fake engine with the real compiler: shapes and refusals ------------------------
# (`compiling_app`, tests/api/conftest.py: the fake engine replies `engine.reply`,
# whatever the grammar)


REPLY = (
    "Checking both.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "CET"}}\n'
    "</tool_call>"
)
EXPECTED_CALLS = [
    ("get_weather", '{"city": "Paris", "unit": "celsius"}'),
    ("get_time", '{"timezone": "CET"}'),
]


async def post_chat(app: FakeApp, **body: object):
    return await app.client.post(
        "/v1/chat/completions", json={"messages": ASK, "max_tokens": 200, **body}
    )


async def test_a_whole_answer_has_content_calls_and_finish_reason(compiling_app: FakeApp) -> None:
    compiling_app.engine.reply = REPLY
    response = await post_chat(compiling_app, tools=TOOLS)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Checking both."
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    assert calls == EXPECTED_CALLS
    ids = [call["id"] for call in message["tool_calls"]]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)
    assert {call["type"] for call in message["tool_calls"]} == {"function"}


async def test_a_streamed_answer_sends_openai_shaped_tool_call_chunks(
    compiling_app: FakeApp,
) -> None:
    compiling_app.engine.reply = REPLY
    response = await post_chat(compiling_app, tools=TOOLS, stream=True)
    assert response.status_code == 200
    events = [
        json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")
    ]
    deltas = [event["choices"][0]["delta"] for event in events if event["choices"]]
    content = "".join(delta.get("content") or "" for delta in deltas)
    assert content == "Checking both."  # no tag text leaks into content
    fragments = [call for delta in deltas for call in delta.get("tool_calls", ())]
    firsts = [f for f in fragments if "id" in f]
    assert [(f["index"], f["type"], f["function"]["name"]) for f in firsts] == [
        (0, "function", "get_weather"),
        (1, "function", "get_time"),
    ]
    assert all(set(f) == {"index", "function"} for f in fragments if "id" not in f)
    arguments = [
        "".join(f["function"]["arguments"] for f in fragments if f["index"] == i) for i in (0, 1)
    ]
    assert list(zip(["get_weather", "get_time"], arguments)) == EXPECTED_CALLS
    assert len(fragments) > 4  # the arguments come in pieces, as the tokens do
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "tool_calls"


async def test_tool_choice_none_is_plain_text_without_tools_in_the_prompt(
    compiling_app: FakeApp, http_tokenizer: Tokenizer
) -> None:
    compiling_app.engine.reply = REPLY
    response = await post_chat(compiling_app, tools=TOOLS, tool_choice="none")
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == REPLY and "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "stop"
    request = compiling_app.engine.requests[-1]
    assert request.params.constraint is None
    assert "<tools>" not in http_tokenizer.decode(request.prompt_token_ids)


async def test_a_conversation_with_calls_and_results_reaches_the_model(
    compiling_app: FakeApp, http_tokenizer: Tokenizer
) -> None:
    conversation = [
        *ASK,
        past_call("Paris", 7),
        {"role": "tool", "tool_call_id": "call_7", "content": "21 degrees"},
    ]
    response = await post_chat(compiling_app, messages=conversation, tools=TOOLS)
    assert response.status_code == 200, response.text
    prompt = http_tokenizer.decode(compiling_app.engine.requests[-1].prompt_token_ids, False)
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in prompt
    assert "<tool_response>\n21 degrees\n</tool_response>" in prompt
    assert json.dumps(TOOLS[0]) in prompt


def _tool(name: str, parameters: object = None) -> dict:
    function: dict = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


REFUSED = [
    ({"tools": [_tool("f", {"type": "array", "uniqueItems": True})]}, "tools", "uniqueItems"),
    (
        {"tools": [_tool("f"), _tool("g", {"type": "object", "properties": []})]},
        "tools",
        "`tools[1].function.parameters` ('g') cannot be enforced",
    ),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
        "'nope'",
    ),
    ({"tools": [_tool("get weather")]}, "tools[0].function.name", "letters"),
    ({"tools": [_tool("f"), _tool("f")]}, "tools[1].function.name", "twice"),
    ({"tool_choice": "required"}, "tool_choice", "needs `tools`"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "function"),
    (
        {"tools": TOOLS, "response_format": {"type": "json_object"}},
        "response_format",
        "tool calls",
    ),
    (
        {"messages": [*ASK, {"role": "tool", "content": "21"}]},
        "messages[1].tool_call_id",
        "required",
    ),
    (
        {"messages": [{**ASK[0], "tool_calls": past_call("Rome", 1)["tool_calls"]}]},
        "messages[0].tool_calls",
        "assistant",
    ),
    (
        {"messages": [*ASK, {**past_call("Rome", 1), "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
        ]}]},
        "messages[1].tool_calls[0].function.arguments",
        "JSON object",
    ),
    ({"functions": [{"name": "f"}]}, "functions", "send `tools`"),
    (
        {"tools": [_tool("f", {"type": "object", "properties": {"n": {"maximum": 2**70}}})]},
        "tools",
        f"`tools[0].function.parameters` ('f') cannot be enforced: `properties.n.maximum` in the "
        f"schema is {2**70}; a schema's numbers must be finite",
    ),
]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("body", "param", "named"), REFUSED)
async def test_invalid_tool_requests_are_a_400_before_the_engine(
    compiling_app: FakeApp, body: dict, param: str, named: str, stream: bool
) -> None:
    response = await post_chat(compiling_app, **body, stream=stream)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert named in error["message"]
    assert compiling_app.engine.requests == []
