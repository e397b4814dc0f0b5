"""LangChain's ChatOpenAI against lamina: an ecosystem client, not lamina's own.

`with_structured_output(PydanticModel)` (response_format json_schema, and the
function-calling method: a named tool choice) and `bind_tools(...)` (required, streamed
and not) on the real server with the default model; the grammar does the work.
"""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from tests.api.conftest import LiveServer

langchain_openai = pytest.importorskip("langchain_openai")

pytestmark = [pytest.mark.system, pytest.mark.slow]


class Pet(BaseModel):
    """A pet."""

    name: str = Field(max_length=12)
    species: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str = Field(max_length=20)


@pytest.fixture(scope="module")
def chat(request: pytest.FixtureRequest):
    server: LiveServer = request.getfixturevalue("api_server")
    return langchain_openai.ChatOpenAI(
        base_url=server.url + "/v1",
        api_key="unused",
        model=server.model,
        temperature=0,
        max_tokens=60,
        max_retries=0,
        timeout=120,
    )


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_the_pydantic_object(chat, method: str) -> None:
    pet = chat.with_structured_output(Pet, method=method).invoke("Invent a pet.")
    assert isinstance(pet, Pet)


def test_bind_tools_gives_valid_calls(chat) -> None:
    bound = chat.bind_tools([GetWeather], tool_choice="required", parallel_tool_calls=False)
    question = "What is the weather in Paris?"
    message = bound.invoke(question)
    assert [call["name"] for call in message.tool_calls] == ["GetWeather"]
    GetWeather.model_validate(message.tool_calls[0]["args"])
    streamed = None
    for chunk in bound.stream(question):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.tool_calls == [{**message.tool_calls[0], "id": streamed.tool_calls[0]["id"]}]
