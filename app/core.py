"""Plain data shared by every layer. No torch here: the API and the scheduler import it.

Shapes of the engine's world:
- `SamplingParams`: what the user asked for, validated and frozen by the API layer.
- `Sequence`: one generated continuation (a request with n=2 has two), owned by the
  engine thread. Only the engine thread mutates it.
- `ScheduledBatch`: the scheduler's decision for one step, handed to the runner.
- `SampleOutput`: the runner's answer for one sequence that sampled.
- `PromptResult`: what the runner computed over a whole prompt when a sequence asked for
  it (prompt log-probabilities, a pooled hidden state), handed over once.
- `TokenDelta`: what flows back to the caller of `Engine.add_request`.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Literal, Protocol

Pooling = Literal["last", "mean"]


class ConstraintMatcherLike(Protocol):
    """A sequence's position in its grammar (app/structured's ConstraintMatcher)."""

    def advance(self, token_id: int) -> bool: ...

    @property
    def is_finished(self) -> bool: ...

    @property
    def error(self) -> str | None: ...


class CompiledConstraintLike(Protocol):
    """A compiled output constraint (app/structured's CompiledConstraint)."""

    kind: str

    def new_matcher(self) -> ConstraintMatcherLike: ...


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # client gone, deadline, shutdown
    ERROR = "error"  # this request failed inside the engine


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings. Defaults mean "off"; temperature 0 means greedy."""

    # None: until the context window is full; 0: compute the prompt only (its prompt
    # outputs, the prefix cache) and sample nothing
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1.0: disabled (CTRL-style, over prompt + output)
    presence_penalty: float = 0.0  # OpenAI-style, over output tokens only
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token + top k
    skip_special_tokens: bool = True
    # Structured output: only tokens this grammar allows are sampled, EOS only where it
    # accepts (compiled by app/structured before the request reaches the engine).
    constraint: CompiledConstraintLike | None = None
    # Prompt outputs, computed while the prompt is (PromptResult, with the first delta):
    # None: off; k >= 0: every prompt token's log-probability (but the first's) + top k
    prompt_logprobs: int | None = None
    # An embedding: the prompt's final hidden states (after the final norm) pooled by
    # "last" token or "mean" over the prompt; None: off
    pooling: Pooling | None = None

    def __post_init__(self) -> None:
        # The API validates with user-facing messages; these guard internal callers.
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.min_tokens < 0:
            raise ValueError("min_tokens must be >= 0")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("logprobs must be >= 0")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError("prompt_logprobs must be >= 0")
        if self.pooling not in (None, "last", "mean"):
            raise ValueError("pooling must be 'last' or 'mean'")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def wants_prompt_result(self) -> bool:
        return self.prompt_logprobs is not None or self.pooling is not None

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


_seq_ids = itertools.count()


def next_seq_id() -> int:
    return next(_seq_ids)


@dataclass(eq=False)
class Sequence:
    """One continuation being generated. Mutated only by the engine thread."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: never None, never beyond the context window
    index: int = 0  # which of the request's n choices this is
    seq_id: int = field(default_factory=next_seq_id)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of the prompt, served by the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    # Sequences 1..n-1 of a request wait until sequence 0 has cached the prompt, so
    # they share its blocks through the prefix cache instead of recomputing them.
    wait_for_seq: Sequence | None = None
    num_preemptions: int = 0
    # Speculative decoding: draft tokens verified for this sequence, and how many of them
    # the model's own samples confirmed (each confirmed one is an output token)
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    # Where the output stands in params.constraint's grammar; advanced with each token
    # by the engine, kept across preemption (the output tokens are kept too).
    constraint_matcher: ConstraintMatcherLike | None = None
    arrival_time: float = 0.0
    # Whose work this is (admission's client: API key digest or address); the scheduler
    # starts waiting sequences round-robin over clients. "": unknown, one client.
    client: str = ""
    # vLLM's request priority: lower is served first (app/engine/priority.py). The
    # scheduler sets `waiting_since` (engine clock) whenever the sequence enters the
    # queue, and `running_priority` (its effective priority then) when it starts.
    priority: int = 0
    waiting_since: float = 0.0
    running_priority: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def num_prompt_tokens_in(self, start: int, length: int) -> int:
        """How many of the token positions [start, start + length) are prompt tokens
        (always the leading ones): where a token's kind decides how it is computed."""
        return min(max(self.num_prompt_tokens - start, 0), length)

    @property
    def needs_prompt_result(self) -> bool:
        """It asked for prompt outputs that are not delivered yet: they go out with its
        first delta (a first token, or the end of a prompt-only sequence)."""
        return self.params.wants_prompt_result and not self.output_token_ids

    @property
    def needs_every_prompt_row(self) -> bool:
        """Its prompt outputs need every prompt position computed in this run: a prefix
        served by the prefix cache has K/V but no hidden states or logits."""
        params = self.params
        needs_rows = params.prompt_logprobs is not None or params.pooling == "mean"
        return needs_rows and self.needs_prompt_result

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class ScheduledSeq:
    """One sequence's share of a step."""

    seq: Sequence
    num_new_tokens: int  # tokens to compute this step, from seq.num_computed_tokens on
    sample: bool  # this chunk reaches the last known token, so the step samples one
    # Speculative decoding: tokens proposed to follow the sequence's last known token,
    # computed after it in this step (counted in num_new_tokens) to verify them.
    draft_token_ids: tuple[int, ...] = ()


@dataclass
class ScheduledBatch:
    """The scheduler's plan for one engine step. Plain data; the runner reads it."""

    seqs: list[ScheduledSeq]  # running sequences that compute tokens this step
    num_batched_tokens: int  # sum of num_new_tokens
    preempted: list[Sequence] = field(default_factory=list)  # freed this step, to recompute

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class SampleOutput:
    """The runner's result for one sequence that sampled this step."""

    token_id: int
    logprob: float | None = None  # when params.logprobs is not None
    top_logprobs: tuple[TopLogprob, ...] = ()
    # Speculative decoding (ScheduledSeq.draft_token_ids): [j] is the token sampled at
    # the position after draft j, as if drafts 0..j had been sampled. The engine keeps
    # this token, then [0] while this token equals draft 0, [1] while [0] equals draft
    # 1, and so on: the rest were computed on a wrong guess and are dropped.
    after_drafts: tuple[SampleOutput, ...] = ()


@dataclass(frozen=True)
class PromptLogprob:
    """One prompt token's log-probability given the tokens before it, as the runner
    computed it (fp32 log-softmax of the model's logits)."""

    token_id: int
    logprob: float
    rank: int  # 1 + how many tokens the model found more likely
    top_logprobs: tuple[TopLogprob, ...] = ()  # most likely first


@dataclass(frozen=True)
class PromptResult:
    """The runner's prompt outputs for one sequence, complete (every prompt position)."""

    # One per prompt token, None for the first (nothing predicts it); empty: not asked
    logprobs: tuple[PromptLogprob | None, ...] = ()
    # The pooled final hidden state, not normalised: [hidden]; None: not asked
    pooled: tuple[float, ...] | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token with its log-probability and top alternatives, as the API shows it."""

    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token id, text, logprob)


@dataclass(frozen=True)
class PromptTokenLogprob:
    """A prompt token with its log-probability, rank and top alternatives, as the API
    shows it."""

    token_id: int
    text: str
    logprob: float
    rank: int
    top: tuple[tuple[int, str, float], ...] = ()  # (token id, text, logprob)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestTimings:
    """Engine-side timestamps of one sequence (time.monotonic seconds), for metrics."""

    arrival: float  # accepted by Engine.generate
    first_scheduled: float | None  # first step that computed any of its tokens
    first_token: float | None  # first output token sampled
    finished: float
    num_preemptions: int = 0
    # Speculative decoding: draft tokens verified for the sequence, and accepted
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0


@dataclass(frozen=True)
class TokenDelta:
    """What one engine step produced for one sequence of a request.

    `text` may be empty (held back: half a UTF-8 character or a possible stop string
    prefix). The last delta of a sequence has `finish_reason` set and `usage` filled.
    """

    request_id: str
    index: int  # choice index, 0..n-1
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that matched
    usage: Usage | None = None
    error: str | None = None  # set with FinishReason.ERROR / ABORT for the caller
    timings: RequestTimings | None = None  # on the last delta of a sequence
    # With params.wants_prompt_result, on the sequence's first delta only
    prompt_logprobs: tuple[PromptTokenLogprob | None, ...] = ()  # one per prompt token
    embedding: tuple[float, ...] | None = None  # PromptResult.pooled

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
