"""Token masks of the constrained rows of a batch, computed while the model runs.

The runner starts the masks before the forward pass; llguidance computes them in its
own threads without the GIL, so they overlap the model's matmuls; the sampler waits
for them only when it needs them. One preallocated int32 bitmask, one row per
constrained sequence: bit t of a row allows token t.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from app.core import ConstraintMatcherLike
from app.structured import MaskFiller, bitmask_words


@dataclass(frozen=True)
class TokenBitmask:
    """What the sampler applies: rows[i] of its logits may only take the tokens of words[i]."""

    rows: list[int]  # sampler rows (of the [S, vocab] logits) that carry a constraint
    words: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32


class PendingMasks:
    """Masks being computed; `wait` returns them once written."""

    def __init__(self, rows: list[int], words: torch.Tensor, done: Future | None) -> None:
        self._rows, self._words, self._done = rows, words, done

    def settle(self) -> None:
        """Wait until no worker writes into the buffer any more, ignoring its outcome."""
        if self._done is not None:
            self._done.exception()

    def wait(self) -> TokenBitmask:
        if self._done is not None:
            self._done.result()  # re-raises a failure of the mask computation
        return TokenBitmask(self._rows, self._words)


class ConstraintMasks:
    """Owns the bitmask buffer and the mask workers of one runner (engine thread only)."""

    def __init__(self, vocab_size: int, max_rows: int = 64, overlap: bool = True) -> None:
        self.num_words = bitmask_words(vocab_size)
        self.overlap = overlap
        self.max_rows = max_rows
        # Made at the first constrained step: a server that never sees a constraint
        # starts no mask threads and holds no bitmask.
        self._buffer: torch.Tensor | None = None
        self._filler: MaskFiller | None = None
        self._thread: ThreadPoolExecutor | None = None

    def start(
        self, constrained: SequenceOf[tuple[int, ConstraintMatcherLike]]
    ) -> PendingMasks | None:
        """Begin the masks of (sampler row, matcher) pairs; None when no row is constrained.

        The buffer is reused by the next step: wait on this one before starting another.
        """
        if not constrained:
            return None
        if self._filler is None:
            self._filler = MaskFiller()
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lamina-masks")
        if self._buffer is None or len(constrained) > self._buffer.shape[0]:
            num_rows = max(len(constrained), self.max_rows)
            self._buffer = torch.zeros(num_rows, self.num_words, dtype=torch.int32)
        words = self._buffer[: len(constrained)]  # [C, W], C-contiguous
        rows = [row for row, _ in constrained]
        matchers = [matcher for _, matcher in constrained]
        args = (
            matchers,
            list(range(len(matchers))),
            words.data_ptr(),
            self.num_words * 4,
            len(matchers),
        )
        if not self.overlap:
            self._filler.fill(*args)
            return PendingMasks(rows, words, None)
        return PendingMasks(rows, words, self._thread.submit(self._filler.fill, *args))
