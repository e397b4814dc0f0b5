"""Speculative decoding with a draft model: a small model that shares the served model's
tokenizer proposes each draft, greedily (the argmax of its own logits).

The draft model is a second Runner (app/model/runner.py loads it, app/model/draft.py
checks its vocabulary) with its own small paged KV cache, in the same engine thread.
Each speculating sequence has a shadow `Sequence` here: the same prompt, its output
followed by the draft tokens being proposed, and its own block table in the draft's
cache (a BlockManager of its own).

Prefix caching (when the served model has it): a new shadow starts from the draft
blocks of the longest cached prefix of its prompt, so a system prompt or a chat's
earlier turns are not computed again by the draft either. Only blocks full of
confirmed tokens are registered (after a verify step's rollback, and after catching
up), never blocks holding draft tokens that may be rejected: a registered block's K/V
are always those of the tokens its hash names. A step's drafts are
proposed for every planned sequence at once: one batched forward pass catches each
shadow up to its sequence's last known token and samples draft token 0 there, then
one pass per further draft position computes the previous draft token and samples the
next (sequences with shorter drafts drop out).

K/V state and rollback. After a verify step that accepted a of the n draft tokens, the
draft's cache holds valid K/V for the sequence's confirmed tokens up to position
T + min(a, n - 1) (T: the sequence's length before the step; the draft computed its
tokens 0..n-2 at T..T+n-2, and the accepted ones are the confirmed tokens there). The
shadow is cut back to that (`BlockManager.truncate` frees the blocks past it); the next
draft catches up the one or two confirmed tokens after it. A sequence preempted,
finished or aborted drops its shadow and its draft blocks; a sequence that did not
draft for a while (paused, step too large) catches up the tokens it missed.

Catching up is bounded like a prompt: a step's first draft pass computes at most
`max_pass_tokens` tokens (the engine passes the prompt tokens a step may compute while
sequences decode). A shadow further behind than what is left of that (a sequence that
just finished a long prompt, or one back from a pause) does not draft this step; it
catches up a chunk in that pass instead, and drafts once it is close enough. Without
the bound, the first draft after a long prompt computed the whole prompt in one pass,
stalling every stream of the step for as long as an unchunked prefill.

Lossless like prompt lookup: the target verifies every draft with the same accept rule
(app/engine/speculative.py: `accepted_prefix`), so what the draft proposes only decides
how many tokens a step confirms, never which.

Pure Python, no torch: the draft model sits behind the Runner protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as SequenceOf

from app.core import SamplingParams, ScheduledBatch, ScheduledSeq, Sequence
from app.engine.block_manager import BlockManager
from app.engine.protocol import Runner
from app.engine.speculative import Speculator

logger = logging.getLogger("lamina.engine")

_GREEDY = SamplingParams(max_tokens=None, temperature=0.0)


class DraftModelSpeculator(Speculator):
    """Proposes drafts with a draft model's greedy tokens. Engine thread only."""

    def __init__(
        self,
        draft_runner: Runner,
        num_tokens: int,
        max_batch: int,
        max_pass_tokens: int = 512,
        prefix_caching: bool = True,
        **rules,
    ) -> None:
        super().__init__(num_tokens, max_batch, **rules)
        if max_pass_tokens < 1:
            raise ValueError("need max_pass_tokens >= 1")
        self.runner = draft_runner
        # A draft that computes prompt and generated tokens with different kernels (fp16
        # weights) hashes token kinds too, as the served model's cache does (engine_core)
        self.block_manager = BlockManager(
            draft_runner.num_blocks,
            draft_runner.block_size,
            enable_prefix_caching=prefix_caching,
            hash_token_kinds=getattr(draft_runner, "splits_rows", False),
        )
        self.max_pass_tokens = max_pass_tokens  # most tokens in a step's first draft pass
        self._shadows: dict[int, Sequence] = {}  # by the target sequence's seq_id
        # Planned this step, taken by `drafts`: free draft blocks, first-pass tokens, and
        # the shadows that only catch up (shadow, its sequence, tokens).
        self._num_promised_blocks = 0
        self._num_pass_tokens = 0
        self._catch_ups: list[tuple[Sequence, Sequence, int]] = []
        self.num_forward_passes = 0  # the draft model's

    def _plan(self, seq: Sequence, max_tokens: int) -> int:
        """Up to max_tokens, as many as the draft cache's free blocks allow (never
        another sequence's blocks), counting those promised to sequences planned before
        it this step; `drafts` takes them. 0 when its catch-up does not fit in what is
        left of the first pass: it catches up a chunk instead."""
        shadow = self._shadow(seq)
        behind = seq.num_tokens - shadow.num_computed_tokens  # to compute before drafting
        room = self.max_pass_tokens - self._num_pass_tokens
        if behind > room:
            self._plan_catch_up(seq, shadow, min(behind - 1, room))
            return 0
        num_drafts = max_tokens
        while num_drafts:
            if self._promise_blocks(shadow, _num_new(shadow, seq, num_drafts)):
                self._num_pass_tokens += behind
                return num_drafts
            num_drafts -= 1
        return 0

    def _plan_catch_up(self, seq: Sequence, shadow: Sequence, num_tokens: int) -> None:
        """Catch shadow up by num_tokens (never to seq's last token: drafting samples
        there) in this step's first pass, if the draft cache has the blocks."""
        if num_tokens > 0 and self._promise_blocks(shadow, num_tokens):
            self._num_pass_tokens += num_tokens
            self._catch_ups.append((shadow, seq, num_tokens))

    def _promise_blocks(self, shadow: Sequence, num_new_tokens: int) -> bool:
        """Set aside the free blocks shadow lacks for num_new_tokens more, if there are."""
        missing = self.block_manager.num_missing_blocks(shadow, num_new_tokens)
        if missing > self.block_manager.num_free_blocks - self._num_promised_blocks:
            return False
        self._num_promised_blocks += missing
        return True

    def drafts(self, planned: SequenceOf[tuple[Sequence, int]]) -> list[tuple[int, ...]]:
        """Every planned sequence's draft: one batched pass per draft position. Ends the
        step's planning (the scheduler calls it every step that speculates).

        If the draft model fails, speculation is off from then on (logged with the
        error) and this step's drafts repeat each sequence's last token: they are
        verified like any, so the output stays the output without speculation.
        """
        self._num_promised_blocks = self._num_pass_tokens = 0
        catch_ups, self._catch_ups = self._catch_ups, []
        try:
            return self._propose(planned, catch_ups)
        except Exception:  # noqa: BLE001 - the served model can go on without a draft
            logger.exception("the draft model failed: speculative decoding is off from now on")
            self.max_batch = -1  # no step speculates any more
            for seq_id in list(self._shadows):
                self._drop_shadow(seq_id)
            return [(seq.output_token_ids[-1],) * num_drafts for seq, num_drafts in planned]

    def _propose(
        self,
        planned: SequenceOf[tuple[Sequence, int]],
        catch_ups: list[tuple[Sequence, Sequence, int]],
    ) -> list[tuple[int, ...]]:
        shadows = []
        for seq, num_drafts in planned:
            shadow = self._shadows[seq.seq_id]
            self.block_manager.append_slots(shadow, _num_new(shadow, seq, num_drafts))
            shadow.output_token_ids = list(seq.output_token_ids)
            shadows.append(shadow)
        # Chunks that sample nothing, in the first pass only
        chunks = []
        for shadow, seq, num_tokens in catch_ups:
            self.block_manager.append_slots(shadow, num_tokens)
            shadow.output_token_ids = list(seq.output_token_ids)
            chunks.append(ScheduledSeq(shadow, num_tokens, sample=False))
        tokens: list[list[int]] = [[] for _ in planned]
        active = list(range(len(planned)))
        while active or chunks:
            items = [_catch_up(shadows[i]) for i in active]
            batch_items = items + chunks
            num_batched = sum(item.num_new_tokens for item in batch_items)
            outputs = self.runner.execute(ScheduledBatch(batch_items, num_batched))
            self.num_forward_passes += 1
            for item in batch_items:
                item.seq.num_computed_tokens += item.num_new_tokens
            for chunk in chunks:  # confirmed tokens only: a catch-up stops short of drafts
                self.block_manager.cache_full_blocks(chunk.seq)
            for i, item, output in zip(active, items, outputs):
                item.seq.output_token_ids.append(output.token_id)
                tokens[i].append(output.token_id)
            chunks = []
            active = [i for i in active if len(tokens[i]) < planned[i][1]]
        return [tuple(draft) for draft in tokens]

    def record(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        """Also cut seq's shadow back to the draft K/V that verification confirmed."""
        super().record(seq, num_drafted, num_accepted)
        shadow = self._shadows.get(seq.seq_id)
        if shadow is None:
            return
        # Draft token j (j < num_drafted - 1) was computed at position T + j; it holds a
        # confirmed token's K/V when the target accepted it. seq has not grown yet: T.
        num_valid = min(seq.num_tokens + min(num_accepted, num_drafted - 1), shadow.num_tokens)
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, num_valid)
        del shadow.output_token_ids[num_valid - shadow.num_prompt_tokens :]
        self.block_manager.truncate(shadow, shadow.num_computed_tokens)
        self.block_manager.cache_full_blocks(shadow)  # what it holds now is confirmed

    def preempted(self, seq: Sequence) -> None:
        """Its draft K/V go too: the draft cache is memory like the target's."""
        self._drop_shadow(seq.seq_id)

    def release(self, seq_id: int) -> None:
        super().release(seq_id)
        self._drop_shadow(seq_id)

    def _drop_shadow(self, seq_id: int) -> None:
        shadow = self._shadows.pop(seq_id, None)
        if shadow is not None:
            self.block_manager.free(shadow)
            self.runner.release([shadow.seq_id])

    def _shadow(self, seq: Sequence) -> Sequence:
        """seq's shadow, created the first time from its prompt's cached prefix, if any."""
        shadow = self._shadows.get(seq.seq_id)
        if shadow is None:
            shadow = Sequence(
                request_id=f"draft-{seq.seq_id}",
                prompt_token_ids=seq.prompt_token_ids,  # never mutated by anyone
                params=_GREEDY,
                max_tokens=seq.max_tokens,
            )
            self._start_from_cached_prefix(shadow)
            self._shadows[seq.seq_id] = shadow
        return shadow

    def _start_from_cached_prefix(self, shadow: Sequence) -> None:
        """Give a new shadow the draft blocks of its prompt's longest cached prefix, as
        computed tokens, unless reviving them (cached blocks no sequence holds leave the
        free pool) would take blocks promised to sequences planned before it."""
        manager = self.block_manager
        cached_block_ids = manager.match_prefix(shadow)
        if not cached_block_ids:
            return
        if manager.num_revived(cached_block_ids) > (
            manager.num_free_blocks - self._num_promised_blocks
        ):
            return
        num_cached = len(cached_block_ids) * manager.block_size
        manager.allocate(shadow, num_cached, cached_block_ids)
        shadow.num_computed_tokens = num_cached


def _num_new(shadow: Sequence, seq: Sequence, num_drafts: int) -> int:
    """Positions the shadow computes to draft num_drafts tokens after seq's last known
    token: up to it, then draft tokens 0..num_drafts-2 (the last is never computed)."""
    return seq.num_tokens + num_drafts - 1 - shadow.num_computed_tokens


def _catch_up(shadow: Sequence) -> ScheduledSeq:
    """The shadow's uncomputed tokens (the sequence's new confirmed tokens, or the last
    draft token), sampling the next draft token after them."""
    return ScheduledSeq(shadow, shadow.num_tokens - shadow.num_computed_tokens, sample=True)
