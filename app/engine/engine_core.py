"""EngineCore: the synchronous heart of the engine. schedule -> run -> postprocess.

No threads and no asyncio here: `Engine` (engine.py) drives it from its own thread,
while tests and the offline benchmark drive it step by step, which makes arrival
patterns (staggered, simultaneous) exactly reproducible.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.config import Settings
from app.core import (
    FinishReason,
    RequestTimings,
    SampleOutput,
    SamplingParams,
    ScheduledBatch,
    Sequence,
    TokenDelta,
    Usage,
)
from app.engine.block_manager import BlockManager
from app.engine.constraints import advance_matchers, start_matcher
from app.engine.outputs import FinishInfo, PromptPart, SequenceOutput
from app.engine.protocol import Runner, TokenizerLike
from app.engine.scheduler import Scheduler, SeqUpdate
from app.engine.speculative import NgramSpeculator, SpeculationStats, Speculator
from app.engine.speculative_draft import DraftModelSpeculator

logger = logging.getLogger("lamina.engine")


class InjectedFault(RuntimeError):
    """Raised by the fault-injection test hook (Settings.fault_injection_marker)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, safe to read from any thread."""

    num_running: int = 0  # sequences holding KV blocks
    num_waiting: int = 0  # sequences queued for admission
    num_pending_requests: int = 0  # accepted, not yet seen by the engine thread
    num_blocks: int = 0
    num_free_blocks: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks referenced by live sequences
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # tokens looked up
    prefix_cache_hits: int = 0  # tokens found
    num_steps: int = 0
    # Speculative decoding totals (None: off)
    speculation: SpeculationStats | None = None


@dataclass(frozen=True)
class StepStats:
    """What one engine step did; observers (metrics) read it once per step."""

    num_seqs: int
    num_batched_tokens: int
    num_sampled: int
    num_preempted: int
    duration_s: float
    engine: EngineStats
    # Gap since the previous token of every sequence that sampled its 2nd+ token this step.
    inter_token_gaps_s: tuple[float, ...] = ()


@dataclass
class _Request:
    request_id: str
    seqs: list[Sequence]
    num_unfinished: int
    log_request_id: str | None = None  # the HTTP request's id, when one submitted it


def speculator_from(settings: Settings, runner: Runner) -> Speculator | None:
    """The speculative decoder the settings ask for (None: off). `draft` runs the draft
    model the runner loaded (its `draft_runner`, a Runner too)."""
    if settings.speculative == "off":
        return None
    if settings.speculative == "draft":
        draft_runner = getattr(runner, "draft_runner", None)
        if draft_runner is None:
            raise ValueError("speculative=draft, but the runner loaded no draft model")
        # A draft catches up like a prompt is computed while sequences decode
        max_pass_tokens = (
            settings.max_prefill_tokens_while_decoding or settings.max_num_batched_tokens
        )
        return DraftModelSpeculator(
            draft_runner,
            settings.speculative_tokens,
            settings.speculative_max_batch,
            max_pass_tokens=max_pass_tokens,
            prefix_caching=settings.enable_prefix_caching,
        )
    return NgramSpeculator(
        settings.speculative_tokens,
        settings.speculative_ngram_min,
        settings.speculative_ngram_max,
        settings.speculative_max_batch,
    )


class EngineCore:
    """Owns scheduler, block manager and runner. Not thread-safe: one owner at a time."""

    def __init__(
        self,
        runner: Runner,
        tokenizer: TokenizerLike,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_model_len = runner.max_model_len
        self.clock = clock
        self.block_manager = BlockManager(
            runner.num_blocks,
            runner.block_size,
            settings.enable_prefix_caching,
            hash_token_kinds=getattr(runner, "splits_rows", False),
        )
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=tokenizer.eos_token_ids,
            max_prefill_tokens_while_decoding=settings.max_prefill_tokens_while_decoding or None,
            priority_ageing_s=settings.priority_ageing_s or None,
            speculator=speculator_from(settings, runner),
        )
        self._requests: dict[str, _Request] = {}
        self._outputs: dict[int, SequenceOutput] = {}  # by seq_id, unfinished sequences
        self._faulty_requests: set[str] = set()
        self.step_observers: list[Callable[[StepStats], None]] = []
        self.num_steps = 0
        self._step_gaps: list[float] = []

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        n: int = 1,
        arrival_time: float | None = None,
        *,
        log_request_id: str | None = None,
        client: str = "",
        priority: int = 0,
    ) -> list[TokenDelta]:
        """Queue a request of n choices. Returns error deltas if it cannot be accepted.

        `log_request_id` (the HTTP request id) becomes the `request_id` field of log
        lines about this request; without it the field is `request_id` itself. `client`
        is whose work it is: the scheduler takes turns between clients. `priority`:
        lower is served first (app/engine/priority.py).
        """
        arrival = self.clock() if arrival_time is None else arrival_time
        problem = self._reject_reason(request_id, prompt_token_ids, n)
        if problem is not None:
            return [
                self.error_delta(request_id, i, len(prompt_token_ids), problem) for i in range(n)
            ]
        budget = self.max_model_len - len(prompt_token_ids)
        max_tokens = budget if params.max_tokens is None else min(params.max_tokens, budget)
        seqs: list[Sequence] = []
        for index in range(n):
            seq = Sequence(
                request_id=request_id,
                prompt_token_ids=list(prompt_token_ids),
                params=self._params_for_choice(params, index),
                max_tokens=max_tokens,
                index=index,
                wait_for_seq=seqs[0] if seqs else None,
                arrival_time=arrival,
                client=client,
                priority=priority,
            )
            seqs.append(seq)
        self._requests[request_id] = _Request(request_id, seqs, len(seqs), log_request_id)
        if self._is_faulty(prompt_token_ids):
            self._faulty_requests.add(request_id)
        for seq in seqs:
            start_matcher(seq)
            self._outputs[seq.seq_id] = SequenceOutput(seq, self.tokenizer)
            self.scheduler.add(seq)
        return []

    def _reject_reason(self, request_id: str, prompt: list[int], n: int) -> str | None:
        if request_id in self._requests:
            return f"request id {request_id!r} is already in use"
        if not prompt:
            return "the prompt is empty"
        if len(prompt) >= self.max_model_len:
            return (
                f"the prompt has {len(prompt)} tokens but the context window is "
                f"{self.max_model_len}, leaving no room to generate"
            )
        if n < 1:
            return "n must be at least 1"
        return None

    @staticmethod
    def _params_for_choice(params: SamplingParams, index: int) -> SamplingParams:
        # Choices of one seeded request must differ from each other yet stay reproducible.
        if index == 0 or params.seed is None:
            return params
        return dataclasses.replace(params, seed=params.seed + index)

    def _is_faulty(self, prompt: list[int]) -> bool:
        marker = self.settings.fault_injection_marker
        return bool(marker) and marker in self.tokenizer.decode(prompt, skip_special_tokens=False)

    def abort_request(self, request_id: str, message: str = "request aborted") -> list[TokenDelta]:
        """Stop a request now: its blocks are freed and each unfinished choice ends with ABORT."""
        request = self._requests.get(request_id)
        if request is None:
            return []
        self.scheduler.abort_request(request_id)
        return self._finish_request(request, FinishInfo(FinishReason.ABORT, error=message))

    def fail_request(self, request_id: str, message: str) -> list[TokenDelta]:
        """End a request with an error (a fault in its processing); others are untouched."""
        request = self._requests.get(request_id)
        if request is None:
            return []
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ERROR)
        return self._finish_request(request, FinishInfo(FinishReason.ERROR, error=message))

    def abort_all(self, message: str) -> list[TokenDelta]:
        deltas: list[TokenDelta] = []
        for request_id in list(self._requests):
            deltas.extend(self.fail_request(request_id, message))
        return deltas

    def _finish_request(self, request: _Request, finish: FinishInfo) -> list[TokenDelta]:
        deltas = []
        for seq in request.seqs:
            output = self._outputs.get(seq.seq_id)
            if output is None:  # this choice already ended
                continue
            deltas.append(output.delta("", (), finish=finish, timings=self._timings(seq)))
            self._seq_done(seq)
        return deltas

    def _log_fields(self, request_id: str) -> dict[str, str]:
        """`extra=` for a log line about a request: `request_id` is the HTTP request's id
        when one submitted it (so the line joins that request's other lines), else the
        engine's; `engine_request_id` is always the engine's."""
        request = self._requests.get(request_id)
        log_id = request.log_request_id if request is not None else None
        return {"request_id": log_id or request_id, "engine_request_id": request_id}

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # ---------------------------------------------------------------------- step
    def step(self) -> list[TokenDelta]:
        """One engine iteration: schedule, run one batched forward pass, postprocess."""
        started = self.clock()
        batch = self.scheduler.schedule(started)
        deltas = self._collect_scheduler_failures()
        if batch.is_empty:
            return deltas
        for scheduled in batch.seqs:
            if scheduled.seq.first_scheduled_time is None:
                scheduled.seq.first_scheduled_time = started
        batch, outputs, fault_deltas = self._execute_isolated(batch)
        deltas.extend(fault_deltas)
        updates = self.scheduler.update(batch, outputs) if batch.seqs else []
        updates, rejected = advance_matchers(self.scheduler, updates)
        for seq, reason in rejected:
            deltas.extend(self.fail_request(seq.request_id, f"internal error: {reason}"))
        now = self.clock()
        for update in updates:
            deltas.extend(self._postprocess(update, now))
        self.num_steps += 1
        self._notify_observers(batch, len(updates), now - started)
        return deltas

    def _collect_scheduler_failures(self) -> list[TokenDelta]:
        """Sequences the scheduler had to give up on (e.g. can never fit the cache)."""
        deltas: list[TokenDelta] = []
        for seq in self.scheduler.pop_failed():
            deltas.extend(
                self.fail_request(seq.request_id, "the request does not fit in the KV cache")
            )
        return deltas

    def _execute_isolated(
        self, batch: ScheduledBatch
    ) -> tuple[ScheduledBatch, list[SampleOutput | None], list[TokenDelta]]:
        """Run the batch; if it raises, rerun each sequence alone so one bad request
        fails alone. Partial K/V written by the failed attempt is harmless: the retry
        rewrites the same slots, and num_computed_tokens only advances in update()."""
        try:
            return batch, self.runner.execute(batch), []
        except Exception as exc:  # noqa: BLE001 - isolate, then report per request
            if len(batch.seqs) == 1:
                seq = batch.seqs[0].seq
                logger.exception(
                    "engine step failed for request %s",
                    seq.request_id,
                    extra=self._log_fields(seq.request_id),
                )
                failed = self.fail_request(seq.request_id, f"internal error: {exc}")
                return ScheduledBatch([], 0), [], failed
        kept, outputs, deltas = [], [], []
        for scheduled in batch.seqs:
            if scheduled.seq.is_finished:  # its request failed earlier in this loop
                continue
            single = ScheduledBatch([scheduled], scheduled.num_new_tokens)
            try:
                outputs.extend(self.runner.execute(single))
                kept.append(scheduled)
            except Exception as exc:  # noqa: BLE001
                request_id = scheduled.seq.request_id
                logger.exception(
                    "engine step failed for request %s",
                    request_id,
                    extra=self._log_fields(request_id),
                )
                deltas.extend(self.fail_request(scheduled.seq.request_id, f"internal error: {exc}"))
        # A sequence kept above may belong to a request that failed afterwards (n > 1).
        pairs = [(s, o) for s, o in zip(kept, outputs) if not s.seq.is_finished]
        tokens = sum(s.num_new_tokens for s, _ in pairs)
        new_batch = ScheduledBatch([s for s, _ in pairs], tokens, batch.preempted)
        return new_batch, [o for _, o in pairs], deltas

    def _postprocess(self, update: SeqUpdate, now: float) -> list[TokenDelta]:
        seq = update.seq
        output = self._outputs.get(seq.seq_id)
        if output is None:  # ended during this step (its request failed)
            return []
        sample = update.output  # None: a prompt-only sequence whose prompt is done
        try:
            if seq.request_id in self._faulty_requests:
                raise InjectedFault("injected fault (test hook)")
            text, stop_string = output.on_token(sample) if sample is not None else ("", None)
            logprob = output.token_logprob(sample) if sample is not None else None
            prompt_part = self._prompt_part(seq, output)
        except Exception as exc:  # noqa: BLE001 - one request's fault stays its own
            logger.exception(
                "postprocessing failed for request %s",
                seq.request_id,
                extra=self._log_fields(seq.request_id),
            )
            return self.fail_request(seq.request_id, f"internal error: {exc}")
        if sample is not None:
            if seq.first_token_time is None:
                seq.first_token_time = now
            elif seq.last_token_time is not None:
                self._step_gaps.append(now - seq.last_token_time)
            seq.last_token_time = now
        finish = self._finish_info(seq, update, stop_string)
        if finish is not None and stop_string is None:
            text += output.detokenizer.flush()
        delta = output.delta(
            text,
            (sample.token_id,) if sample is not None else (),
            (logprob,) if logprob is not None else (),
            finish,
            self._timings(seq, now) if finish else None,
        )
        if prompt_part is not None:
            delta = dataclasses.replace(
                delta, prompt_logprobs=prompt_part[0], embedding=prompt_part[1]
            )
        if finish is not None:
            self._seq_done(seq)
        return [delta]

    def _prompt_part(self, seq: Sequence, output: SequenceOutput) -> PromptPart | None:
        """The prompt outputs seq asked for, on its first delta (None on any other)."""
        if not seq.params.wants_prompt_result or output.prompt_result_sent:
            return None
        take = getattr(self.runner, "take_prompt_result", None)
        if take is None:
            raise RuntimeError("this runner does not compute prompt outputs")
        result = take(seq.seq_id)
        output.prompt_result_sent = True
        return output.prompt_logprobs(result), result.pooled

    def _finish_info(
        self, seq: Sequence, update: SeqUpdate, stop_string: str | None
    ) -> FinishInfo | None:
        if stop_string is not None:
            self.scheduler.finish(seq, FinishReason.STOP)  # idempotent
            # A verify step may have appended confirmed tokens after this one: the output
            # ends here, as it would have without speculation.
            del seq.output_token_ids[update.num_output_tokens :]
            return FinishInfo(FinishReason.STOP, stop_string)
        if update.finish_reason is not None:
            return FinishInfo(update.finish_reason, update.stop_reason)
        return None

    def _timings(self, seq: Sequence, now: float | None = None) -> RequestTimings:
        return RequestTimings(
            arrival=seq.arrival_time,
            first_scheduled=seq.first_scheduled_time,
            first_token=seq.first_token_time,
            finished=self.clock() if now is None else now,
            num_preemptions=seq.num_preemptions,
            num_draft_tokens=seq.num_draft_tokens,
            num_accepted_draft_tokens=seq.num_accepted_draft_tokens,
        )

    def _seq_done(self, seq: Sequence) -> None:
        self._outputs.pop(seq.seq_id, None)
        seq.constraint_matcher = None
        self.runner.release([seq.seq_id])
        request = self._requests.get(seq.request_id)
        if request is None:
            return
        request.num_unfinished -= 1
        if request.num_unfinished <= 0:
            del self._requests[seq.request_id]
            self._faulty_requests.discard(seq.request_id)

    def error_delta(self, request_id: str, index: int, num_prompt: int, message: str) -> TokenDelta:
        return TokenDelta(
            request_id=request_id,
            index=index,
            text="",
            token_ids=(),
            finish_reason=FinishReason.ERROR,
            usage=Usage(num_prompt, 0),
            error=message,
        )

    # --------------------------------------------------------------------- stats
    def stats(self, num_pending_requests: int = 0) -> EngineStats:
        bm = self.block_manager
        speculator = self.scheduler.speculator
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_pending_requests=num_pending_requests,
            num_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            kv_cache_usage=bm.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_steps=self.num_steps,
            speculation=dataclasses.replace(speculator.stats) if speculator else None,
        )

    def _notify_observers(self, batch: ScheduledBatch, num_sampled: int, duration_s: float) -> None:
        gaps, self._step_gaps = tuple(self._step_gaps), []
        if not self.step_observers:
            return
        step = StepStats(
            num_seqs=len(batch.seqs),
            num_batched_tokens=batch.num_batched_tokens,
            num_sampled=num_sampled,
            num_preempted=len(batch.preempted),
            duration_s=duration_s,
            engine=self.stats(),
            inter_token_gaps_s=gaps,
        )
        for observer in self.step_observers:
            try:
                observer(step)
            except Exception:  # noqa: BLE001 - metrics must never stop the engine
                logger.exception("step observer failed")
