"""What a request asks the output to match, and its translation into an llguidance grammar."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import llguidance

CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "lark")

# JSON is written compactly with one space after ',' and ':' and no other whitespace.
# A grammar that allows free whitespace lets a small model pad forever (newlines until
# max_tokens); a schema's own "x-guidance" options may still ask for it.
JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


# The numbers llguidance takes in a schema: 64-bit floats, and integers that fit i64 or
# u64. A larger integer fails with "Value is not JSON serializable"; a float beyond f64
# (Python reads 1e400 as infinity) reaches it as null.
MIN_SCHEMA_INT, MAX_SCHEMA_INT = -(2**63), 2**64 - 1
NUMBERS_ALLOWED = (
    f"a schema's numbers must be finite 64-bit floats or integers from {MIN_SCHEMA_INT} "
    f"to {MAX_SCHEMA_INT}"
)


class ConstraintError(ValueError):
    """A constraint that cannot be compiled; the message names what is wrong or unsupported.

    The API answers it with a 400 before any work starts in the engine.
    """


@dataclass(frozen=True)
class ConstraintSpec:
    """One constraint as the API parsed it.

    kind: one of CONSTRAINT_KINDS. value: the JSON schema (a dict, or JSON text) for
    json_schema; ignored (None) for json_object; the pattern for regex; a tuple of
    strings for choice; the Lark (or GBNF, recognised by `::=`) text for grammar; Lark
    text taken as is for lark (grammars lamina writes itself, e.g. tool calls).
    """

    kind: str
    value: Any = None

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ConstraintError(
                f"unknown constraint kind {self.kind!r}; expected one of {CONSTRAINT_KINDS}"
            )

    def canonical_text(self) -> str:
        """A stable text of the constraint: equal constraints give equal texts."""
        value = self.value
        if self.kind == "json_schema" and isinstance(value, str):
            value = _parse_schema_text(value)
        if self.kind == "choice":
            value = list(value)
        return json.dumps([self.kind, value], sort_keys=True, separators=(",", ":"))

    def content_hash(self) -> str:
        return hashlib.sha256(self.canonical_text().encode()).hexdigest()

    def to_grammar(self) -> str:
        """The llguidance grammar (its JSON form) for this constraint."""
        matcher = llguidance.LLMatcher
        if self.kind == "json_object":
            return matcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
        if self.kind == "json_schema":
            return matcher.grammar_from_json_schema(_schema_dict(self.value), defaults=JSON_LAYOUT)
        if self.kind == "regex":
            if not isinstance(self.value, str) or not self.value:
                raise ConstraintError("a regex constraint needs a non-empty pattern string")
            return matcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            return matcher.grammar_from_lark(choice_lark(self.value))
        if self.kind == "lark":
            return matcher.grammar_from_lark(self.value)
        return matcher.grammar_from_lark(grammar_lark(self.value))


def _parse_schema_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConstraintError(f"the JSON schema is not valid JSON: {exc}") from None


def _schema_dict(value: Any) -> dict:
    schema = _parse_schema_text(value) if isinstance(value, str) else value
    if isinstance(schema, bool):  # JSON Schema allows true (anything) and false (nothing)
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ConstraintError(f"a JSON schema must be an object, not {type(schema).__name__}")
    problem = number_out_of_range(schema)
    if problem is not None:
        raise ConstraintError(problem)
    return schema


def number_out_of_range(schema: Any) -> str | None:
    """What is wrong with a number in `schema` that llguidance cannot take, naming where
    it is (`properties.age.maximum`); None when every number fits."""
    pending: list[tuple[str, Any]] = [("", schema)]  # a stack: schemas nest deeply
    while pending:
        where, value = pending.pop()
        if isinstance(value, dict):
            pending += [(f"{where}.{key}" if where else str(key), v) for key, v in value.items()]
        elif isinstance(value, list):
            pending += [(f"{where}[{index}]", v) for index, v in enumerate(value)]
        elif isinstance(value, float) and not math.isfinite(value):
            beyond = f"is beyond a 64-bit float (it reads as {value})"
            return f"`{where}` in the schema {beyond}; {NUMBERS_ALLOWED}"
        elif isinstance(value, int) and not MIN_SCHEMA_INT <= value <= MAX_SCHEMA_INT:
            return f"`{where}` in the schema is {value}; {NUMBERS_ALLOWED}"
    return None


def choice_lark(choices: Any) -> str:
    """A Lark grammar matching exactly one of the strings."""
    if isinstance(choices, str) or not choices:
        raise ConstraintError("a choice constraint needs a non-empty list of strings")
    if not all(isinstance(c, str) and c for c in choices):
        raise ConstraintError("every choice must be a non-empty string")
    # A JSON string literal is a Lark string literal with the same escapes.
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def grammar_lark(text: Any) -> str:
    """Lark as is; GBNF (llama.cpp's EBNF, with `::=`) converted to Lark by llguidance."""
    if not isinstance(text, str) or not text.strip():
        raise ConstraintError("a grammar constraint needs the grammar's text")
    if "::=" not in text:
        return text
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        return gbnf_to_lark(text)
    except Exception as exc:  # noqa: BLE001 - the converter raises plain exceptions
        raise ConstraintError(f"the EBNF (GBNF) grammar could not be read: {exc}") from None
