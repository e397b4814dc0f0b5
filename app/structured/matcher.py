"""A sequence's position in its grammar, and the batch call that fills the token masks."""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf

import llguidance


def bitmask_words(vocab_size: int) -> int:
    """int32 words in one row of a token bitmask: bit t of the row allows token t."""
    return (vocab_size + 31) // 32


class ConstraintMatcher:
    """Where one sequence stands in its grammar. Owned and advanced by the engine thread.

    A preempted sequence keeps its output tokens (only its K/V is recomputed), so its
    matcher needs no change; `rollback` undoes tokens where a caller must drop them.
    """

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def advance(self, token_id: int) -> bool:
        """Accept a sampled token; False (and `error` set) if the grammar forbids it."""
        return self._matcher.consume_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        if not self._matcher.rollback(num_tokens):
            raise RuntimeError(f"grammar rollback failed: {self._matcher.get_error()}")

    @property
    def is_accepting(self) -> bool:
        """The output so far is a complete match: EOS is allowed here."""
        return self._matcher.is_accepting()

    @property
    def is_finished(self) -> bool:
        """Complete, and nothing may follow (the grammar's end, or EOS consumed)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None

    def allowed_token_ids(self) -> list[int]:
        """The tokens allowed next (for tests and debugging: the runner uses bitmasks)."""
        mask = self._matcher.compute_bitmask()
        return [
            byte * 8 + bit
            for byte, value in enumerate(mask)
            for bit in range(8)
            if value >> bit & 1
        ]


class MaskFiller:
    """Writes the next-token masks of many matchers into rows of one int32 bitmask.

    The masks of several rows are computed in parallel by llguidance's own threads,
    which run without the GIL: a caller may overlap them with the forward pass.
    """

    def __init__(self, num_threads: int | None = None) -> None:
        self._executor = llguidance.LLExecutor(num_threads)

    def fill(
        self,
        matchers: SequenceOf[ConstraintMatcher],
        rows: SequenceOf[int],
        bitmask_pointer: int,
        row_bytes: int,
        num_rows: int,
    ) -> None:
        """Fill row rows[i] with matchers[i]'s mask.

        bitmask_pointer: the address of a C-contiguous int32 [num_rows, row_bytes // 4]
        buffer that stays alive and untouched by others until this returns.
        """
        if len(matchers) != len(rows):
            raise ValueError(f"{len(matchers)} matchers for {len(rows)} rows")
        if any(not 0 <= row < num_rows for row in rows):
            raise ValueError(f"a row beyond the bitmask's {num_rows} rows")
        if len(matchers) == 1:  # the executor's hand-off costs more than one mask
            matchers[0]._matcher.unsafe_compute_mask_ptr(
                bitmask_pointer + rows[0] * row_bytes, row_bytes
            )
            return
        pairs = [(m._matcher, row) for m, row in zip(matchers, rows)]
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask_pointer, row_bytes, num_rows)
