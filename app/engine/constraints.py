"""The engine's side of structured outputs: each sequence's grammar matcher, advanced with
every token it samples (the runner's sampler reads the matchers' masks before sampling).

Pure bookkeeping, no torch: the matcher objects come from params.constraint.
"""

from __future__ import annotations

import dataclasses

from app.core import FinishReason, Sequence
from app.engine.scheduler import Scheduler, SeqUpdate


def start_matcher(seq: Sequence) -> None:
    """Give a new sequence its own matcher at the start of its grammar (if it has one)."""
    constraint = seq.params.constraint
    seq.constraint_matcher = constraint.new_matcher() if constraint is not None else None


def advance_matchers(
    scheduler: Scheduler, updates: list[SeqUpdate]
) -> tuple[list[SeqUpdate], list[tuple[Sequence, str]]]:
    """Feed each constrained sequence's new token to its matcher.

    A grammar that is complete and allows nothing more finishes its sequence (STOP), so
    no step is spent sampling the EOS it would force. Returns the updates (with those
    finishes) and the sequences whose token the grammar rejected, with the reason: a
    bug, never expected, since the sampler only draws allowed tokens.
    """
    kept: list[SeqUpdate] = []
    rejected: list[tuple[Sequence, str]] = []
    for update in updates:
        seq, matcher = update.seq, update.seq.constraint_matcher
        if matcher is None or update.finish_reason is FinishReason.LENGTH:
            kept.append(update)  # a length stop: the output ends where it is
            continue
        if not matcher.advance(update.output.token_id):
            rejected.append(
                (seq, f"the grammar rejected token {update.output.token_id}: {matcher.error}")
            )
            continue
        if update.finish_reason is None and matcher.is_finished:
            scheduler.finish(seq, FinishReason.STOP)
            update = dataclasses.replace(update, finish_reason=FinishReason.STOP)
        kept.append(update)
    return kept, rejected
