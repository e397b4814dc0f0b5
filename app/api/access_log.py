"""The access line: one `lamina.access` log record per HTTP request, when it ends.

ObservabilityMiddleware (observability.py) calls `log_access` after the last byte of
the response (streams included). The line carries method, route, path, status and
duration, the OpenAI `user` field when sent, and for inference requests token counts,
time to first token, finish reasons, the failure reason and a priority other than 0;
prompt and output text only with Settings.log_prompts. Its level says whether an
operator should look: warning for a 5xx (except 503 while loading or draining), info
otherwise, debug for probes (/health, /ready, /metrics), which are polled every few
seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from app.api.request_record import RequestRecord
from app.api.route_facts import facts_for

access_logger = logging.getLogger("lamina.access")


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
