"""Token-budget scheduler: continuous batching with chunked prefill and preemption.

There are no prefill and decode phases. Each step, every scheduled sequence catches
`num_computed_tokens` up towards `num_tokens` (prompt + output so far) by as many tokens
as the step's budget allows, so a long prompt is simply computed in chunks over several
steps while other sequences keep decoding. Running sequences go first, in admission
order, then waiting ones in turns between clients (`fair_order`).

Clients take turns (Sequence.client: the API key or address admission counted the work
against). The next waiting sequence to start belongs to the client with the fewest
sequences running, first come first served within a client and between equals; with a
single client this is the waiting queue's own order. So a client whose many sequences
fill the queue does not make another's single sequence wait behind all of them: it gets
the next free slot.

KV blocks are allocated lazily: only what the step computes (positions up to
num_computed_tokens + num_new_tokens), not the whole prompt or max_tokens up front. That
admits as many sequences as the cache holds right now, at the price of preemption when
they grow: the most recently admitted running sequence gives its blocks back and is
recomputed later from prompt + output (its full blocks usually survive in the prefix
cache, so recomputing is cheap).

Decodes come first. While some sequence is decoding (it needs one token per step),
the prompt tokens a step computes are capped at `max_prefill_tokens_while_decoding`:
a step's duration grows with its tokens, and every decoding stream waits for the whole
step, so a 512-token prefill chunk would stall every stream's next token for the time
of ~512 tokens. Capped, a long prompt is computed over more (short) steps: its first
token comes later, the streams already running keep a flat inter-token latency. While
other prompts wait, one sequence's chunk takes at most half of the capped budget, so a
short prompt is not stuck behind every chunk of a long one (which would also leave
fewer streams decoding). A prefill chunk of a sequence listed before decoding ones
never takes the budget those decodes need. With nobody decoding (start-up, bursts),
prefill gets the whole budget, first come first served.

Priorities (app/engine/priority.py): waiting sequences start by effective priority
(their priority improved by ageing), then in client turns within a level. The running
list is kept in (running priority, admission) order, so the step serves the most urgent
first and the victims of memory pressure come from its end: the least urgent, most
recently started. A waiting sequence that cannot start (no free slot or blocks) may
preempt running ones of strictly worse priority, when that makes room for it. With
every sequence at one priority, all of this is the plain arrival order above.

Speculative decoding (app/engine/speculative.py): a decoding sequence may compute a
draft of guessed tokens after its last one, to verify them in this step. Draft tokens
are budgeted like prompt tokens (they come out of the prefill budget, after the decode
tokens' reservation), never make a sequence preempt another (a draft shrinks to the
blocks that are free), and are rolled back when rejected: `update` counts only the
confirmed tokens as computed and frees the blocks past them, which were never
registered in the prefix cache (only computed, confirmed blocks are).

A sequence that cannot fit even in the whole cache is failed instead of blocking
everyone: it is finished with FinishReason.ERROR, its blocks freed, and returned once by
`pop_failed()` so the engine can tell its caller.

Pure Python; never reads a clock: the engine passes its time to `schedule(now)`.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

from app.core import (
    FinishReason,
    SampleOutput,
    ScheduledBatch,
    ScheduledSeq,
    Sequence,
    SequenceStatus,
)
from app.engine.block_manager import BlockManager
from app.engine.priority import effective_priority, preemption_victims, priority_levels
from app.engine.speculative import Speculator, accepted_prefix
from app.engine.stopping import check_stop, default_criteria


@dataclass
class SeqUpdate:
    """What one step did to one sequence that sampled a token (or ended its prompt-only
    run: max_tokens 0)."""

    seq: Sequence
    output: SampleOutput | None  # the token sampled this step; None: prompt-only, done
    finish_reason: FinishReason | None  # token-level stop: EOS, stop token id, length
    stop_reason: int | None  # the stop_token_ids entry that matched, if any
    # len(seq.output_token_ids) right after this token was appended (a verify step
    # appends several; a stop string in one ends the output there)
    num_output_tokens: int = 0


def is_decoding(seq: Sequence) -> bool:
    """Past its prompt, with one token to compute: it samples its next token this step."""
    return bool(seq.output_token_ids) and seq.num_tokens - seq.num_computed_tokens == 1


def fair_order(waiting: Iterable[Sequence], running: Iterable[Sequence]) -> list[Sequence]:
    """Waiting sequences in the order they may start: clients take turns, the one with
    the fewest sequences running (counting those placed before it in this order) first,
    ties to the client whose sequence comes first in `waiting`; within a client, the
    order of `waiting`. One client (or none named): `waiting` as it is."""
    by_client: dict[str, deque[Sequence]] = {}
    for seq in waiting:
        by_client.setdefault(seq.client, deque()).append(seq)
    if len(by_client) <= 1:
        return [seq for queue in by_client.values() for seq in queue]
    num_running = Counter(seq.client for seq in running)
    turns = [(num_running[client], rank, client) for rank, client in enumerate(by_client)]
    heapq.heapify(turns)
    order: list[Sequence] = []
    while turns:
        count, rank, client = heapq.heappop(turns)
        queue = by_client[client]
        order.append(queue.popleft())
        if queue:
            heapq.heappush(turns, (count + 1, rank, client))
    return order


class _StepBudget:
    """The tokens one step may still schedule: `total` for everything, `prefill` for
    prompt (or recompute) chunks, `max_chunk` for one sequence's prompt chunk. Decodes
    not yet scheduled keep their token reserved, so a prefill chunk listed before them
    cannot take it."""

    def __init__(self, max_num_batched_tokens: int, running: list[Sequence]) -> None:
        self.total = max_num_batched_tokens
        self.prefill = max_num_batched_tokens
        self.max_chunk = max_num_batched_tokens
        self.num_decodes_left = sum(1 for seq in running if is_decoding(seq))

    def grant(self, seq: Sequence, decoding: bool) -> int:
        """How many of seq's uncomputed tokens this step can take."""
        num_left = seq.num_tokens - seq.num_computed_tokens
        if decoding:
            return min(num_left, self.total)
        available = min(self.prefill, self.max_chunk, self.total - self.num_decodes_left)
        return min(num_left, available)

    def draft_allowance(self) -> int:
        """Draft tokens a decoding sequence may add now: prefill budget, beyond every
        decode token still reserved (its own included)."""
        return max(0, min(self.prefill, self.total - self.num_decodes_left))

    def spend(self, num_tokens: int, decoding: bool, num_drafts: int = 0) -> None:
        """num_tokens: all the sequence computes, its num_drafts draft tokens included."""
        self.total -= num_tokens
        if decoding:
            self.num_decodes_left -= 1
        prompt_like = num_drafts if decoding else num_tokens
        self.prefill = min(self.prefill - prompt_like, self.total)


class Scheduler:
    """Decides, step by step, which sequences advance and by how many tokens."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: frozenset[int],
        max_prefill_tokens_while_decoding: int | None = None,
        priority_ageing_s: float | None = None,
        speculator: Speculator | None = None,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        cap = max_prefill_tokens_while_decoding
        if cap is not None and cap < 1:
            raise ValueError("max_prefill_tokens_while_decoding must be at least 1 (or None)")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # None: prefill may take whatever the decodes leave of the step's token budget.
        self.max_prefill_tokens_while_decoding = cap
        self.max_model_len = max_model_len
        # A waiting sequence's priority improves by 1 per this many seconds (None: never).
        self.priority_ageing_s = priority_ageing_s
        self._now: float | None = None  # the engine's time at this step (ageing)
        self.speculator = speculator  # None: no speculative decoding
        self.eos_token_ids = frozenset(eos_token_ids)
        self.stop_criteria = default_criteria(self.eos_token_ids, max_model_len)
        # Arrival order (preempted ones re-enter at the front); started in fair_order.
        self.waiting: deque[Sequence] = deque()
        # (running priority, admission) order: the last is preempted first
        self.running: list[Sequence] = []
        self._failed: list[Sequence] = []  # finished with ERROR, not yet reported
        self.num_preemptions = 0

    # ------------------------------------------------------------------- queues
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Enqueue a WAITING sequence at the back of the queue."""
        if seq.status is not SequenceStatus.WAITING:
            raise ValueError(f"sequence {seq.seq_id} is {seq.status.value}, not waiting")
        seq.waiting_since = seq.arrival_time
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence now (stop string, error): free its blocks, forget it. Idempotent."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if self.speculator is not None:
            self.speculator.release(seq.seq_id)

    def abort_request(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of a request with ABORT; returns them."""
        aborted = [s for s in (*self.running, *self.waiting) if s.request_id == request_id]
        for seq in aborted:
            self.finish(seq, FinishReason.ABORT)
        return aborted

    def pop_failed(self) -> list[Sequence]:
        """Sequences the scheduler failed since the last call (already FINISHED, ERROR).

        Today the only cause is a sequence that needs more KV blocks than the whole cache.
        """
        failed, self._failed = self._failed, []
        return failed

    # ----------------------------------------------------------------- schedule
    def schedule(self, now: float | None = None) -> ScheduledBatch:
        """Plan one step under the token and sequence budgets; may preempt and fail seqs.
        `now` is the engine's time (seconds), for ageing; None: no ageing this step."""
        self._now = now
        preempted = self._preempt_for_priority()
        num_preempted_for_priority = len(preempted)
        budget = _StepBudget(self.max_num_batched_tokens, self.running)
        cap = self.max_prefill_tokens_while_decoding
        if cap is not None and budget.num_decodes_left > 0:
            budget.prefill = min(budget.prefill, cap)
            if self.waiting and len(self.running) < self.max_num_seqs:
                # Share the capped budget: a long prompt being chunked takes at most half,
                # so a short prompt behind it starts now instead of after all its chunks.
                budget.max_chunk = max(1, budget.prefill // 2)
        scheduled: list[ScheduledSeq] = []
        speculator = self.speculator
        speculates = speculator is not None and speculator.step_allows(budget.num_decodes_left)
        self._schedule_running(budget, scheduled, preempted, speculates)
        # Admitting right after preempting would hand the freed blocks to a newcomer and
        # preempt again next step; let the running ones grow first (unless the blocks
        # were freed for the newcomer: a preemption for priority).
        if len(preempted) == num_preempted_for_priority:
            # Those preempted for priority sit out this step: room was made for another.
            self._schedule_waiting(budget, scheduled, held_back=preempted)
        num_tokens = sum(s.num_new_tokens for s in scheduled)
        return ScheduledBatch(seqs=scheduled, num_batched_tokens=num_tokens, preempted=preempted)

    def _schedule_running(
        self,
        budget: _StepBudget,
        scheduled: list[ScheduledSeq],
        preempted: list[Sequence],
        speculates: bool = False,
    ) -> None:
        index = 0
        planned: list[tuple[ScheduledSeq, int]] = []  # (its share, tokens it drafts)
        while index < len(self.running) and budget.total > 0:
            seq = self.running[index]
            decoding = is_decoding(seq)
            num_new = budget.grant(seq, decoding)
            if num_new <= 0:  # nothing to compute, or no prefill budget left this step
                index += 1
                continue
            num_preempted = len(preempted)
            if not self._make_room(seq, num_new, preempted):
                break  # seq itself left the running list, and it was the last one
            if len(preempted) > num_preempted:  # victims may have been decoding
                budget.num_decodes_left = sum(1 for s in self.running[index:] if is_decoding(s))
            num_drafts = self._plan_draft(seq, budget) if decoding and speculates else 0
            num_new += num_drafts
            self.block_manager.append_slots(seq, num_new)
            scheduled.append(self._scheduled(seq, num_new, num_drafts))
            if num_drafts:
                planned.append((scheduled[-1], num_drafts))
            budget.spend(num_new, decoding, num_drafts)
            index += 1
        if speculates:
            self._fill_drafts(planned)

    def _plan_draft(self, seq: Sequence, budget: _StepBudget) -> int:
        """How many tokens decoding seq drafts, within the step's budget, its max_tokens
        (the token after the draft is sampled too) and the free blocks (never preempting
        for it)."""
        max_drafts = min(budget.draft_allowance(), seq.max_tokens - len(seq.output_token_ids) - 1)
        num_drafts = self.speculator.plan(seq, max_drafts)
        while num_drafts and not self.block_manager.can_append_slots(seq, 1 + num_drafts):
            num_drafts -= 1
        return num_drafts

    def _fill_drafts(self, planned: list[tuple[ScheduledSeq, int]]) -> None:
        """The planned drafts' tokens, proposed for the whole step at once (every step
        that speculates, even with none planned: it ends the speculator's planning)."""
        tokens = self.speculator.drafts([(item.seq, num) for item, num in planned])
        for (item, num), draft in zip(planned, tokens, strict=True):
            if len(draft) != num:
                raise RuntimeError(f"the speculator drafted {len(draft)} tokens, not {num}")
            item.draft_token_ids = draft

    def _make_room(self, seq: Sequence, num_new: int, preempted: list[Sequence]) -> bool:
        """Preempt the most recently admitted sequences until seq can grow by num_new.

        Victims come from the end of the running list, after seq, so a sequence already
        scheduled this step is never taken. Returns False when seq itself had to go:
        preempted, or failed if it alone needs more blocks than the whole cache.
        """
        while not self.block_manager.can_append_slots(seq, num_new):
            victim = self.running[-1]
            if victim is seq and self._never_fits(seq.num_computed_tokens + num_new):
                self._fail(seq)
                return False
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(
        self, budget: _StepBudget, scheduled: list[ScheduledSeq], held_back: list[Sequence]
    ) -> None:
        manager = self.block_manager
        queue = self._start_order()
        for position, seq in enumerate(queue):
            if budget.prefill <= 0 or len(self.running) >= self.max_num_seqs:
                return
            if seq in held_back or not self._dependency_ready(seq):
                continue  # its prompt's blocks are still being computed by a sibling
            if self._never_fits(seq.num_tokens):
                self.waiting.remove(seq)
                self._fail(seq)
                continue
            # Prompt outputs over every position need every position computed here.
            cached_block_ids = [] if seq.needs_every_prompt_row else manager.match_prefix(seq)
            num_cached = len(cached_block_ids) * manager.block_size
            # The last in line may take what is left; others leave room for the rest.
            max_chunk = budget.prefill if position == len(queue) - 1 else budget.max_chunk
            num_new = min(seq.num_tokens - num_cached, budget.prefill, max_chunk)
            if not manager.can_allocate(seq, num_cached + num_new, cached_block_ids):
                return  # nobody overtakes the next in turn for blocks
            manager.allocate(seq, num_cached + num_new, cached_block_ids)
            self._admit(seq, num_cached)
            scheduled.append(self._scheduled(seq, num_new))
            budget.spend(num_new, decoding=False)

    def _start_order(self) -> list[Sequence]:
        """Waiting sequences in the order they may start: by effective priority, then
        in turns between clients (`fair_order`) within a level."""
        levels = priority_levels(list(self.waiting), self._now, self.priority_ageing_s)
        return [seq for level in levels for seq in fair_order(level, self.running)]

    def _preempt_for_priority(self) -> list[Sequence]:
        """Preempt running sequences of worse priority when the next waiting sequence
        cannot start without their slot or blocks, and can with them. Returns them."""
        if not self.running or not self.waiting:
            return []
        # Only a more urgent (own) priority preempts: the common case ends here.
        if min(seq.priority for seq in self.waiting) >= self.running[-1].running_priority:
            return []
        head = next((s for s in self._start_order() if self._dependency_ready(s)), None)
        if head is None or self._never_fits(head.num_tokens):
            return []
        victims = preemption_victims(self.running, head.priority)
        if not victims or not self._blocked(head) or not self._room_with(head, victims):
            return []
        preempted = []
        for victim in victims:
            self._preempt(victim)
            preempted.append(victim)
            if not self._blocked(head):
                break
        return preempted

    def _first_chunk(self, seq: Sequence) -> tuple[list[int], int]:
        """seq's cached prefix blocks and the tokens its first step would hold at most."""
        cached_block_ids = self.block_manager.match_prefix(seq)
        num_cached = len(cached_block_ids) * self.block_manager.block_size
        chunk = self.max_prefill_tokens_while_decoding or self.max_num_batched_tokens
        return cached_block_ids, num_cached + min(seq.num_tokens - num_cached, chunk)

    def _blocked(self, seq: Sequence) -> bool:
        """seq could not start now: no free slot, or no blocks for its first chunk."""
        if len(self.running) >= self.max_num_seqs:
            return True
        cached_block_ids, num_tokens = self._first_chunk(seq)
        return not self.block_manager.can_allocate(seq, num_tokens, cached_block_ids)

    def _room_with(self, seq: Sequence, victims: list[Sequence]) -> bool:
        """Whether preempting every one of `victims` would let seq start (blocks held by
        a victim alone come back; shared ones are not counted)."""
        manager = self.block_manager
        if len(self.running) - len(victims) >= self.max_num_seqs:
            return False
        cached_block_ids, num_tokens = self._first_chunk(seq)
        needed = manager.num_blocks_for(num_tokens) - len(cached_block_ids)
        needed += manager.num_revived(cached_block_ids)
        freed = sum(
            1 for victim in victims for b in victim.block_table if manager.ref_count(b) == 1
        )
        return needed <= manager.num_free_blocks + freed

    def _dependency_ready(self, seq: Sequence) -> bool:
        """n > 1: wait until the sibling computed the shared prompt (or finished)."""
        parent = seq.wait_for_seq
        if parent is None or not self.block_manager.enable_prefix_caching:
            return True
        return parent.is_finished or parent.num_computed_tokens >= parent.num_prompt_tokens

    def _admit(self, seq: Sequence, num_cached: int) -> None:
        self.waiting.remove(seq)
        if seq.num_preemptions == 0:  # usage reports the first admission's prompt hits
            seq.num_cached_tokens = min(num_cached, seq.num_prompt_tokens)
        seq.num_computed_tokens = num_cached
        seq.wait_for_seq = None  # shared once; a later preemption need not wait again
        seq.status = SequenceStatus.RUNNING
        # Aged no further than the most urgent priority waiting (with seq, which leaves).
        best = min((s.priority for s in self.waiting), default=seq.priority)
        seq.running_priority = effective_priority(
            seq, self._now, self.priority_ageing_s, min(best, seq.priority)
        )
        # After every running sequence of the same or a more urgent priority.
        position = bisect.bisect_right(
            self.running, seq.running_priority, key=lambda s: s.running_priority
        )
        self.running.insert(position, seq)

    @staticmethod
    def _scheduled(seq: Sequence, num_new: int, num_drafts: int = 0) -> ScheduledSeq:
        """seq's share; its draft's tokens (num_drafts of them) come with _fill_drafts."""
        reaches_end = seq.num_computed_tokens + num_new == seq.num_tokens + num_drafts
        # A prompt-only sequence (max_tokens 0) computes its prompt and samples nothing.
        samples = reaches_end and seq.max_tokens > 0
        return ScheduledSeq(seq, num_new, samples)

    def _never_fits(self, num_tokens: int) -> bool:
        return self.block_manager.num_blocks_for(num_tokens) > self.block_manager.num_blocks

    def _preempt(self, seq: Sequence) -> None:
        """Give seq's blocks back; it is recomputed later from prompt + output."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if self.speculator is not None:
            self.speculator.preempted(seq)
        if self._now is not None:  # ageing starts again: it waits anew
            seq.waiting_since = self._now
        self.waiting.appendleft(seq)

    def _fail(self, seq: Sequence) -> None:
        self.finish(seq, FinishReason.ERROR)
        self._failed.append(seq)

    # ------------------------------------------------------------------- update
    def update(self, batch: ScheduledBatch, outputs: list[SampleOutput | None]) -> list[SeqUpdate]:
        """Apply a step's results: advance computed tokens, append samples, check stops.

        Returns one SeqUpdate per sequence that sampled or finished a prompt-only run
        (max_tokens 0). Sequences that hit a token-level
        stop are FINISHED, their blocks freed (their full blocks stay in the prefix cache).
        """
        if len(outputs) != len(batch.seqs):
            raise ValueError(f"{len(outputs)} outputs for {len(batch.seqs)} scheduled sequences")
        updates: list[SeqUpdate] = []
        for scheduled, output in zip(batch.seqs, outputs):
            seq = scheduled.seq
            if seq.is_finished:  # ended between schedule and update (abort, error)
                continue
            if scheduled.draft_token_ids:
                updates.extend(self._verify(scheduled, output))
                continue
            seq.num_computed_tokens += scheduled.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            if seq.max_tokens == 0 and seq.num_computed_tokens == seq.num_tokens:
                self.finish(seq, FinishReason.LENGTH)  # its prompt is done: nothing to sample
                updates.append(SeqUpdate(seq, None, FinishReason.LENGTH, None))
                continue
            if not scheduled.sample:
                continue
            if output is None:
                raise ValueError(f"no sample for sequence {seq.seq_id} that should sample")
            seq.output_token_ids.append(output.token_id)
            decision = check_stop(seq, self.stop_criteria)
            num_output = len(seq.output_token_ids)
            if decision is None:
                updates.append(SeqUpdate(seq, output, None, None, num_output))
                continue
            self.finish(seq, decision.reason)
            updates.append(
                SeqUpdate(seq, output, decision.reason, decision.stop_token_id, num_output)
            )
        return updates

    def _verify(self, scheduled: ScheduledSeq, output: SampleOutput | None) -> list[SeqUpdate]:
        """Apply a verify step: append the confirmed samples one by one, each checked for
        a stop exactly as without speculation; count as computed only the positions
        whose tokens are now confirmed; free the blocks past them."""
        seq, drafts = scheduled.seq, scheduled.draft_token_ids
        if output is None:
            raise ValueError(f"no sample for sequence {seq.seq_id} that verified a draft")
        kept = accepted_prefix(drafts, output)
        self.speculator.record(seq, len(drafts), len(kept) - 1)
        updates: list[SeqUpdate] = []
        decision = None
        for sample in kept:
            seq.output_token_ids.append(sample.token_id)
            decision = check_stop(seq, self.stop_criteria)
            num_output = len(seq.output_token_ids)
            if decision is not None:
                reason, stop_id = decision.reason, decision.stop_token_id
                updates.append(SeqUpdate(seq, sample, reason, stop_id, num_output))
                break
            updates.append(SeqUpdate(seq, sample, None, None, num_output))
        # The last known token and the drafts now confirmed by the tokens after them
        seq.num_computed_tokens = seq.num_tokens - 1
        self.block_manager.cache_full_blocks(seq)
        if decision is not None:
            self.finish(seq, decision.reason)
        else:
            self.block_manager.truncate(seq, seq.num_computed_tokens)
        return updates
