"""30 JSON schemas for the structured-output tests: nested objects, arrays with min/max
items, enums, numbers with bounds, optional fields, anyOf, string patterns.

Strings carry a maxLength and numbers bounds where a 135M model would otherwise write
forever: the tests prove that the grammar enforces the schema, and need outputs that end.
"""

from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 24}
WORD = {"type": "string", "minLength": 1, "maxLength": 12}
AGE = {"type": "integer", "minimum": 0, "maximum": 120}
SCORE = {"type": "number", "minimum": 0, "maximum": 10}


def obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    """An object schema as OpenAI's strict mode wants it: no properties beyond these
    (JSON Schema allows any by default, and a small model then invents keys forever)."""
    required = list(properties) if required is None else required
    fields = {"additionalProperties": False, **extra}
    return {"type": "object", "properties": properties, "required": required, **fields}


SCHEMAS: dict[str, dict] = {
    "person": obj({"name": NAME, "age": AGE}),
    "person_optional_email": obj(
        {"name": NAME, "email": {"type": "string", "maxLength": 30}}, ["name"]
    ),
    "address_nested": obj(
        {
            "name": NAME,
            "address": obj({"city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
        }
    ),
    "deep_nesting": obj({"a": obj({"b": obj({"c": obj({"value": AGE})})})}),
    "tags_min2_max4": obj({"tags": {"type": "array", "items": WORD, "minItems": 2, "maxItems": 4}}),
    "numbers_exactly3": obj(
        {"values": {"type": "array", "items": AGE, "minItems": 3, "maxItems": 3}}
    ),
    "color_enum": obj({"color": {"enum": ["red", "green", "blue"]}}),
    "mixed_enum": obj({"level": {"enum": [1, 2, 3, "max", None]}}),
    "bounded_float": obj(
        {"score": SCORE, "weight": {"type": "number", "minimum": -5, "maximum": 5}}
    ),
    "exclusive_bounds": obj(
        {"ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}}
    ),
    "boolean_flags": obj({"active": {"type": "boolean"}, "admin": {"type": "boolean"}}),
    "null_or_int": obj({"count": {"anyOf": [AGE, {"type": "null"}]}}),
    "anyof_id": obj({"id": {"anyOf": [AGE, {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"}]}}),
    "anyof_shapes": obj(
        {
            "shape": {
                "anyOf": [
                    obj({"kind": {"const": "circle"}, "radius": SCORE}),
                    obj({"kind": {"const": "square"}, "side": SCORE}),
                ]
            }
        }
    ),
    "date_pattern": obj(
        {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}
    ),
    "code_pattern": obj({"code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{3}$"}}),
    "phone_pattern": obj({"phone": {"type": "string", "pattern": "^\\+?[0-9]{10,12}$"}}),
    "array_of_objects": obj(
        {
            "items": {
                "type": "array",
                "items": obj(
                    {"sku": WORD, "qty": {"type": "integer", "minimum": 1, "maximum": 99}}
                ),
                "minItems": 1,
                "maxItems": 3,
            }
        }
    ),
    "top_level_array": {"type": "array", "items": AGE, "minItems": 1, "maxItems": 5},
    "top_level_enum": {"enum": ["yes", "no", "maybe"]},
    "const_field": obj({"version": {"const": 2}, "name": NAME}),
    "optional_many": obj({"a": AGE, "b": WORD, "c": {"type": "boolean"}, "d": SCORE}, ["a"]),
    "extra_props_typed": obj({"x": AGE}, additionalProperties=AGE, maxProperties=3),
    "string_lengths": obj({"word": {"type": "string", "minLength": 3, "maxLength": 6}}),
    "nested_arrays": obj(
        {
            "matrix": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "minItems": 2,
                    "maxItems": 2,
                },
                "minItems": 2,
                "maxItems": 2,
            }
        }
    ),
    "defs_ref": {
        "$defs": {"point": obj({"x": AGE, "y": AGE})},
        **obj({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}),
    },
    "enum_array": obj(
        {
            "days": {
                "type": "array",
                "items": {"enum": ["mon", "tue", "wed"]},
                "minItems": 1,
                "maxItems": 3,
            }
        }
    ),
    "integer_multiple": obj(
        {"even": {"type": "integer", "minimum": 0, "maximum": 100, "multipleOf": 2}}
    ),
    "oneof_union": obj({"value": {"oneOf": [{"type": "boolean"}, {"type": "null"}]}}),
    "event": obj(
        {
            "title": NAME,
            "when": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
            "attendees": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 2},
            "priority": {"enum": ["low", "high"]},
        }
    ),
}
assert len(SCHEMAS) == 30
