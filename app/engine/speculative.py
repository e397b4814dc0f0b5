"""Speculative decoding by prompt lookup: draft tokens from the sequence's own history.

A decoding sequence whose last few tokens (an n-gram, longest n first) occurred earlier
in its prompt or output is guessed to continue as it did there: the tokens that
followed become its draft. The step computes the last known token and the draft
together (1 + k query rows, like a small prefill chunk) and samples a token at every
one of those rows; the scheduler then keeps the longest prefix of the draft that the
model's own samples confirm, plus the model's token after it (`accepted_prefix`).

Lossless: each kept token is exactly the token the model samples at that position
given the tokens before it (the same logits bit for bit, with lamina's row-invariant
kernels, and the same seeded draw), so the output is the output without speculation.

Speculation switches itself off for a sequence whose drafts are mostly rejected (an
exponential moving average of its acceptance rate below `min_acceptance`), trying again
every `reprobe_interval` of its steps, and for a whole step where more sequences decode
than `max_batch` (the step is then compute bound: draft rows cost as much as any).

Pure Python, no torch: owned by the scheduler, on the engine thread.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

from app.core import SampleOutput, Sequence


def accepted_prefix(drafts: SequenceOf[int], sample: SampleOutput) -> list[SampleOutput]:
    """The samples to keep from a verify step: the first, then each next one while the
    sample before it equals its draft token. 1 to len(drafts) + 1 of them."""
    kept = [sample]
    for draft, following in zip(drafts, sample.after_drafts):
        if kept[-1].token_id != draft:
            break
        kept.append(following)
    return kept


class NgramIndex:
    """Where each n-gram of a growing token list last occurred, for min_n <= n <= max_n.

    `positions[n][ngram]` is the index just after the latest occurrence of `ngram` that
    has a token after it, so looking up the list's own last n tokens finds an earlier
    occurrence, never itself. Tokens are only ever appended (the engine never takes an
    output token back), so the index grows incrementally.
    """

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self.positions: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(min_n, max_n + 1)
        }
        self.num_indexed = 0  # positions p < this have their n-grams ending at p indexed

    def extend(self, tokens: SequenceOf[int]) -> None:
        """Index the n-grams that now have a following token (tokens: the whole list)."""
        for position in range(self.num_indexed, len(tokens)):
            for n, table in self.positions.items():
                if position >= n:
                    table[tuple(tokens[position - n : position])] = position
        self.num_indexed = len(tokens)

    def propose(self, tokens: SequenceOf[int], max_tokens: int) -> list[int]:
        """Up to max_tokens tokens that followed the latest earlier occurrence of the
        list's last n tokens, longest n first; [] when none occurred."""
        self.extend(tokens)
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(tokens) <= n:
                continue
            start = self.positions[n].get(tuple(tokens[len(tokens) - n :]))
            if start is not None:
                return _continuation(tokens, start, max_tokens)
        return []


def _continuation(tokens: SequenceOf[int], start: int, length: int) -> list[int]:
    """`length` tokens from tokens[start] on; past the end of the list the text is taken
    to repeat with the period it just showed (the draft's own tokens come again)."""
    draft: list[int] = []
    for position in range(start, start + length):
        past_end = position - len(tokens)
        draft.append(tokens[position] if past_end < 0 else draft[past_end])
    return draft


@dataclass
class _SeqState:
    index: NgramIndex
    acceptance: float = 0.0  # moving average of accepted / drafted per verify step
    num_verifies: int = 0
    steps_to_skip: int = 0  # speculation paused for this many more of its steps


@dataclass
class SpeculationStats:
    """Totals since start (Prometheus counters read them)."""

    num_drafts: int = 0  # verify steps: a sequence computed a draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # [j]: drafts whose token j was accepted (so [0] >= [1] >= ...)
    accepted_per_position: list[int] = field(default_factory=list)


class NgramSpeculator:
    """Proposes prompt-lookup drafts and decides who speculates. Engine thread only."""

    def __init__(
        self,
        num_tokens: int,
        min_n: int,
        max_n: int,
        max_batch: int,
        *,
        min_acceptance: float = 0.25,
        min_verifies: int = 3,
        reprobe_interval: int = 16,
        smoothing: float = 0.3,
    ) -> None:
        if num_tokens < 1 or not 1 <= min_n <= max_n:
            raise ValueError("need num_tokens >= 1 and 1 <= min_n <= max_n")
        self.num_tokens = num_tokens  # k: most tokens drafted for one sequence per step
        self.min_n = min_n
        self.max_n = max_n
        self.max_batch = max_batch  # more decoding sequences than this: nobody speculates
        self.min_acceptance = min_acceptance
        self.min_verifies = min_verifies
        self.reprobe_interval = reprobe_interval
        self.smoothing = smoothing
        self.stats = SpeculationStats(accepted_per_position=[0] * num_tokens)
        self._states: dict[int, _SeqState] = {}

    def step_allows(self, num_decoding: int) -> bool:
        """Whether a step with this many decoding sequences speculates at all."""
        return num_decoding <= self.max_batch

    def propose(self, seq: Sequence, max_tokens: int) -> tuple[int, ...]:
        """A draft of at most max_tokens tokens to follow seq's last token; () when seq
        does not speculate now (grammar-constrained, paused, nothing matched)."""
        max_tokens = min(max_tokens, self.num_tokens)
        if max_tokens < 1 or seq.constraint_matcher is not None:
            return ()
        state = self._states.get(seq.seq_id)
        if state is None:
            state = self._states[seq.seq_id] = _SeqState(NgramIndex(self.min_n, self.max_n))
        if state.steps_to_skip > 0:
            state.steps_to_skip -= 1
            return ()
        return tuple(state.index.propose(seq.all_token_ids, max_tokens))

    def record(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        """A verify step's outcome for seq: update its acceptance and the totals."""
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_drafted
        stats.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            stats.accepted_per_position[position] += 1
        seq.num_draft_tokens += num_drafted
        seq.num_accepted_draft_tokens += num_accepted
        state = self._states.get(seq.seq_id)
        if state is None:
            return
        rate = num_accepted / num_drafted
        if state.num_verifies == 0:
            state.acceptance = rate
        state.acceptance += self.smoothing * (rate - state.acceptance)
        state.num_verifies += 1
        if state.num_verifies >= self.min_verifies and state.acceptance < self.min_acceptance:
            state.steps_to_skip = self.reprobe_interval  # then one probe, judged alone
            state.num_verifies = self.min_verifies - 1

    def release(self, seq_id: int) -> None:
        """Forget a finished sequence."""
        self._states.pop(seq_id, None)
