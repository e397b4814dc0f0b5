"""The tool-call parser: what it reads, and the same answer under every split into chunks.

Streaming answers are the parser fed each delta's text; non-streaming ones are the same
parser fed the whole text (`parse_output`). The property test feeds generated texts
(built from the pieces that matter: tags, call heads, braces, whitespace, quotes) in
chunks cut at generated places and asserts the same content and calls as one piece.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from app.tools import HermesToolParser, ParsedOutput, parse_output
from app.tools.parser import ArgumentsText, CallOpened, ContentText


def call_block(name: str, arguments: dict, head: str = "<tool_call>\n") -> str:
    body = json.dumps({"name": name, "arguments": arguments})
    return f"{head}{body}\n</tool_call>"


def parse_in_chunks(text: str, cuts: list[int], new_parser=HermesToolParser) -> ParsedOutput:
    parser, parsed, start = new_parser(), ParsedOutput(), 0
    for cut in [*sorted(set(cuts)), len(text)]:
        parsed.add(parser.feed(text[start:cut]))
        start = cut
    parsed.add(parser.finish())
    return parsed


def summary(parsed: ParsedOutput) -> tuple:
    return parsed.content, [(call.name, call.arguments) for call in parsed.calls]


# --- what it reads --------------------------------------------------------------------


def test_plain_text_is_content_unchanged() -> None:
    for text in ["Hello!", "  spaced out \n", "a < b and </tool", "", "<tool_"]:
        parsed = parse_output(text)
        assert parsed.content == (text or None) and parsed.calls == []


def test_one_call_gives_name_and_arguments_and_no_content() -> None:
    parsed = parse_output(call_block("get_weather", {"city": "Paris", "days": [1, 2]}))
    assert summary(parsed) == (None, [("get_weather", '{"city": "Paris", "days": [1, 2]}')])
    assert json.loads(parsed.calls[0].arguments) == {"city": "Paris", "days": [1, 2]}


def test_text_then_parallel_calls() -> None:
    text = "Let me check. " + call_block("a", {}) + "\n" + call_block("b", {"x": {"y": 1}})
    assert summary(parse_output(text)) == ("Let me check.", [("a", "{}"), ("b", '{"x": {"y": 1}}')])


def test_text_between_and_after_calls_is_content_without_surrounding_space() -> None:
    text = call_block("a", {}) + "\n  and then \n" + call_block("b", {}) + "\n done"
    assert parse_output(text).content == "and thendone"


def test_a_body_in_another_key_order_is_read_whole() -> None:
    text = '<tool_call>{"arguments": {"q": "x"}, "name": "search"}</tool_call>'
    assert summary(parse_output(text)) == (None, [("search", '{"q": "x"}')])


def test_llama_style_parameters_are_read_as_arguments() -> None:
    text = '<tool_call>{"name": "f", "parameters": {"n": 1}}</tool_call>'
    assert summary(parse_output(text)) == (None, [("f", '{"n": 1}')])


def test_a_block_that_is_not_a_call_stays_content() -> None:
    text = "see <tool_call>not json</tool_call> here"
    assert summary(parse_output(text)) == (text, [])


def test_text_cut_inside_a_call_keeps_the_partial_arguments() -> None:
    text = '<tool_call>\n{"name": "f", "arguments": {"city": "Par'
    assert summary(parse_output(text)) == (None, [("f", '{"city": "Par')])


def test_text_cut_after_the_arguments_leaves_out_the_body_brace() -> None:
    for tail in ["}", "}\n", "}\n</tool_"]:
        text = '<tool_call>\n{"name": "f", "arguments": {"a": {"b": 1}}' + tail
        assert summary(parse_output(text)) == (None, [("f", '{"a": {"b": 1}}')])


def test_text_cut_before_the_arguments_drops_the_call() -> None:
    text = call_block("a", {}) + '\n<tool_call>\n{"name": "b",'
    assert summary(parse_output(text)) == (None, [("a", "{}")])
    for cut in ("\n<", "\n<tool_", " <tool_call", "\n<tool_call>", "<tool_call>\n "):
        assert summary(parse_output(call_block("a", {}) + cut)) == (None, [("a", "{}")])
    assert parse_output("x <").content == "x <"  # before any call: text
    assert parse_output(call_block("a", {}) + " Note: x <").content == "Note: x <"


def test_streaming_sends_the_name_first_then_argument_fragments() -> None:
    parser = HermesToolParser()
    assert parser.feed("Sure. <tool_") == [ContentText("Sure.")]
    assert parser.feed('call>\n{"name": "f", "arguments": {"a"') == [
        CallOpened(0, "f"),
        ArgumentsText(0, '{"a"'),
    ]
    assert parser.feed(": 1}") == [ArgumentsText(0, ": 1")]  # the `}` may close the body
    assert parser.feed("}\n</tool_call>") == [ArgumentsText(0, "}")]
    assert parser.finish() == []


# --- every split gives the one-shot answer ----------------------------------------------

PIECES = [
    "<tool_call>",
    "</tool_call>",
    "<tool_call>\n",
    "\n</tool_call>",
    '{"name": "get_weather", "arguments": ',
    '{"name":"f","arguments":',
    '{"arguments": {}, "name": "g"}',
    '{"name": "h", "parameters": {"k": [1]}}',
    '{"city": "Paris"}',
    '{"a": {"b": "}"}}',
    "}",
    "{",
    '"',
    "\\",
    " ",
    "\n",
    "  \n",
    "<",
    "</",
    "<tool",
    "</tool_c",
    "text",
    "é",
]


def texts_of(pieces: list[str]) -> st.SearchStrategy[str]:
    """Texts built from `pieces` and short random strings."""
    return st.lists(st.one_of(st.sampled_from(pieces), st.text(max_size=4)), max_size=14).map(
        "".join
    )


def assert_any_split_agrees(data: st.DataObject, text: str, new_parser=HermesToolParser) -> None:
    """`text` fed in chunks cut at drawn places parses as it does in one piece."""
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    whole = summary(parse_output(text, new_parser()))
    assert summary(parse_in_chunks(text, cuts, new_parser)) == whole


def assert_single_and_double_splits_agree(text: str, new_parser, step: int) -> tuple:
    """Every cut, and every pair of cuts (the second every `step` characters), parses
    as the whole text does; returns that parse's summary."""
    expected = summary(parse_output(text, new_parser()))
    for first in range(len(text) + 1):
        for second in range(first, len(text) + 1, step):
            assert summary(parse_in_chunks(text, [first, second], new_parser)) == expected
    return expected


@settings(max_examples=600, deadline=None)
@given(data=st.data(), text=texts_of(PIECES))
def test_every_split_gives_the_same_content_and_calls(data: st.DataObject, text: str) -> None:
    assert_any_split_agrees(data, text)


def test_every_single_and_double_split_of_a_realistic_answer() -> None:
    text = (
        "I'll look both up.\n"
        + call_block("get_weather", {"city": "Paris", "note": "a } and </tool"})
        + "\n"
        + call_block("get_time", {"tz": "CET"})
        + "\n"
    )
    expected = assert_single_and_double_splits_agree(text, HermesToolParser, 7)
    assert expected[0] == "I'll look both up." and len(expected[1]) == 2
