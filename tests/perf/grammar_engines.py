"""The grammar engines compared on the default model's tokenizer (docs/structured-outputs.md).

    python -m tests.perf.grammar_engines [--rounds 3] [--engines llguidance,xgrammar,outlines]

Needs the candidate engines installed (llguidance, xgrammar, outlines-core); only
llguidance is a dependency of lamina, so run this from a scratch environment that has
all three and lamina's source on the path. For every engine, interleaved round by round:
- compile cold (a fresh compiler/cache each time) and cached (the same constraint again),
  per constraint;
- per-token mask time along a valid output (the example below, tokenized), for one
  stream and for 32 concurrent streams (4 copies of each of the 8 constraints, masks
  filled into one [32, ceil(V/32)] int32 bitmask per step by the engine's batch call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from app.weights import default_model_dir

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "address"],
}
ARRAY = {
    "type": "object",
    "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4}
    },
    "required": ["tags"],
}
ENUM_BOUNDS = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["color", "age", "score"],
}
OPTIONAL_ANYOF = {
    "type": "object",
    "properties": {
        "id": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "note": {"type": "string"},
        "flag": {"type": "boolean"},
    },
    "required": ["id"],
}
PATTERN = {
    "type": "object",
    "properties": {
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{3}$"},
    },
    "required": ["date", "code"],
}
ITEMS_OF_OBJECTS = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                "required": ["sku", "qty"],
            },
            "minItems": 1,
        }
    },
    "required": ["items"],
}
REGEX = r"[0-9]{3}-[0-9]{3}-[0-9]{4}"
CHOICES = ["positive", "negative", "neutral"]

# (name, kind, spec, a valid output to walk the matcher along)
CONSTRAINTS = [
    ("nested", "json", NESTED, '{"name": "Ada", "address": {"city": "Paris", "zip": "75001"}}'),
    ("array min/max", "json", ARRAY, '{"tags": ["alpha", "beta", "gamma"]}'),
    ("enum+bounds", "json", ENUM_BOUNDS, '{"color": "green", "age": 37, "score": 0.25}'),
    ("optional+anyOf", "json", OPTIONAL_ANYOF, '{"id": "abc-12", "flag": true}'),
    ("patterns", "json", PATTERN, '{"date": "2026-12-03", "code": "ABC123"}'),
    (
        "array of objects",
        "json",
        ITEMS_OF_OBJECTS,
        '{"items": [{"sku": "A1", "qty": 2}, {"sku": "B7", "qty": 10}]}',
    ),
    ("regex", "regex", REGEX, "555-123-4567"),
    ("choice", "choice", CHOICES, "negative"),
]


def choice_regex(choices: list[str]) -> str:
    import re

    return "(" + "|".join(re.escape(c) for c in choices) + ")"


# --- engines: each gives compile(kind, spec) -> compiled, matcher(compiled), fill, consume ---


class LLGuidanceEngine:
    name = "llguidance"

    def __init__(self, hf_tokenizer, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.lg = llguidance
        self.lgt = llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)
        self.executor = llguidance.LLExecutor()
        self.cache: dict = {}

    def fresh_cache(self) -> None:
        self.cache = {}

    def grammar(self, kind, spec) -> str:
        m = self.lg.LLMatcher
        if kind == "json":
            return m.grammar_from_json_schema(json.dumps(spec))
        if kind == "regex":
            return m.grammar_from_regex(spec)
        return m.grammar_from_regex(choice_regex(spec))

    def compile(self, kind, spec):
        key = (kind, json.dumps(spec))
        if key not in self.cache:
            grammar = self.grammar(kind, spec)
            # llguidance compiles lazily in the matcher; a first matcher builds the lexer.
            matcher = self.lg.LLMatcher(self.tokenizer, grammar)
            assert not matcher.is_error(), matcher.get_error()
            self.cache[key] = matcher
        return self.cache[key]

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matchers, bitmask) -> None:
        if len(matchers) == 1:
            self.lgt.fill_next_token_bitmask(matchers[0], bitmask, 0)
        else:
            pairs = [(m, i) for i, m in enumerate(matchers)]
            self.lgt.fill_next_token_bitmask_par(self.executor, pairs, bitmask)

    def consume(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()


class XGrammarEngine:
    name = "xgrammar"

    def __init__(self, hf_tokenizer, vocab_size: int) -> None:
        import xgrammar

        self.xg = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)
        self.batch = xgrammar.BatchGrammarMatcher()
        self.fresh_cache()

    def fresh_cache(self) -> None:
        self.compiler = self.xg.GrammarCompiler(self.info, cache_enabled=True)

    def compile(self, kind, spec):
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(spec))
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        return self.compiler.compile_regex(choice_regex(spec))

    def matcher(self, compiled):
        return self.xg.GrammarMatcher(compiled)

    def fill(self, matchers, bitmask) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def consume(self, matcher, token: int) -> None:
        assert matcher.accept_token(token)


class OutlinesEngine:
    name = "outlines-core"

    def __init__(self, hf_tokenizer, vocab_size: int) -> None:
        import outlines_core

        self.oc = outlines_core
        self.vocabulary = outlines_vocabulary(outlines_core, hf_tokenizer)
        self.cache: dict = {}

    def fresh_cache(self) -> None:
        self.cache = {}

    def compile(self, kind, spec):
        key = (kind, json.dumps(spec))
        if key not in self.cache:
            if kind == "json":
                regex = self.oc.json_schema.build_regex_from_schema(json.dumps(spec))
            elif kind == "regex":
                regex = spec
            else:
                regex = choice_regex(spec)
            self.cache[key] = self.oc.Index(regex, self.vocabulary)
        return self.cache[key]

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matchers, bitmask) -> None:
        # No batch call: one Python call per row.
        for row, guide in enumerate(matchers):
            view = bitmask[row]
            guide.write_mask_into(view.data_ptr(), view.numel(), view.element_size())

    def consume(self, matcher, token: int) -> None:
        matcher.advance(token)


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes as themselves, the rest shifted."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def outlines_vocabulary(outlines_core, hf_tokenizer):
    """outlines-core's Vocabulary from the byte-level BPE vocabulary (its from_pretrained
    would reach for the hub)."""
    byte_of = {c: b for b, c in gpt2_bytes_to_unicode().items()}
    eos = hf_tokenizer.eos_token_id
    tokens: dict[bytes, list[int]] = {}
    special = set(hf_tokenizer.all_special_ids)
    for text, token_id in hf_tokenizer.get_vocab().items():
        if token_id == eos or token_id in special:
            continue
        try:
            raw = bytes(byte_of[c] for c in text)
        except KeyError:
            continue
        tokens.setdefault(raw, []).append(token_id)
    return outlines_core.Vocabulary(eos, tokens)


ENGINES = {"llguidance": LLGuidanceEngine, "xgrammar": XGrammarEngine, "outlines": OutlinesEngine}


# --- measurements ------------------------------------------------------------------------


def time_compiles(engine, bitmask) -> tuple[dict, dict]:
    """Compile and the first mask, cold (fresh cache) then cached: llguidance builds its
    lexer lazily, so compile time alone would flatter it; the first mask is what a
    request waits for."""
    cold, cached = {}, {}
    for name, kind, spec, _ in CONSTRAINTS:
        engine.fresh_cache()
        for times in (cold, cached):
            start = time.perf_counter()
            engine.fill([engine.matcher(engine.compile(kind, spec))], bitmask[:1])
            times[name] = time.perf_counter() - start
    return cold, cached


def walk(engine, streams, bitmask) -> tuple[float, int]:
    """Mask then consume along each stream's tokens; seconds spent filling masks, steps."""
    matchers = [engine.matcher(compiled) for compiled, _ in streams]
    max_len = max(len(tokens) for _, tokens in streams)
    fill_seconds = 0.0
    for step in range(max_len):
        live = [i for i, (_, tokens) in enumerate(streams) if step < len(tokens)]
        rows = [matchers[i] for i in live]
        start = time.perf_counter()
        engine.fill(rows, bitmask[: len(rows)])
        fill_seconds += time.perf_counter() - start
        for k, i in enumerate(live):
            token = streams[i][1][step]
            word = int(bitmask[k, token // 32]) & (1 << (token % 32))
            assert word, f"{engine.name}: token {token} masked at step {step}"
            engine.consume(matchers[i], token)
    return fill_seconds, max_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", default="llguidance,xgrammar,outlines")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model_dir = Path(default_model_dir())
    hf_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    token_lists = [hf_tokenizer.encode(text) for *_, text in CONSTRAINTS]
    engines = []
    for key in args.engines.split(","):
        start = time.perf_counter()
        engines.append(ENGINES[key](hf_tokenizer, vocab_size))
        print(f"{engines[-1].name}: tokenizer set-up {time.perf_counter() - start:.2f} s")
    bitmask = torch.zeros(32, (vocab_size + 31) // 32, dtype=torch.int32)
    results = {e.name: {"cold": [], "cached": [], "one": [], "many": []} for e in engines}
    for _ in range(args.rounds):
        for engine in engines:  # interleaved: every engine sees the same load
            cold, cached = time_compiles(engine, bitmask)
            res = results[engine.name]
            res["cold"].append(cold)
            res["cached"].append(cached)
            compiled = [engine.compile(kind, spec) for _, kind, spec, _ in CONSTRAINTS]
            one = [walk(engine, [(c, t)], bitmask) for c, t in zip(compiled, token_lists)]
            res["one"].append(sum(s for s, _ in one) / sum(n for _, n in one))
            streams = [(c, t) for c, t in zip(compiled, token_lists)] * 4
            seconds, steps = walk(engine, streams, bitmask)
            res["many"].append(seconds / steps)
    report(results)


def report(results) -> None:
    names = [name for name, *_ in CONSTRAINTS]
    print("\ncompile + first mask, cold, ms (median of rounds):")
    print("constraint".ljust(18) + "".join(e.rjust(15) for e in results))
    for name in names:
        row = [statistics.median(r[name] for r in res["cold"]) * 1e3 for res in results.values()]
        print(name.ljust(18) + "".join(f"{v:15.1f}" for v in row))
    print("\ncompile (cache hit) + first mask, ms (max over constraints, median of rounds):")
    for engine, res in results.items():
        worst = statistics.median(max(r.values()) for r in res["cached"]) * 1e3
        print(f"  {engine}: {worst:.3f}")
    print("\nmask per step, ms (median of rounds):")
    for engine, res in results.items():
        one = statistics.median(res["one"]) * 1e3
        many = statistics.median(res["many"]) * 1e3
        print(f"  {engine}: 1 stream {one:.3f}; 32 streams {many:.3f} per step (all 32 rows)")


if __name__ == "__main__":
    main()
