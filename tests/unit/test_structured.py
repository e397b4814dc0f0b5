"""app/structured: compiling constraints (errors, cache, off the event loop) and the
per-sequence matcher (EOS only where the grammar accepts, rollback)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.structured import (
    ConstraintCompiler,
    ConstraintError,
    ConstraintSpec,
    MaskFiller,
    bitmask_words,
    grammar_tokenizer,
)
from app.structured.compiler import lowest_allowed

EOS = 2
VOCAB = 49152
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def grammar_tok(default_model_path):
    return grammar_tokenizer(default_model_path, VOCAB, EOS)


@pytest.fixture
def compiler(grammar_tok) -> ConstraintCompiler:
    compiler = ConstraintCompiler(grammar_tok)
    yield compiler
    compiler.close()


@pytest.fixture(scope="module")
def hf_tokenizer(default_model_path):
    from app.tokenizer import Tokenizer

    return Tokenizer(default_model_path)


def walk(compiler, hf_tokenizer, spec: ConstraintSpec, text: str):
    matcher = compiler.compile_sync(spec).new_matcher()
    for token in hf_tokenizer.encode(text, add_special_tokens=False):
        assert matcher.advance(token), (text, matcher.error)
    return matcher


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        (ConstraintSpec("json_schema", PERSON), '{"name": "Ada", "age": 36}'),
        (ConstraintSpec("json_schema", '{"type": "integer"}'), "42"),
        (ConstraintSpec("json_object"), '{"a": [1, 2]}'),
        (ConstraintSpec("regex", r"[0-9]{3}-[a-z]+"), "123-abc"),
        (ConstraintSpec("choice", ("red", 'say "hi"\\')), 'say "hi"\\'),
        (ConstraintSpec("grammar", 'start: "x" NUM\nNUM: /[0-9]+/'), "x42"),
        (ConstraintSpec("grammar", 'root ::= "x" [0-9]+'), "x42"),
    ],
)
def test_each_kind_accepts_a_valid_output_and_then_allows_eos(compiler, hf_tokenizer, spec, text):
    matcher = walk(compiler, hf_tokenizer, spec, text)
    assert matcher.is_accepting
    assert EOS in matcher.allowed_token_ids()


def test_eos_is_allowed_only_where_the_grammar_accepts(compiler, hf_tokenizer):
    spec = ConstraintSpec("json_schema", PERSON)
    matcher = compiler.compile_sync(spec).new_matcher()
    tokens = hf_tokenizer.encode('{"name": "Ada", "age": 36}', add_special_tokens=False)
    for token in tokens:
        assert EOS not in matcher.allowed_token_ids()
        assert not matcher.is_accepting
        assert token in matcher.allowed_token_ids()
        assert matcher.advance(token)
    assert matcher.is_accepting and matcher.allowed_token_ids() == [EOS]
    assert matcher.advance(EOS) and matcher.is_finished


def test_a_complete_choice_is_finished_without_eos(compiler, hf_tokenizer):
    matcher = walk(compiler, hf_tokenizer, ConstraintSpec("choice", ("yes", "no")), "yes")
    assert matcher.is_finished


def test_a_forbidden_token_is_refused_with_the_reason(compiler, hf_tokenizer):
    matcher = compiler.compile_sync(ConstraintSpec("regex", "[0-9]+")).new_matcher()
    (letter,) = hf_tokenizer.encode("a", add_special_tokens=False)
    assert not matcher.advance(letter)
    assert matcher.error


def test_rollback_returns_to_an_earlier_state(compiler, hf_tokenizer):
    spec = ConstraintSpec("json_schema", PERSON)
    matcher = compiler.compile_sync(spec).new_matcher()
    tokens = hf_tokenizer.encode('{"name": "Ada", "age": 36}', add_special_tokens=False)
    for token in tokens[:3]:
        matcher.advance(token)
    before = matcher.allowed_token_ids()
    for token in tokens[3:6]:
        matcher.advance(token)
    matcher.rollback(3)
    assert matcher.allowed_token_ids() == before


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        (ConstraintSpec("json_schema", {"type": "array", "uniqueItems": True}), "uniqueItems"),
        (ConstraintSpec("json_schema", {"not": {"type": "string"}}), "not"),
        (ConstraintSpec("json_schema", {"if": {}, "then": {}}), "if"),
        (ConstraintSpec("json_schema", "{not json"), "not valid JSON"),
        (ConstraintSpec("json_schema", [1, 2]), "must be an object"),
        (ConstraintSpec("regex", "(?<=a)b"), "look-around"),
        (ConstraintSpec("regex", ""), "non-empty pattern"),
        (ConstraintSpec("grammar", "start: undefined_rule"), "undefined_rule"),
        (ConstraintSpec("choice", ()), "non-empty list"),
        (ConstraintSpec("choice", ("a", 3)), "non-empty string"),
        # A lexer too big for llguidance's limits, built lazily on the first token
        (
            ConstraintSpec("json_schema", {"type": "string", "pattern": "^(a{1000}){1000}$"}),
            "too many expressions",
        ),
        (ConstraintSpec("regex", "(a{1000}){1000}"), "too many expressions"),
    ],
)
def test_what_cannot_compile_raises_an_error_naming_it(compiler, spec, named):
    with pytest.raises(ConstraintError, match=named):
        compiler.compile_sync(spec)


def test_lowest_allowed():
    assert lowest_allowed(bytes([0, 0b0010_1000])) == 11
    assert lowest_allowed(bytes(4)) is None


def test_unknown_kind_is_refused():
    with pytest.raises(ConstraintError, match="unknown constraint kind"):
        ConstraintSpec("xml")


def test_equal_constraints_hit_the_cache_whatever_their_key_order(compiler):
    first = compiler.compile_sync(ConstraintSpec("json_schema", PERSON))
    reordered = dict(reversed(list(PERSON.items())))
    again = compiler.compile_sync(ConstraintSpec("json_schema", reordered))
    as_text = compiler.compile_sync(
        ConstraintSpec(
            "json_schema",
            '{"type": "object", '
            '"required": ["name", "age"], "properties": {"age": {"type": "integer"}, '
            '"name": {"type": "string"}}}',
        )
    )
    assert first is again is as_text
    assert compiler.num_entries == 1 and compiler.hits == 2


def test_the_cache_is_bounded_by_count_least_recently_used_first(grammar_tok):
    compiler = ConstraintCompiler(grammar_tok, max_entries=2)
    a, b, c = (ConstraintSpec("regex", f"{letter}+") for letter in "abc")
    first_a = compiler.compile_sync(a)
    compiler.compile_sync(b)
    assert compiler.compile_sync(a) is first_a  # a is now the most recently used
    compiler.compile_sync(c)  # evicts b
    assert compiler.num_entries == 2
    assert compiler.compile_sync(a) is first_a
    misses = compiler.misses
    compiler.compile_sync(b)
    assert compiler.misses == misses + 1  # evicted: compiled again
    compiler.close()


def test_the_cache_is_bounded_by_bytes(grammar_tok):
    probe = ConstraintCompiler(grammar_tok).compile_sync(ConstraintSpec("regex", "a+"))
    compiler = ConstraintCompiler(grammar_tok, max_bytes=int(probe.num_bytes * 2.5))
    for letter in "abcdef":
        compiler.compile_sync(ConstraintSpec("regex", f"{letter}+"))
    assert compiler.num_entries == 2
    assert compiler.num_bytes <= compiler.max_bytes
    compiler.close()


def test_async_compile_runs_off_the_event_loop(compiler, monkeypatch):
    threads: list[str] = []
    build = compiler._build

    def recording_build(spec, key):  # noqa: ANN001, ANN202
        threads.append(threading.current_thread().name)
        return build(spec, key)

    monkeypatch.setattr(compiler, "_build", recording_build)

    async def compile_while_ticking():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        compiled = await compiler.compile(ConstraintSpec("json_schema", PERSON))
        task.cancel()
        return compiled, ticks

    compiled, ticks = asyncio.run(compile_while_ticking())
    assert threads and threads[0].startswith("lamina-grammar")
    assert ticks > 0  # the loop kept running while the worker compiled
    cached, _ = asyncio.run(compile_while_ticking())
    assert cached is compiled and len(threads) == 1


def test_async_compile_raises_the_same_clear_error(compiler):
    spec = ConstraintSpec("json_schema", {"type": "array", "uniqueItems": True})
    with pytest.raises(ConstraintError, match="uniqueItems"):
        asyncio.run(compiler.compile(spec))


def test_mask_filler_writes_each_matchers_row(compiler, hf_tokenizer):
    import numpy as np

    specs = [ConstraintSpec("regex", "[0-9]+"), ConstraintSpec("choice", ("yes", "no"))]
    matchers = [compiler.compile_sync(spec).new_matcher() for spec in specs * 2]
    words = bitmask_words(VOCAB)
    buffer = np.zeros((4, words), dtype=np.int32)
    MaskFiller().fill(matchers, [3, 2, 1, 0], buffer.ctypes.data, words * 4, 4)
    for row, matcher in zip([3, 2, 1, 0], matchers):
        bits = np.unpackbits(buffer[row].view(np.uint8), bitorder="little")[:VOCAB]
        assert np.flatnonzero(bits).tolist() == matcher.allowed_token_ids()
    with pytest.raises(ValueError, match="beyond"):
        MaskFiller().fill(matchers[:1], [4], buffer.ctypes.data, words * 4, 4)
