"""Structured outputs through the engine (no HTTP): every output obeys its constraint,
greedy and sampled; a constrained request is batch invariant and survives preemption.

The 135M model is weak: these tests prove the grammar's enforcement, not the model's
understanding. Each output must end by the grammar (STOP) and validate. The thirty
schemas run through HTTP, all at once (tests/api/test_structured_thirty_http.py).
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from app.core import FinishReason, SamplingParams
from app.structured import ConstraintCompiler, ConstraintSpec, grammar_tokenizer
from tests.engine.conftest import assert_ok
from tests.engine.structured_schemas import SCHEMAS

pytestmark = pytest.mark.slow
MAX_TOKENS = 160
SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 7}


@pytest.fixture(scope="module")
def compiler(default_model_path, runner, tokenizer) -> ConstraintCompiler:
    (eos,) = tokenizer.eos_token_ids
    return ConstraintCompiler(grammar_tokenizer(default_model_path, runner.config.vocab_size, eos))


def chat_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}])


def schema_prompt(tokenizer, name: str, schema: dict) -> list[int]:
    text = (
        f"Write a JSON value ({name.replace('_', ' ')}) matching this schema: {json.dumps(schema)}"
    )
    return chat_prompt(tokenizer, text)


def run(core, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, dict]:
    """Add all requests at once, step until done: {id: {"text", "tokens", "finish"}}."""
    results = {rid: {"text": "", "tokens": [], "finish": None} for rid in requests}
    for rid, (prompt, params) in requests.items():
        assert core.add_request(rid, prompt, params) == []
    while core.has_unfinished():
        for delta in core.step():
            assert_ok(delta)
            result = results[delta.request_id]
            result["text"] += delta.text
            result["tokens"].extend(delta.token_ids)
            result["finish"] = delta.finish_reason or result["finish"]
    return results


def constrained(compiler, spec: ConstraintSpec, **params) -> SamplingParams:
    fields = {"max_tokens": MAX_TOKENS, "temperature": 0.0, **params}
    return SamplingParams(**fields, constraint=compiler.compile_sync(spec))


REGEXES = [r"[0-9]{3}-[0-9]{3}-[0-9]{4}", r"(yes|no), because [a-z ]{5,20}\.", r"[A-Z][a-z]{2,8}"]
CHOICES = [("positive", "negative", "neutral"), ("Paris", "London", "Rome", 'it\'s "Berlin"')]


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_regex_choice_and_grammar_outputs_match(make_core, tokenizer, compiler, mode):
    sampling = SAMPLED if mode == "sampled" else {}
    prompt = chat_prompt(tokenizer, "Answer briefly: what is the capital of France?")
    lark = 'start: "The answer is " CITY "."\nCITY: /[A-Z][a-z]{2,10}/'
    gbnf = 'root ::= "Answer: " [0-9] [0-9]?'
    cases = {
        **{f"regex{i}": (ConstraintSpec("regex", r), re.compile(r)) for i, r in enumerate(REGEXES)},
        **{
            f"choice{i}": (ConstraintSpec("choice", c), re.compile("|".join(map(re.escape, c))))
            for i, c in enumerate(CHOICES)
        },
        "lark": (ConstraintSpec("grammar", lark), re.compile(r"The answer is [A-Z][a-z]{2,10}\.")),
        "gbnf": (ConstraintSpec("grammar", gbnf), re.compile(r"Answer: [0-9][0-9]?")),
    }
    requests = {
        rid: (prompt, constrained(compiler, spec, **sampling)) for rid, (spec, _) in cases.items()
    }
    results = run(make_core(), requests)
    for rid, (_, pattern) in cases.items():
        assert results[rid]["finish"] is FinishReason.STOP, (rid, results[rid])
        assert pattern.fullmatch(results[rid]["text"]), (rid, results[rid]["text"])


def test_max_tokens_inside_an_object_ends_with_length(make_core, tokenizer, compiler):
    schema = SCHEMAS["event"]
    params = constrained(compiler, ConstraintSpec("json_schema", schema), max_tokens=6)
    result = run(make_core(), {"short": (schema_prompt(tokenizer, "event", schema), params)})[
        "short"
    ]
    assert result["finish"] is FinishReason.LENGTH
    assert len(result["tokens"]) == 6
    with pytest.raises(json.JSONDecodeError):  # the JSON is incomplete, as the README says
        json.loads(result["text"])


def mixed_batch(tokenizer, compiler) -> dict[str, tuple[list[int], SamplingParams]]:
    """32 requests: 16 constrained by 16 different schemas, 16 free; greedy and seeded."""
    names = list(SCHEMAS)[:16]
    requests = {}
    for i, name in enumerate(names):
        sampling = SAMPLED if i % 2 else {}
        spec = ConstraintSpec("json_schema", SCHEMAS[name])
        requests[f"c-{name}"] = (
            schema_prompt(tokenizer, name, SCHEMAS[name]),
            constrained(compiler, spec, max_tokens=32, **sampling),
        )
        requests[f"free-{i}"] = (
            chat_prompt(tokenizer, f"Tell me fact number {i} about the sea."),
            SamplingParams(max_tokens=32, **(SAMPLED if i % 2 else {"temperature": 0.0})),
        )
    return requests


def test_constrained_request_is_batch_invariant(make_core, tokenizer, compiler):
    requests = mixed_batch(tokenizer, compiler)
    together = run(make_core(), requests)
    for rid in ("c-person", "c-deep_nesting", "c-color_enum"):  # greedy, seeded, greedy
        alone = run(make_core(), {rid: requests[rid]})[rid]
        assert alone["tokens"] == together[rid]["tokens"], rid


def test_preemption_keeps_constrained_outputs_valid_and_identical(make_core, tokenizer, compiler):
    names = ["person", "array_of_objects", "anyof_shapes", "defs_ref"]
    requests = {
        name: (
            schema_prompt(tokenizer, name, SCHEMAS[name]),
            constrained(compiler, ConstraintSpec("json_schema", SCHEMAS[name]), **SAMPLED),
        )
        for name in names
    }
    roomy = run(make_core(), requests)
    longest = max(len(p) for p, _ in requests.values()) + MAX_TOKENS
    tiny_core = make_core(num_blocks=longest // 16 + 4)  # ~one sequence at a time fits
    tight = run(tiny_core, requests)
    assert tiny_core.scheduler.num_preemptions > 0
    for name in names:
        assert tight[name]["tokens"] == roomy[name]["tokens"], name
        assert tight[name]["finish"] is FinishReason.STOP
        jsonschema.validate(json.loads(tight[name]["text"]), SCHEMAS[name])


def test_each_choice_of_a_request_has_its_own_matcher(make_core, tokenizer, compiler):
    spec = ConstraintSpec("json_schema", SCHEMAS["person"])
    params = constrained(compiler, spec, **SAMPLED)
    core = make_core()
    prompt = schema_prompt(tokenizer, "person", SCHEMAS["person"])
    assert core.add_request("n3", prompt, params, n=3) == []
    texts = {0: "", 1: "", 2: ""}
    while core.has_unfinished():
        for delta in core.step():
            assert_ok(delta)
            texts[delta.index] += delta.text
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMAS["person"])
