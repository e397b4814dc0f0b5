"""What one HTTP request did: the `RequestRecord` every layer reports into.

ObservabilityMiddleware (observability.py) makes one per HTTP request and puts it in
the ASGI scope (`RequestRecord.of(request)` finds it); from there it is passed
explicitly: the generation routes' gate hands it to the route driver with the call.

- The route driver (driver.py) feeds it the prompts (`start_generation`), every delta
  once (`on_delta`) and the end (`close_generation`): the record is the one count of
  tokens behind the response's usage, the metrics and the access line.
- `fail(reason)`: THE hook for a failed request (request_failure{reason}). The first
  report of a request wins, so it is counted once; when nobody reported one, the
  middleware derives it from the status (`failure_for_status`: 429 overloaded, 408/504
  timeout, 499 aborted, 401/403 unauthorized, other 4xx validation, 5xx error). A
  failure that a status cannot show (a deadline that ends a stream already answered
  200) must be reported: `fail("timeout")`, before aborting the generation.
- `note_user(user)`: the OpenAI `user` field (an end-user id the client chose) goes on
  the request's access line as `user`: printable characters only, at most
  MAX_LOGGED_USER_LENGTH of them (`loggable_user`). It is a log field only, never a
  metric label (one label value per end user would grow the registry without bound).
- `engine_request_id()`: the engine's id for one of the request's generations.

The access line (`log_access`): one `lamina.access` log record per HTTP request, written
by ObservabilityMiddleware after the last byte of the response (streams included). It
carries method, route, path, status and duration, the OpenAI `user` field when sent,
and for inference requests token counts, time to first token, finish reasons, the
failure reason, a priority other than 0 and the draft tokens speculative decoding
verified and accepted when it drafted any; prompt and output text only with
Settings.log_prompts. Its level says whether an operator should look: warning for a 5xx
(except 503 while loading or draining), info otherwise, debug for probes (/health,
/ready, /metrics), which are polled every few seconds.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.api.route_facts import facts_for
from app.core import FinishReason, TokenDelta
from app.metrics import FAILURE_REASONS, Metrics

# The OpenAI `user` field is free text of any length: the access line keeps this much.
MAX_LOGGED_USER_LENGTH = 128
SCOPE_KEY = "lamina.record"  # where the middleware puts the record in the ASGI scope

access_logger = logging.getLogger("lamina.access")


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
    priority: int = 0  # the scheduling priority it ran at (lower is served first)
    num_cached_tokens: int = 0
    # Speculative decoding, over every choice: draft tokens verified, and accepted
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    # Per choice of the generation (index = prompt index * n + choice): tokens so far,
    # and whether its end was counted.
    choice_tokens: list[int] = field(default_factory=list)
    choice_ended: list[bool] = field(default_factory=list)

    @staticmethod
    def of(connection: Mapping[str, Any]) -> RequestRecord:
        """The record of the request whose ASGI scope (or Starlette Request) is given."""
        return connection[SCOPE_KEY]

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

    def note_user(self, user: str | None) -> None:
        """The OpenAI `user` field for the access line; None (not sent) records nothing."""
        if user is not None:
            self.user = loggable_user(user)

    def engine_request_id(self, response_id: str) -> str:
        """The engine's id for a generation whose response id is `response_id`.

        The same, unless the client chose the request id: clients may reuse one (a retry,
        a fixed header), and the engine needs ids unique among the requests it holds.
        """
        if not self.id_from_client:
            return response_id
        return f"{response_id}-{uuid.uuid4().hex[:8]}"

    def start_generation(self, prompts: list[list[int]], n: int) -> None:
        """The request's prompts (each counted once), before any delta; n choices each."""
        self.num_generations += 1
        self.choice_tokens = [0] * (len(prompts) * n)
        self.choice_ended = [False] * (len(prompts) * n)
        for prompt in prompts:
            self.metrics.observe_prompt(len(prompt))
            self.num_prompt_tokens += len(prompt)
        if self.log_prompts:
            self.prompts.extend(prompts)

    def on_delta(self, choice_index: int, delta: TokenDelta) -> None:
        """One delta of choice `choice_index`, as the response reads it (once each).

        Choices ending with stop/length are successes; ERROR and ABORT fail the request
        ("error", "aborted").
        """
        if self.choice_ended[choice_index]:
            return
        if delta.token_ids and self.first_token_s is None:
            self.first_token_s = time.monotonic()
        self.choice_tokens[choice_index] += len(delta.token_ids)
        if self.log_prompts and delta.text:
            self.outputs.setdefault(choice_index, []).append(delta.text)
        if delta.finished:
            generated = self.choice_tokens[choice_index]
            if delta.usage is not None:
                # An engine failure's usage may not count what was already streamed.
                generated = max(generated, delta.usage.completion_tokens)
                if delta.index == 0:  # the prompt's cache hits, once for its n choices
                    self.num_cached_tokens += delta.usage.cached_tokens
            if delta.timings is not None:
                self.num_draft_tokens += delta.timings.num_draft_tokens
                self.num_accepted_draft_tokens += delta.timings.num_accepted_draft_tokens
            self._end_choice(choice_index, delta.finish_reason, generated, delta)

    def close_generation(self) -> None:
        """The response ended: a choice still running was cut short (the client left, or
        the stream broke): "aborted", counting the tokens it delivered."""
        for index, ended in enumerate(self.choice_ended):
            if not ended:
                self._end_choice(index, None, self.choice_tokens[index], None)

    def _end_choice(
        self,
        index: int,
        reason: FinishReason | None,
        num_generated: int,
        delta: TokenDelta | None,
    ) -> None:
        self.choice_ended[index] = True
        self.metrics.observe_choice(reason, num_generated, delta.timings if delta else None)
        self.num_completion_tokens += num_generated
        self.finish_reasons.append(reason.value if reason else "cut_short")
        if reason is FinishReason.ERROR:
            self.fail("error")
        elif reason is FinishReason.ABORT or reason is None:
            self.fail("aborted")


# --- failures ----------------------------------------------------------------------------


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


# --- the access line ---------------------------------------------------------------------


def log_access(
    record: RequestRecord, route: str, status: int, tokenizer_of: Callable[[], Any]
) -> None:
    """Write the access line of `record`, answered with `status` on `route` (its template).
    `tokenizer_of` gives the tokenizer that decodes logged prompts (None: token ids)."""
    duration_s = time.monotonic() - record.started_s
    fields: dict[str, Any] = {
        "method": record.method,
        "route": route,
        "path": record.path,
        "status": status,
        "duration_s": round(duration_s, 6),
    }
    if record.user is not None:
        fields["user"] = record.user
    if record.is_inference:
        fields["prompt_tokens"] = record.num_prompt_tokens
        fields["completion_tokens"] = record.num_completion_tokens
        if record.first_token_s is not None:
            fields["ttft_s"] = round(record.first_token_s - record.started_s, 6)
        fields["finish_reasons"] = record.finish_reasons
        if record.priority:
            fields["priority"] = record.priority
        if record.num_draft_tokens:
            fields["spec_draft_tokens"] = record.num_draft_tokens
            fields["spec_accepted_tokens"] = record.num_accepted_draft_tokens
        if record.failure is not None:
            fields["failure"] = record.failure
    if record.log_prompts and record.num_generations:
        fields.update(_texts(record, tokenizer_of))
    # 5xx is news for an operator, except a 503 while loading or draining (expected;
    # clients polling a starting replica would otherwise fill the log with warnings).
    is_breakage = status >= 500 and record.failure != "unavailable"
    level = logging.WARNING if is_breakage else logging.INFO
    if facts_for(record.path).probe:  # /ready says 503 all through loading: not news
        level = logging.DEBUG
    access_logger.log(
        level, "%s %s %d %.3fs", record.method, record.path, status, duration_s, extra=fields
    )


def _texts(record: RequestRecord, tokenizer_of: Callable[[], Any]) -> dict[str, Any]:
    """Prompt and output text, for Settings.log_prompts only (the prompt as the model
    saw it: chat template applied)."""
    tokenizer = tokenizer_of()
    prompts = [
        tokenizer.decode(ids, skip_special_tokens=False) if tokenizer else ids
        for ids in record.prompts
    ]
    outputs = [
        "".join(record.outputs.get(i, [])) for i in range(max(record.outputs, default=-1) + 1)
    ]
    return {"prompt": prompts, "output": outputs}
