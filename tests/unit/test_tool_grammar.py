"""The tool-call grammar (app/structured/tool_grammar.py) on the default tokenizer.

What it accepts is what the parser reads as valid calls to offered functions; what it
refuses is any other name, arguments off their schema, or (with `required`) text. In
`auto` mode free text passes until `<tool_call>` is written, and from there on the call
is enforced: the lazy trigger proven token by token.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from app.structured import ConstraintCompiler, ConstraintError, grammar_tokenizer
from app.structured.tool_grammar import closed_objects, tool_call_spec
from app.tools import LLAMA3_JSON, Llama3JsonToolParser, parse_output
from tests.tool_schemas import WEATHER

EOS = 2
VOCAB = 49152
# A schema as pydantic writes it for a nested model: a reference into $defs.
NESTED = {
    "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}}}},
    "type": "object",
    "properties": {"at": {"$ref": "#/$defs/Point"}},
    "required": ["at"],
}
FUNCTIONS = [("get_weather", WEATHER), ("get_time", None), ("locate", NESTED)]


def call(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


WEATHER_CALL = call("get_weather", {"city": "Paris", "unit": "celsius"})


@pytest.fixture(scope="module")
def compiler(default_model_path):
    compiler = ConstraintCompiler(grammar_tokenizer(default_model_path, VOCAB, EOS))
    yield compiler
    compiler.close()


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from app.tokenizer import Tokenizer

    return Tokenizer(default_model_path)


def accepts(compiler, tokenizer, spec, text: str) -> bool:
    """The grammar takes every token of `text` and may end there."""
    matcher = compiler.compile_sync(spec).new_matcher()
    for token in tokenizer.encode(text, add_special_tokens=False):
        if not matcher.advance(token):
            return False
    return matcher.is_accepting


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("required", [True, False])
def test_valid_calls_are_accepted_and_read_back(compiler, tokenizer, required, parallel):
    spec = tool_call_spec(FUNCTIONS, required, parallel)
    texts = [
        WEATHER_CALL,
        call("get_time", {}),
        call("locate", {"at": {"x": 3}}),
    ]
    for text in texts:
        assert accepts(compiler, tokenizer, spec, text), text
        assert len(parse_output(text).calls) == 1
    two = WEATHER_CALL + "\n" + call("get_time", {})
    assert accepts(compiler, tokenizer, spec, two) == parallel


@pytest.mark.parametrize("required", [True, False])
def test_other_names_and_off_schema_arguments_are_refused(compiler, tokenizer, required):
    spec = tool_call_spec(FUNCTIONS, required, parallel=True)
    for text in [
        call("get_wether", {"city": "Paris", "unit": "celsius"}),  # not offered
        call("get_weather", {"city": "Paris", "unit": "kelvin"}),  # off its enum
        call("get_weather", {"city": "Paris"}),  # a required property missing
        call("get_weather", {"city": "Paris", "unit": "celsius", "extra": 1}),  # closed
        call("get_time", {"tz": "UTC"}),  # declared without parameters
        call("locate", {"at": {"x": "three"}}),  # through the $ref
        WEATHER_CALL.replace('": "', '":"'),  # the compact JSON layout
    ]:
        assert not accepts(compiler, tokenizer, spec, text), text
        assert not accepts(compiler, tokenizer, spec, "Sure! " + text), text


def test_required_refuses_text_and_auto_takes_it(compiler, tokenizer):
    for text in ["Hello there.", "Let me check. " + WEATHER_CALL, ""]:
        assert not accepts(compiler, tokenizer, tool_call_spec(FUNCTIONS, True, True), text)
        assert accepts(compiler, tokenizer, tool_call_spec(FUNCTIONS, False, True), text)


def test_auto_enforces_the_call_from_the_opening_tag_on(compiler, tokenizer):
    matcher = compiler.compile_sync(tool_call_spec(FUNCTIONS, False, True)).new_matcher()
    for token in tokenizer.encode("I will look. <tool_call>\n", add_special_tokens=False):
        assert matcher.advance(token)
    allowed = {tokenizer.token_text(t) for t in matcher.allowed_token_ids()}
    assert allowed and all('{"name": "'.startswith(text) for text in allowed), allowed


def test_without_parallel_calls_the_output_ends_with_its_call(compiler, tokenizer):
    for required in (True, False):
        spec = tool_call_spec(FUNCTIONS, required, parallel=False)
        matcher = compiler.compile_sync(spec).new_matcher()
        for token in tokenizer.encode(WEATHER_CALL, add_special_tokens=False):
            assert matcher.advance(token)
        assert matcher.is_finished


def test_named_choice_offers_one_function(compiler, tokenizer):
    spec = tool_call_spec([("get_time", None)], required=True, parallel=False)
    assert accepts(compiler, tokenizer, spec, call("get_time", {}))
    assert not accepts(compiler, tokenizer, spec, WEATHER_CALL)


def test_an_uncompilable_parameters_schema_raises(compiler):
    bad = [("f", {"type": "array", "uniqueItems": True})]
    with pytest.raises(ConstraintError, match="uniqueItems"):
        compiler.compile_sync(tool_call_spec(bad, required=True, parallel=False))


def test_closed_objects_close_only_what_says_nothing():
    schema = {
        "type": "object",
        "properties": {
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
            "inner": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "properties": {"type": "string"},  # a property named like the keyword
        },
        "anyOf": [{"properties": {"b": {}}}],
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["properties"]["inner"]["additionalProperties"] is False
    assert closed["properties"]["properties"] == {"type": "string"}
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the request's schema is left alone
    jsonschema.Draft202012Validator.check_schema(closed)


# --- the Llama 3 JSON format ------------------------------------------------------------


def llama_call(name: str, arguments: dict) -> str:
    return json.dumps({"name": name, "parameters": arguments})


@pytest.mark.parametrize("required", [True, False])
def test_llama3_calls_are_enforced_and_read_back(compiler, tokenizer, required):
    spec = tool_call_spec(FUNCTIONS, required, parallel=True, call_format=LLAMA3_JSON)
    weather = llama_call("get_weather", {"city": "Paris", "unit": "celsius"})
    for text in [weather, llama_call("get_time", {}), weather + "; " + llama_call("get_time", {})]:
        assert accepts(compiler, tokenizer, spec, text), text
        parsed = parse_output(text, Llama3JsonToolParser())
        assert parsed.content is None and parsed.calls
    for text in [
        llama_call("get_wether", {"city": "Paris", "unit": "celsius"}),
        llama_call("get_weather", {"city": "Paris", "unit": "kelvin"}),
        '{"answer": 42}',
    ]:
        assert not accepts(compiler, tokenizer, spec, text), text
    # Text: refused with `required`; with `auto`, any text that does not open an object
    # (a Hermes call is text to this format).
    for text in ["Hello there.", "  It is {sunny}", WEATHER_CALL]:
        assert accepts(compiler, tokenizer, spec, text) != required, text
    single = tool_call_spec(FUNCTIONS, required, parallel=False, call_format=LLAMA3_JSON)
    assert not accepts(compiler, tokenizer, single, weather + "; " + llama_call("get_time", {}))


def test_llama3_auto_enforces_a_call_once_an_object_opens(compiler, tokenizer):
    spec = tool_call_spec(FUNCTIONS, False, parallel=True, call_format=LLAMA3_JSON)
    matcher = compiler.compile_sync(spec).new_matcher()
    assert matcher.advance(tokenizer.encode("{", add_special_tokens=False)[0])
    allowed = {tokenizer.token_text(t) for t in matcher.allowed_token_ids()}
    assert allowed and all('"name": "'.startswith(text) for text in allowed), allowed
