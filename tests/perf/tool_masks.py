"""What the tool-call grammar costs per token, against a plain JSON schema constraint.

    python -m tests.perf.tool_masks [--rounds 3]

On the default model's tokenizer: compile time (cold: a fresh compiler; cached: the same
spec again) and per-token mask time along a valid output for `auto` while the model
writes free text, `auto` with text then a call (the lazy trigger), `required`, and the
call's arguments alone as a json_schema constraint. Constraints interleaved round by
round; medians and maxima per round (docs/tool-calling.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from app.structured import ConstraintCompiler, ConstraintSpec, grammar_tokenizer
from app.structured.tool_grammar import tool_call_spec
from app.tokenizer import Tokenizer
from app.weights import default_model_dir
from tests.tool_schemas import WEATHER

TIME = {"type": "object", "properties": {"timezone": {"type": "string"}}}
FUNCTIONS = [("get_weather", WEATHER), ("get_time", TIME)]
ARGUMENTS = {"city": "Paris", "unit": "celsius"}
CALL = (
    "<tool_call>\n" + json.dumps({"name": "get_weather", "arguments": ARGUMENTS}) + "\n</tool_call>"
)
CASES = {
    "auto, free text": (
        tool_call_spec(FUNCTIONS, False, True),
        "The weather in Paris is mild today, with some sun and a light breeze. " * 2,
    ),
    "auto, text then a call": (tool_call_spec(FUNCTIONS, False, True), "Let me check. " + CALL),
    "required, one call": (tool_call_spec(FUNCTIONS, True, False), CALL),
    "json_schema, arguments": (ConstraintSpec("json_schema", WEATHER), json.dumps(ARGUMENTS)),
}


def measure(compiler: ConstraintCompiler, tokenizer: Tokenizer, spec, text: str) -> dict:
    started = time.perf_counter()
    compiled = compiler.compile_sync(spec)
    compile_s = time.perf_counter() - started
    matcher = compiled.new_matcher()
    mask_s = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        started = time.perf_counter()
        matcher._matcher.compute_bitmask()
        mask_s.append(time.perf_counter() - started)
        if not matcher.advance(token):
            raise AssertionError(f"the grammar refused its own example: {matcher.error}")
    return {"compile_s": compile_s, "mask_s": mask_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model_dir = default_model_dir()
    tokenizer = Tokenizer(model_dir)
    lltok = grammar_tokenizer(model_dir, tokenizer.vocab_size, min(tokenizer.eos_token_ids))
    print(f"{'constraint':26s} {'round':>5s} {'cold ms':>8s} {'cached ms':>9s} "
          f"{'mask median ms':>14s} {'mask max ms':>11s} tokens")  # fmt: skip
    for round_index in range(args.rounds):
        for name, (spec, text) in CASES.items():
            compiler = ConstraintCompiler(lltok)  # cold: nothing cached
            cold = measure(compiler, tokenizer, spec, text)
            cached = measure(compiler, tokenizer, spec, text)
            compiler.close()
            masks = cold["mask_s"] + cached["mask_s"]
            print(
                f"{name:26s} {round_index:5d} {cold['compile_s'] * 1e3:8.2f} "
                f"{cached['compile_s'] * 1e3:9.3f} {statistics.median(masks) * 1e3:14.3f} "
                f"{max(masks) * 1e3:11.3f} {len(cold['mask_s'])}"
            )


if __name__ == "__main__":
    main()
