"""`lamina bench engine --structured [SCHEMA.json]`: constrained against unconstrained decoding.

Both run in this one process on the same engine, alternating at each level, so their
ratio holds on a noisy machine. Each stream writes a JSON array of objects valid
against the schema (a built-in event record by default), with more items required
than `--output-len` tokens can hold: every stream, constrained or not (EOS ignored),
writes exactly `--output-len` tokens. A third run computes the masks after the
forward pass instead of during it, which measures what the overlap buys.
Schema compile time is reported cold (a fresh compiler) and cached.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from app.bench.closed_loop import closed_loop
from app.core import SamplingParams

BUILTIN_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "when": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
        "attendees": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
        "priority": {"enum": ["low", "normal", "high"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["title", "when", "attendees", "priority"],
    "additionalProperties": False,
}
VARIANTS = ("free", "constrained", "constrained, masks after forward")


def load_schema(path: str) -> dict:
    return BUILTIN_SCHEMA if path == "builtin" else json.loads(Path(path).read_text())


def time_compiles(grammar_tok, schema: dict, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of a cold compile (new compiler each time) and of a cached one."""
    from app.structured import ConstraintCompiler, ConstraintSpec

    spec = ConstraintSpec("json_schema", schema)
    cold, cached = [], []
    for _ in range(repeats):
        compiler = ConstraintCompiler(grammar_tok)
        start = time.perf_counter()
        compiler.compile_sync(spec)
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        compiler.compile_sync(spec)
        cached.append(time.perf_counter() - start)
        compiler.close()
    return statistics.median(cold), statistics.median(cached)


def run_level(core, prompt: list[int], params: SamplingParams, level: int, num: int) -> float:
    """Closed loop of `num` requests, `level` in flight: output tokens per second.
    The bench runs one request per stream (num = level)."""
    tokens, seconds = closed_loop(core, [prompt] * num, params, level, "structured")
    return tokens / seconds


def main(args, engine, tokenizer) -> int:
    """engine: engine_bench.Engine (one runner, warmed up)."""
    from app.structured import ConstraintCompiler, ConstraintSpec, grammar_tokenizer

    runner = engine.runner
    schema = load_schema(args.structured)
    (eos, *_) = sorted(tokenizer.eos_token_ids)
    start = time.perf_counter()
    grammar_tok = grammar_tokenizer(engine.settings.model, runner.config.vocab_size, eos)
    setup_s = time.perf_counter() - start
    cold_s, cached_s = time_compiles(grammar_tok, schema)
    stream_schema = {"type": "array", "items": schema, "minItems": args.output_len}
    compiled = ConstraintCompiler(grammar_tok).compile_sync(
        ConstraintSpec("json_schema", stream_schema)
    )
    base = {"max_tokens": args.output_len, "temperature": 0.0, "ignore_eos": True}
    params = {
        "free": SamplingParams(**base),
        "constrained": SamplingParams(**base, constraint=compiled),
    }
    params[VARIANTS[2]] = params["constrained"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "List upcoming events as a JSON array."}]
    )
    print(
        f"lamina bench engine --structured: schema {args.structured}; grammar tokenizer "
        f"set-up {setup_s:.2f} s; compile cold {cold_s * 1e3:.1f} ms, cached "
        f"{cached_s * 1e6:.0f} us (medians of 5)\n"
        f"{args.output_len} tokens per stream, greedy, best of {args.repeats}\n"
        f"{'streams':>7} {'free tok/s':>11} {'constrained':>12} {'ratio':>6} "
        f"{'masks after fwd':>16} {'ratio':>6}",
        flush=True,
    )
    results = []
    for level in args.levels:
        best = dict.fromkeys(VARIANTS, 0.0)
        run_level(engine.core(tokenizer), prompt, params["constrained"], level, level)  # warm
        for _ in range(args.repeats):
            for variant in VARIANTS:  # alternating: the same minutes for each
                runner.constraint_masks.overlap = variant != VARIANTS[2]
                rate = run_level(engine.core(tokenizer), prompt, params[variant], level, level)
                best[variant] = max(best[variant], rate)
        runner.constraint_masks.overlap = True
        free, constrained, after = (best[v] for v in VARIANTS)
        print(
            f"{level:7d} {free:11.1f} {constrained:12.1f} {constrained / free:6.3f} "
            f"{after:16.1f} {after / free:6.3f}",
            flush=True,
        )
        results.append({"streams": level, **{v: best[v] for v in VARIANTS}})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {"setup_s": setup_s, "compile_cold_s": cold_s, "compile_cached_s": cached_s}
        args.json.write_text(json.dumps({**summary, "levels": results}, indent=2))
    return 0
