"""Speculative decoding: who drafts, and prompt lookup (draft tokens from the sequence's
own history). The draft model's speculator is app/engine/speculative_draft.py.

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
Both rules live in `Speculator`, whatever proposes the drafts.

The scheduler drafts in two calls: `plan(seq, max_tokens)` while it walks the running
sequences (how many tokens seq will draft, so their slots and budget are taken; it may
lower the number), then `drafts(planned)` once for the whole step (the tokens: a draft
model proposes for every planned sequence in one batched forward pass per position).

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


class Speculator:
    """Decides who speculates and keeps the totals; subclasses propose the tokens.
    Engine thread only."""

    def __init__(
        self,
        num_tokens: int,
        max_batch: int,
        *,
        min_acceptance: float = 0.25,
        min_verifies: int = 3,
        reprobe_interval: int = 16,
        smoothing: float = 0.3,
    ) -> None:
        if num_tokens < 1:
            raise ValueError("need num_tokens >= 1")
        self.num_tokens = num_tokens  # k: most tokens drafted for one sequence per step
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

    def plan(self, seq: Sequence, max_tokens: int) -> int:
        """How many tokens (at most max_tokens) seq drafts this step; 0 when it does not
        speculate now (grammar-constrained, paused, nothing to propose). The scheduler
        may lower it (free blocks) before `drafts`."""
        max_tokens = min(max_tokens, self.num_tokens)
        if max_tokens < 1 or seq.constraint_matcher is not None:
            return 0
        state = self._states.get(seq.seq_id)
        if state is None:
            state = self._states[seq.seq_id] = _SeqState()
        if state.steps_to_skip > 0:
            state.steps_to_skip -= 1
            return 0
        return self._plan(seq, max_tokens)

    def _plan(self, seq: Sequence, max_tokens: int) -> int:
        raise NotImplementedError

    def drafts(self, planned: SequenceOf[tuple[Sequence, int]]) -> list[tuple[int, ...]]:
        """The draft tokens of this step's planned sequences, exactly the planned number
        each (1 or more), in order. Called once at the end of every step that speculates
        (planned may be empty): what `plan` set aside for the step ends here."""
        raise NotImplementedError

    def record(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        """A verify step's outcome for seq (before its kept tokens are appended): update
        its acceptance and the totals."""
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

    def preempted(self, seq: Sequence) -> None:
        """seq gave its KV blocks back (it is recomputed later); its acceptance stays."""

    def release(self, seq_id: int) -> None:
        """Forget a finished sequence."""
        self._states.pop(seq_id, None)


class NgramSpeculator(Speculator):
    """Proposes prompt-lookup drafts. Engine thread only."""

    def __init__(self, num_tokens: int, min_n: int, max_n: int, max_batch: int, **rules) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError("need 1 <= min_n <= max_n")
        super().__init__(num_tokens, max_batch, **rules)
        self.min_n = min_n
        self.max_n = max_n
        self._indexes: dict[int, NgramIndex] = {}
        self._proposals: dict[int, list[int]] = {}  # by seq_id: this step's lookups

    def _plan(self, seq: Sequence, max_tokens: int) -> int:
        index = self._indexes.get(seq.seq_id)
        if index is None:
            index = self._indexes[seq.seq_id] = NgramIndex(self.min_n, self.max_n)
        proposal = index.propose(seq.all_token_ids, max_tokens)
        self._proposals[seq.seq_id] = proposal
        return len(proposal)

    def drafts(self, planned: SequenceOf[tuple[Sequence, int]]) -> list[tuple[int, ...]]:
        found = [tuple(self._proposals[seq.seq_id][:num]) for seq, num in planned]
        self._proposals.clear()
        return found

    def propose(self, seq: Sequence, max_tokens: int) -> tuple[int, ...]:
        """plan then drafts for one sequence: its draft, () when it does not speculate."""
        num = self.plan(seq, max_tokens)
        return self.drafts([(seq, num)])[0] if num else ()

    def release(self, seq_id: int) -> None:
        super().release(seq_id)
        self._indexes.pop(seq_id, None)
