"""Compile constraints into llguidance grammars, cached by content hash, off the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import llguidance

from app.structured.matcher import ConstraintMatcher
from app.structured.spec import ConstraintError, ConstraintSpec

logger = logging.getLogger("lamina.structured")


def grammar_tokenizer(model_dir: str | Path, vocab_size: int, eos_token_id: int):
    """llguidance's view of the model's tokenizer (its tokenizer.json), built once (~1-2 s).

    vocab_size: the width of the model's logits, so masks line up with them.
    """
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ConstraintError(
            f"structured outputs need the model's fast tokenizer file, and {path} is missing"
        )
    return llguidance.LLTokenizer(path.read_text(), n_vocab=vocab_size, eos_token=eos_token_id)


# Tokens walked at compile time (probe_first_tokens): enough to enter a JSON value's
# first string, number or key.
PROBE_STEPS = 3


def lowest_allowed(mask: bytes) -> int | None:
    """The lowest token id a bitmask allows (bit t of the mask allows token t)."""
    for index, value in enumerate(mask):
        if value:
            return index * 8 + (value & -value).bit_length() - 1
    return None


def probe_first_tokens(matcher: llguidance.LLMatcher, steps: int, kind: str) -> None:
    """Walk `steps` tokens down the grammar (each time the lowest token allowed), so a
    lexer that outgrows llguidance's limits on entering its first lexeme (a pattern
    like `^(a{1000}){1000}$`) fails here, as a 400, and not in an engine step, as the
    request's 500. Deeper lexemes are built lazily as before."""
    for _ in range(steps):
        if matcher.is_stopped():
            return
        token = lowest_allowed(matcher.compute_bitmask())
        if token is None or matcher.is_error() or not matcher.consume_token(token):
            reason = (matcher.get_error() or "no token is allowed").splitlines()[0]
            raise ConstraintError(f"unsupported {kind} constraint: {reason}")


@dataclass(eq=False)
class CompiledConstraint:
    """A compiled constraint: immutable, shared by every request that asked for it.

    `new_matcher()` gives a sequence its own matcher, starting at the grammar's start.
    """

    key: str  # sha256 of the spec's canonical text
    kind: str
    num_bytes: int  # what the cache counts: the grammar's text size
    _template: llguidance.LLMatcher = field(repr=False)

    def new_matcher(self) -> ConstraintMatcher:
        return ConstraintMatcher(self._template.deep_copy())


class ConstraintCompiler:
    """Compiles ConstraintSpecs for one tokenizer, caching them (LRU by count and bytes).

    Thread-safe. `compile` (async) runs the work in this compiler's own worker thread,
    so neither the event loop nor the engine thread ever waits on a compile.
    """

    def __init__(
        self, tokenizer: llguidance.LLTokenizer, max_entries: int = 256, max_bytes: int = 64 << 20
    ) -> None:
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._cache: OrderedDict[str, CompiledConstraint] = OrderedDict()
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lamina-grammar")
        self.hits = 0
        self.misses = 0  # lookups that had to compile

    @property
    def num_entries(self) -> int:
        return len(self._cache)

    @property
    def num_bytes(self) -> int:
        with self._lock:
            return sum(entry.num_bytes for entry in self._cache.values())

    async def compile(self, spec: ConstraintSpec) -> CompiledConstraint:
        """Compile (or find in the cache) without blocking the running event loop."""
        cached = self._lookup(spec.content_hash(), count_miss=False)  # compile_sync counts it
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self.compile_sync, spec)

    def compile_sync(self, spec: ConstraintSpec) -> CompiledConstraint:
        """Compile in the calling thread; raises ConstraintError naming what is unsupported."""
        key = spec.content_hash()
        cached = self._lookup(key)
        if cached is not None:
            return cached
        started = time.perf_counter()
        compiled = self._build(spec, key)
        logger.debug(
            "compiled a %s constraint in %.1f ms", spec.kind, (time.perf_counter() - started) * 1e3
        )
        self._store(compiled)
        return compiled

    def _build(self, spec: ConstraintSpec, key: str) -> CompiledConstraint:
        try:
            grammar = spec.to_grammar()
        except ValueError as exc:  # llguidance: the schema is not a JSON object, etc.
            raise ConstraintError(f"invalid {spec.kind} constraint: {exc}") from None
        template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if template.is_error():
            raise ConstraintError(f"unsupported {spec.kind} constraint: {template.get_error()}")
        # The first mask builds the lexer's start states: pay for it here, not in a step.
        template.compute_bitmask()
        if template.is_error():
            raise ConstraintError(f"unsupported {spec.kind} constraint: {template.get_error()}")
        probe_first_tokens(template.deep_copy(), PROBE_STEPS, spec.kind)
        return CompiledConstraint(key, spec.kind, len(grammar), template)

    def _lookup(self, key: str, count_miss: bool = True) -> CompiledConstraint | None:
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                self.misses += count_miss
                return None
            self._cache.move_to_end(key)
            self.hits += 1
            return entry

    def _store(self, compiled: CompiledConstraint) -> None:
        with self._lock:
            self._cache[compiled.key] = compiled
            self._cache.move_to_end(compiled.key)
            total = sum(entry.num_bytes for entry in self._cache.values())
            while len(self._cache) > 1 and (
                len(self._cache) > self.max_entries or total > self.max_bytes
            ):
                _, evicted = self._cache.popitem(last=False)  # least recently used
                total -= evicted.num_bytes

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
