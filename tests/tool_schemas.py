"""Function parameter schemas the tool-calling tests and tests.perf.tool_masks share."""

from __future__ import annotations

# get_weather's parameters: a bounded string and an enum, both required.
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
