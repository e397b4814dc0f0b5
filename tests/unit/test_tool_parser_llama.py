"""The Llama 3 JSON tool-call parser: what it reads, and the same answer under every split.

Calls are bare `{"name": ..., "parameters": ...}` objects at the start of the answer,
separated by `;`; any other answer is text. Like the Hermes parser's tests
(test_tool_parser.py), a property test feeds generated texts in chunks cut at generated
places and asserts the one-piece result.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from app.tools import Llama3JsonToolParser, parse_output
from app.tools.llama_parser import JsonValueEnd
from app.tools.parser import ArgumentsText, CallOpened
from tests.unit.test_tool_parser import (
    assert_any_split_agrees,
    assert_single_and_double_splits_agree,
    summary,
    texts_of,
)


def parse(text: str):
    return summary(parse_output(text, Llama3JsonToolParser()))


def llama_call(name: str, parameters: dict) -> str:
    return json.dumps({"name": name, "parameters": parameters})


def test_text_is_content_as_written() -> None:
    for text in ["Hello!", "  spaced out \n", "It costs {5}", "a; {b}", "", " ", "<|python"]:
        assert parse(text) == (text or None, [])


def test_one_call_gives_name_and_arguments() -> None:
    text = llama_call("get_weather", {"city": "Paris", "days": [1, 2]})
    assert parse(text) == (None, [("get_weather", '{"city": "Paris", "days": [1, 2]}')])


def test_calls_separated_by_semicolons_or_blanks_with_leading_space_and_tag() -> None:
    a, b, c = llama_call("a", {}), llama_call("b", {"x": {"y": "};"}}), llama_call("c", {})
    text = f"\n <|python_tag|>{a}; {b};{c}\n"
    assert parse(text) == (None, [("a", "{}"), ("b", '{"x": {"y": "};"}}'), ("c", "{}")])
    assert parse(f"{a}\n{b}") == (None, [("a", "{}"), ("b", '{"x": {"y": "};"}}')])


def test_the_arguments_key_and_another_key_order() -> None:
    assert parse('{"name": "f", "arguments": {"n": 1}}') == (None, [("f", '{"n": 1}')])
    assert parse('{"parameters": {"n": 1}, "name": "f"}') == (None, [("f", '{"n": 1}')])


def test_a_json_answer_that_is_not_a_call_is_content() -> None:
    for text in ['{"answer": 42}', '{"name": "f"}', "{not json", '{"name": 3, "parameters": {}}']:
        assert parse(text) == (text, [])


def test_text_after_calls_is_content() -> None:
    assert parse(llama_call("f", {}) + "; and done") == ("and done", [("f", "{}")])


def test_text_cut_inside_the_arguments_keeps_them_partial() -> None:
    assert parse('{"name": "f", "parameters": {"city": "Par') == (None, [("f", '{"city": "Par')])
    assert parse('{"name": "f", "parameters": {"a": 1}') == (None, [("f", '{"a": 1}')])


def test_streaming_sends_the_name_first_then_argument_fragments() -> None:
    parser = Llama3JsonToolParser()
    assert parser.feed(' {"name": "f", "param') == []
    assert parser.feed('eters": {"a"') == [CallOpened(0, "f"), ArgumentsText(0, '{"a"')]
    assert parser.feed(': "}"}') == [ArgumentsText(0, ': "}"}')]  # a `}` in a string is text
    assert parser.feed("}") == []
    assert parser.finish() == []


def test_a_json_value_ends_where_it_closes() -> None:
    for value, rest in [
        ('{"a": [1, {"b": "]}"}]}', "}"),
        ('"x\\"}"', "}"),
        ("12", "}"),
        ("[]", ""),
    ]:
        assert JsonValueEnd().feed(value + rest) == len(value), value
    scanner = JsonValueEnd()
    assert scanner.feed('{"a": "\\') is None and scanner.feed('"}"}') == 4


# --- every split gives the one-shot answer ----------------------------------------------

PIECES = [
    '{"name": "get_weather", "parameters": ',
    '{"name":"f","arguments":',
    '{"parameters": {}, "name": "g"}',
    '{"city": "Paris"}',
    '{"a": {"b": "}"}}',
    "<|python_tag|>",
    "<|python",
    ";",
    "; ",
    "}",
    "{",
    '"',
    "\\",
    " ",
    "\n",
    "text",
    "é",
]


@settings(max_examples=600, deadline=None)
@given(data=st.data(), text=texts_of(PIECES))
def test_every_split_gives_the_same_content_and_calls(data: st.DataObject, text: str) -> None:
    assert_any_split_agrees(data, text, Llama3JsonToolParser)


def test_every_single_and_double_split_of_a_realistic_answer() -> None:
    weather = llama_call("get_weather", {"city": "Paris", "note": 'a } and ; and \\"'})
    text = " " + weather + "; " + llama_call("get_time", {"tz": "CET"}) + "\n"
    expected = assert_single_and_double_splits_agree(text, Llama3JsonToolParser, 5)
    assert expected[0] is None and len(expected[1]) == 2
