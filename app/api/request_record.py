"""What one HTTP request did, and how the layers it passes through report it.

Everything here works on the current request's `RequestRecord`, held in a contextvar
that ObservabilityMiddleware (observability.py) sets for the request's lifetime. It has
no app.api imports, so routes, admission control, SSE and dependencies can all report
into the record without an import cycle through the middleware.

- `RequestRecord`: tokens, first token, finish reasons, outcome of one request; read by
  the access line (access_log.py) and request_failure. One per request.
- `report_failure(reason)`: THE hook for a failed request (request_failure{reason}).
  The first report of a request wins, so it is counted once; when nobody reported one,
  the middleware derives it from the status (`failure_for_status`: 429 overloaded,
  408/504 timeout, 499 aborted, 401/403 unauthorized, other 4xx validation, 5xx error).
  A failure that a status cannot show (a deadline that ends a stream already answered
  200) must be reported: `report_failure("timeout")`, before aborting the generation.
- `note_user(user)`: the OpenAI `user` field (an end-user id the client chose) goes on
  the request's access line as `user`: printable characters only, at most
  MAX_LOGGED_USER_LENGTH of them (`loggable_user`). It is a log field only, never a
  metric label (one label value per end user would grow the registry without bound).
- The route driver (driver.py) feeds the record its prompts (`start_generation`),
  every delta once (`on_delta`) and its end (`close_generation`): the record is the one
  count of tokens behind the response's usage, the metrics and the access line.
- `current_request_id()`, `engine_request_id()`: the request's id, and the engine's id
  for one of its generations.
"""

from __future__ import annotations

import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field

from app.api.route_facts import facts_for
from app.core import FinishReason, TokenDelta
from app.logging_setup import request_id_var
from app.metrics import FAILURE_REASONS, Metrics

# The OpenAI `user` field is free text of any length: the access line keeps this much.
MAX_LOGGED_USER_LENGTH = 128


@dataclass
class Usage:
    """Token counts of a whole HTTP request: each prompt once, every choice's output."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class RequestRecord:
    """One HTTP request as the access log and request_failure see it."""

    request_id: str
    id_from_client: bool  # the client chose the id: it may repeat, so engine ids add a suffix
    method: str
    path: str
    metrics: Metrics
    log_prompts: bool
    started_s: float = field(default_factory=time.monotonic)
    failure: str | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    first_token_s: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)  # only when log_prompts
    outputs: dict[int, list[str]] = field(default_factory=dict)  # only when log_prompts
    num_generations: int = 0
    user: str | None = None  # the OpenAI `user` field, as loggable_user() leaves it
    num_cached_tokens: int = 0
    # Per choice of the generation (index = prompt index * n + choice): tokens so far,
    # and whether its end was counted.
    choice_tokens: list[int] = field(default_factory=list)
    choice_ended: list[bool] = field(default_factory=list)

    @property
    def is_inference(self) -> bool:
        return self.num_generations > 0 or (
            self.method == "POST" and facts_for(self.path).generates
        )

    @property
    def usage(self) -> Usage:
        return Usage(self.num_prompt_tokens, self.num_completion_tokens, self.num_cached_tokens)

    def fail(self, reason: str) -> None:
        """Record the request's failure; only the first one counts."""
        if reason not in FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}; one of {FAILURE_REASONS}")
        if self.failure is not None:
            return
        self.failure = reason
        if self.is_inference:
            self.metrics.observe_failure(reason)


# Set by ObservabilityMiddleware for the request's lifetime; None outside a request.
request_record_var: ContextVar[RequestRecord | None] = ContextVar("lamina_request", default=None)


def current_request_id() -> str | None:
    """The id of the HTTP request being served in this context (None outside one)."""
    return request_id_var.get()


# --- failures ----------------------------------------------------------------------------


def report_failure(reason: str) -> None:
    """Count the current request as failed with `reason` (one of app.metrics.FAILURE_REASONS:
    validation, overloaded, unavailable, aborted, timeout, error, unauthorized). Only the
    first report of a request counts. Outside a request (no middleware) it does nothing."""
    record = request_record_var.get()
    if record is not None:
        record.fail(reason)


def failure_for_status(status: int) -> str | None:
    """The failure reason a final HTTP status implies, when no layer reported one."""
    if status < 400:
        return None
    if status == 429:
        return "overloaded"
    if status in (408, 504):
        return "timeout"
    if status == 499:
        return "aborted"
    if status in (401, 403):
        return "unauthorized"
    return "validation" if status < 500 else "error"


# --- the `user` field --------------------------------------------------------------------


def loggable_user(user: str) -> str:
    """The `user` field as the access line shows it: at most MAX_LOGGED_USER_LENGTH
    characters, each unprintable one (control characters, line breaks) as U+FFFD, so a
    client cannot forge or garble a text-format log line with it."""
    kept = user[:MAX_LOGGED_USER_LENGTH]
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in kept)


def note_user(user: str | None) -> None:
    """Record the OpenAI `user` field of the current request for its access line.
    None (not sent) records nothing; outside a request (no middleware) it does nothing."""
    record = request_record_var.get()
    if record is not None and user is not None:
        record.user = loggable_user(user)


# --- generations -------------------------------------------------------------------------


def engine_request_id(record: RequestRecord, response_id: str) -> str:
    """The engine's id for a generation whose response id is `response_id`.

    The same, unless the client chose the request id: clients may reuse one (a retry,
    a fixed header), and the engine needs ids unique among the requests it holds.
    """
    if not record.id_from_client:
        return response_id
    return f"{response_id}-{uuid.uuid4().hex[:8]}"


def start_generation(record: RequestRecord, prompts: list[list[int]], n: int) -> None:
    """The request's prompts (each counted once), before any delta; n choices each."""
    record.num_generations += 1
    record.choice_tokens = [0] * (len(prompts) * n)
    record.choice_ended = [False] * (len(prompts) * n)
    for prompt in prompts:
        record.metrics.observe_prompt(len(prompt))
        record.num_prompt_tokens += len(prompt)
    if record.log_prompts:
        record.prompts.extend(prompts)


def on_delta(record: RequestRecord, choice_index: int, delta: TokenDelta) -> None:
    """One delta of choice `choice_index`, as the response reads it (once each).

    Choices ending with stop/length are successes; ERROR and ABORT fail the request
    ("error", "aborted").
    """
    if record.choice_ended[choice_index]:
        return
    if delta.token_ids and record.first_token_s is None:
        record.first_token_s = time.monotonic()
    record.choice_tokens[choice_index] += len(delta.token_ids)
    if record.log_prompts and delta.text:
        record.outputs.setdefault(choice_index, []).append(delta.text)
    if delta.finished:
        generated = record.choice_tokens[choice_index]
        if delta.usage is not None:
            # An engine failure's usage may not count what was already streamed.
            generated = max(generated, delta.usage.completion_tokens)
            if delta.index == 0:  # the prompt's cache hits, once for its n choices
                record.num_cached_tokens += delta.usage.cached_tokens
        _end_choice(record, choice_index, delta.finish_reason, generated, delta)


def close_generation(record: RequestRecord) -> None:
    """The response ended: a choice still running was cut short (the client left, or
    the stream broke): "aborted", counting the tokens it delivered."""
    for index, ended in enumerate(record.choice_ended):
        if not ended:
            _end_choice(record, index, None, record.choice_tokens[index], None)


def _end_choice(
    record: RequestRecord,
    index: int,
    reason: FinishReason | None,
    num_generated: int,
    delta: TokenDelta | None,
) -> None:
    record.choice_ended[index] = True
    record.metrics.observe_choice(reason, num_generated, delta.timings if delta else None)
    record.num_completion_tokens += num_generated
    record.finish_reasons.append(reason.value if reason else "cut_short")
    if reason is FinishReason.ERROR:
        record.fail("error")
    elif reason is FinishReason.ABORT or reason is None:
        record.fail("aborted")
