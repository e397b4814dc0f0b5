"""The Responses API's function tools and `text.format`, through the official client.

The fake engine with the real grammar compiler (`compiling_app`: it replies
`engine.reply` whatever the grammar) proves the shapes: `function_call` items, their
stream events, the second turn's prompt. The real server (the default 135M model)
proves the grammar does the work: forced calls name an offered function with arguments
valid for its schema, and a `json_schema` format gives JSON that validates.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.api.conftest import FakeApp, LiveServer
from tests.tool_schemas import WEATHER

TOOLS = [{"type": "function", "name": "get_weather", "description": "weather in a city",
          "parameters": WEATHER}]  # fmt: skip
ASK = "What is the weather in Paris?"
REPLY = (
    "Checking.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    "</tool_call>"
)
ARGUMENTS = '{"city": "Paris", "unit": "celsius"}'
CALL_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",  # the message with "Checking."
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.output_item.added",  # the call
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
    "response.completed",
]


def async_client(app: FakeApp) -> AsyncOpenAI:
    transport = httpx.ASGITransport(app=app.app)
    http = httpx.AsyncClient(transport=transport, base_url="http://test")
    return AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http)


@pytest.mark.anyio
async def test_calls_are_function_call_items(compiling_app: FakeApp) -> None:
    compiling_app.engine.reply = REPLY
    response = await async_client(compiling_app).responses.create(input=ASK, tools=TOOLS)
    message, call = response.output
    assert message.type == "message" and message.content[0].text == "Checking."
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.arguments == ARGUMENTS and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert response.tools[0].name == "get_weather" and response.tool_choice == "auto"


@pytest.mark.anyio
async def test_streamed_calls(compiling_app: FakeApp) -> None:
    compiling_app.engine.reply = REPLY
    client = async_client(compiling_app)
    events = [e async for e in await client.responses.create(input=ASK, tools=TOOLS, stream=True)]
    types = [e.type for e in events]
    assert [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]] == CALL_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert deltas == done.arguments == ARGUMENTS
    final = events[-1].response
    assert [item.type for item in final.output] == ["message", "function_call"]
    assert final.output[1].arguments == ARGUMENTS


@pytest.mark.anyio
async def test_a_second_turn_sends_the_result_back(compiling_app: FakeApp, http_tokenizer) -> None:
    compiling_app.engine.reply = REPLY
    client = async_client(compiling_app)
    first = await client.responses.create(input=ASK, tools=TOOLS)
    call = first.output[1]
    compiling_app.engine.reply = "It is 21 degrees in Paris."
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "21 C"}
    second = await client.responses.create(
        input=[result], previous_response_id=first.id, tools=TOOLS
    )
    assert second.output_text == "It is 21 degrees in Paris."
    prompt = http_tokenizer.decode(compiling_app.engine.requests[-1].prompt_token_ids, False)
    assert ASK in prompt and "21 C" in prompt and '"Paris"' in prompt
    # The same turn as explicit items (the first answer's own items), without the store.
    answer = [item.model_dump(exclude_none=True) for item in first.output]
    items = [{"role": "user", "content": ASK}, *answer, result]
    third = await client.responses.create(input=items, tools=TOOLS, store=False)
    again = http_tokenizer.decode(compiling_app.engine.requests[-1].prompt_token_ids, False)
    assert third.output_text == second.output_text and again == prompt


@pytest.mark.anyio
async def test_text_format_is_the_response_format_constraint(compiling_app: FakeApp) -> None:
    compiling_app.engine.reply = '{"city": "Paris"}'
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    text = {"format": {"type": "json_schema", "name": "place", "schema": schema}}
    response = await async_client(compiling_app).responses.create(input=ASK, text=text)
    constraint = compiling_app.engine.requests[-1].params.constraint
    assert constraint is not None and constraint.kind == "json_schema"
    assert response.text.format.type == "json_schema"


@pytest.mark.anyio
async def test_a_schema_the_grammar_cannot_enforce_names_the_flat_tool_field(
    compiling_app: FakeApp,
) -> None:
    broken = {"type": "function", "name": "g", "parameters": {"type": "object", "properties": []}}
    tools = [{"type": "function", "name": "f"}, broken]
    response = await compiling_app.client.post("/v1/responses", json={"input": ASK, "tools": tools})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith("`tools[1].parameters` ('g') cannot be enforced")


# --- the real server ---------------------------------------------------------------------


@pytest.mark.system
@pytest.mark.slow
def test_the_grammar_forces_valid_calls_then_a_second_turn(api_server: LiveServer) -> None:
    client = OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    forced = {"type": "function", "name": "get_weather"}
    first = client.responses.create(
        input=ASK, tools=TOOLS, tool_choice=forced, max_output_tokens=100, temperature=0
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "21 C, sunny"}
    second = client.responses.create(
        input=[result], previous_response_id=first.id, tools=TOOLS, tool_choice="none",
        max_output_tokens=30, temperature=0,
    )  # fmt: skip
    assert second.output[0].type == "message" and second.output_text


@pytest.mark.system
@pytest.mark.slow
def test_json_schema_format_validates(api_server: LiveServer) -> None:
    client = OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 20}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        input="What is the capital of France? Answer in JSON.",
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema}},
        max_output_tokens=40, temperature=0,
    )  # fmt: skip
    jsonschema.validate(json.loads(response.output_text), schema)
