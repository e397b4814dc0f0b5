"""The contracts the engine depends on, implemented elsewhere (model/runner.py, tokenizer.py).

Keeping them here lets the scheduler and engine be tested with fakes, without torch.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from typing import Protocol

from app.core import PromptResult, SampleOutput, ScheduledBatch


class Runner(Protocol):
    """Runs one batched forward pass plus sampling. Owned by the engine thread."""

    block_size: int  # tokens per KV block
    num_blocks: int  # KV blocks in the preallocated cache
    max_model_len: int  # context window in tokens (prompt + output)
    # Optional (absent: False). True when prompt and generated tokens are computed by
    # different kernels, so a token's K/V depend on its kind: the prefix cache then
    # shares a block only between sequences whose tokens there have the same kinds.
    splits_rows: bool

    def execute(self, batch: ScheduledBatch) -> list[SampleOutput | None]:
        """Compute `batch` and return one entry per `batch.seqs`, in order.

        The entry is a SampleOutput where `ScheduledSeq.sample` is True, None otherwise;
        with `draft_token_ids`, its `after_drafts` holds the samples at the draft's rows.
        Reads each sequence's tokens, positions and block table; writes K/V into the
        cache slots of the new tokens. Never mutates the sequences.
        Raises on failure; the engine fails the affected requests.
        """
        ...

    def release(self, seq_ids: SequenceOf[int]) -> None:
        """Forget per-sequence state (seeded generators, penalty counts, prompt outputs
        being collected) of finished sequences."""
        ...

    # Optional (absent: requests that ask for prompt outputs fail with an error).
    def take_prompt_result(self, seq_id: int) -> PromptResult:
        """The prompt outputs a sequence asked for (params.prompt_logprobs, .pooling),
        collected over the steps that computed its prompt while `seq.needs_prompt_result`;
        called once, after the step that completed its prompt. Forgets them."""
        ...


class TokenizerLike(Protocol):
    """What the detokenizer and engine need from a tokenizer."""

    eos_token_ids: frozenset[int]

    def decode(self, token_ids: SequenceOf[int], skip_special_tokens: bool = True) -> str: ...

    def is_special(self, token_id: int) -> bool: ...
