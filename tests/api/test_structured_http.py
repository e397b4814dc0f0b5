"""Structured outputs over HTTP: OpenAI `response_format` through the official client.

The real server (`api_server`, the default 135M model) proves the grammar does the work:
every output validates with `jsonschema`, chat and completions, streaming and not. The
fake engine with the real compiler proves refusals: a schema the grammar engine cannot
compile is a 400 naming what is unsupported, and nothing reaches the engine.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from tests.api.conftest import FakeApp, LiveServer
from tests.engine.structured_schemas import SCHEMAS

pytestmark = pytest.mark.anyio
MODEL = "tgi"  # a placeholder name: the served model, whatever it is
MAX_TOKENS = 80  # every schema below ends well within it (bounded strings and numbers)
SCHEMA_NAMES = ["person", "address_nested", "tags_min2_max4", "color_enum"]
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


class Pet(BaseModel):
    name: str = Field(max_length=12)
    species: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)


def json_schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def client(request: pytest.FixtureRequest) -> OpenAI:
    server: LiveServer = request.getfixturevalue("api_server")
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.system
@pytest.mark.slow
class TestRealServer:
    def test_chat_parse_returns_the_pydantic_object(self, client: OpenAI) -> None:
        completion = client.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": "Invent a pet."}],
            response_format=Pet,
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Pet)
        assert Pet.model_validate_json(choice.message.content) == choice.message.parsed

    @pytest.mark.parametrize("name", SCHEMA_NAMES)
    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
    def test_chat_json_schema_strict_validates(
        self, client: OpenAI, name: str, stream: bool
    ) -> None:
        schema = SCHEMAS[name]
        request = {
            "model": MODEL,
            "messages": ASK,
            "response_format": json_schema_format(name, schema),
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        if stream:
            chunks = list(client.chat.completions.create(**request, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            choice = client.chat.completions.create(**request).choices[0]
            text, finish = choice.message.content, choice.finish_reason
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)

    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
    def test_completion_json_schema_sampled_validates(self, client: OpenAI, stream: bool) -> None:
        schema = SCHEMAS["person"]
        request = {
            "model": MODEL,
            "prompt": "A person, as JSON:",
            "max_tokens": MAX_TOKENS,
            "temperature": 0.8,
            "seed": 3,
            "extra_body": {"response_format": json_schema_format("person", schema)},
        }
        if stream:
            chunks = list(client.completions.create(**request, stream=True))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            choice = client.completions.create(**request).choices[0]
            text, finish = choice.text, choice.finish_reason
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)

    def test_max_tokens_inside_the_object_is_length_and_incomplete(self, client: OpenAI) -> None:
        choice = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format=json_schema_format("person", SCHEMAS["person"]),
            max_tokens=3,
            temperature=0,
        ).choices[0]
        assert choice.finish_reason == "length"
        with pytest.raises(json.JSONDecodeError):
            json.loads(choice.message.content)

    def test_an_unsupported_schema_is_a_400_naming_it(self, client: OpenAI) -> None:
        import openai

        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=MODEL,
                messages=ASK,
                response_format=json_schema_format("u", {"type": "array", "uniqueItems": True}),
                max_tokens=4,
                stream=True,
            )
        error = caught.value.body
        assert error["param"] == "response_format" and error["type"] == "invalid_request_error"
        assert "uniqueItems" in error["message"]


# --- the fake engine with the real compiler: what reaches the engine -------------------


def chat_body(response_format: object, **extra: object) -> dict:
    return {"messages": ASK, "max_tokens": 2, "response_format": response_format, **extra}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
    ],
)
async def test_an_uncompilable_schema_is_a_400_before_the_engine(
    compiling_app: FakeApp, schema: dict, named: str, stream: bool
) -> None:
    body = chat_body(json_schema_format("bad", schema), stream=stream)
    response = await compiling_app.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "response_format"
    assert named in error["message"]
    assert compiling_app.engine.requests == []  # nothing reached the engine


@pytest.mark.parametrize(
    ("bound", "what"),
    [("1e400", "is beyond a 64-bit float (it reads as inf)"), (str(2**70), f"is {2**70}")],
)
async def test_an_out_of_range_number_in_a_schema_is_a_400_naming_it(
    compiling_app: FakeApp, bound: str, what: str
) -> None:
    """Sent as text: Python's json reads 1e400 as infinity, and writes it back otherwise."""
    schema = '{"type": "object", "properties": {"age": {"type": "integer", "maximum": %s}}}'
    response_format = '{"type": "json_schema", "json_schema": {"name": "p", "schema": %s}}'
    body = '{"messages": [{"role": "user", "content": "Hi"}], "response_format": %s}' % (
        response_format % (schema % bound)
    )
    response = await compiling_app.client.post(
        "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "response_format")
    assert error["message"] == (
        "`response_format` cannot be enforced: invalid json_schema constraint: "
        f"`properties.age.maximum` in the schema {what}; a schema's numbers must be finite "
        f"64-bit floats or integers from {-(2**63)} to {2**64 - 1}"
    )
    assert compiling_app.engine.requests == []


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}},
        {"type": "xml"},
        "json",
    ],
)
async def test_a_malformed_response_format_is_a_400(
    compiling_app: FakeApp, response_format: object
) -> None:
    response = await compiling_app.client.post(
        "/v1/chat/completions", json=chat_body(response_format)
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "response_format"
    assert compiling_app.engine.requests == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    ("response_format", "kind"),
    [
        ({"type": "json_object"}, "json_object"),
        (json_schema_format("person", SCHEMAS["person"]), "json_schema"),
        ({"type": "text"}, None),
    ],
)
async def test_the_compiled_constraint_rides_in_every_prompts_params(
    compiling_app: FakeApp, path: str, response_format: dict, kind: str | None
) -> None:
    prompt = {"messages": ASK} if "chat" in path else {"prompt": ["a", "b"]}
    body = {**prompt, "max_tokens": 2, "n": 2, "response_format": response_format}
    response = await compiling_app.client.post(path, json=body)
    assert response.status_code == 200, response.text
    params = [request.params for request in compiling_app.engine.requests]
    assert len(params) == (1 if "chat" in path else 2)
    kinds = {p.constraint.kind if p.constraint is not None else None for p in params}
    assert kinds == {kind}


VLLM_FIELDS = [
    ({"guided_json": SCHEMAS["person"]}, "json_schema"),
    ({"guided_regex": "[a-z]{1,8}"}, "regex"),
    ({"guided_choice": ["yes", "no"]}, "choice"),
    ({"guided_grammar": 'start: "a" | "b"'}, "grammar"),
    ({"structured_outputs": {"json": SCHEMAS["person"]}}, "json_schema"),
    ({"structured_outputs": {"regex": "[0-9]+"}}, "regex"),
    ({"structured_outputs": {"choice": ["red", "blue"]}}, "choice"),
    ({"structured_outputs": {"grammar": 'root ::= "x" | "y"'}}, "grammar"),
]


@pytest.mark.parametrize(("fields", "kind"), VLLM_FIELDS)
async def test_vllm_constraint_fields_compile_into_the_params(
    compiling_app: FakeApp, fields: dict, kind: str
) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, **fields}
    response = await compiling_app.client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    (request,) = compiling_app.engine.requests
    assert request.params.constraint is not None and request.params.constraint.kind == kind


@pytest.mark.parametrize(
    ("fields", "param", "named"),
    [
        ({"guided_regex": "(?<=a)b"}, "guided_regex", "look-around"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"guided_grammar": "start: nowhere"}, "guided_grammar", "nowhere"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "one of"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs", "structural_tag"),
        (
            {"guided_regex": "a", "response_format": {"type": "json_object"}},
            "guided_regex",
            "at most one",
        ),
    ],
)
async def test_a_bad_vllm_constraint_is_a_400_before_the_engine(
    compiling_app: FakeApp, fields: dict, param: str, named: str
) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, **fields}
    response = await compiling_app.client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and named in error["message"], error
    assert compiling_app.engine.requests == []


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_vllm_regex_and_choice_on_the_real_server(client: OpenAI, stream: bool) -> None:
    import re

    def chat(extra: dict) -> tuple[str, str]:
        request = {"model": MODEL, "messages": ASK, "max_tokens": 12, "extra_body": extra}
        if not stream:
            choice = client.chat.completions.create(**request).choices[0]
            return choice.message.content, choice.finish_reason
        chunks = [c for c in client.chat.completions.create(**request, stream=True) if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        return text, chunks[-1].choices[0].finish_reason

    text, finish = chat({"guided_choice": ["alpha", "beta", "gamma"], "seed": 1})
    assert finish == "stop" and text in ("alpha", "beta", "gamma")
    text, finish = chat({"structured_outputs": {"regex": "[A-Z][a-z]{2,5}"}, "seed": 1})
    assert finish == "stop" and re.fullmatch("[A-Z][a-z]{2,5}", text), text
