"""Structured outputs: grammar constraints compiled by llguidance, one matcher per sequence.

No torch here. The API compiles a `ConstraintSpec` (async, in a worker thread, cached by
content hash) into a `CompiledConstraint` that rides in SamplingParams; the engine gives
each sequence its own `ConstraintMatcher`; the runner asks the matchers of a batch for
their token masks (`fill_token_bitmask`) and the sampler applies them (app/model/sampler.py).
"""

from app.structured.compiler import CompiledConstraint, ConstraintCompiler, grammar_tokenizer
from app.structured.matcher import ConstraintMatcher, MaskFiller, bitmask_words
from app.structured.spec import CONSTRAINT_KINDS, ConstraintError, ConstraintSpec

__all__ = [
    "CONSTRAINT_KINDS",
    "CompiledConstraint",
    "ConstraintCompiler",
    "ConstraintError",
    "ConstraintMatcher",
    "ConstraintSpec",
    "MaskFiller",
    "bitmask_words",
    "grammar_tokenizer",
]
