"""Stored responses (`store: true`): bounded, in this process's memory, on one replica.

A stored response holds what GET /v1/responses/{id} returns, the conversation a
follow-up (`previous_response_id`) continues, and, while it runs, how to stop it
(POST /v1/responses/{id}/cancel). The store keeps at most `max_entries` responses, the
least recently used leaving first, each for `ttl_s` seconds after its last write
(LAMINA_RESPONSES_STORE_MAX_ENTRIES, LAMINA_RESPONSES_STORE_TTL_S). A response evicted
while it runs keeps running; it can no longer be found (nor cancelled).

Used on the event-loop thread only (no lock). Behind a fleet a response lives on the
replica that made it: the deployment routes a conversation's requests to one replica.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from app.api.schemas import ChatMessage
from app.api.schemas_responses import ResponseObject


@dataclass
class StoredResponse:
    """One response as the store keeps it."""

    response: ResponseObject  # the latest snapshot (in_progress while it runs)
    # The conversation a follow-up continues: this response's input (without its
    # `instructions`, which OpenAI does not carry over) and, once done, its output.
    messages: list[ChatMessage]
    # While it runs: ends its generation now (cancel); None once it ended.
    cancel: Callable[[], None] | None = None
    expires_at: float = 0.0

    @property
    def running(self) -> bool:
        return self.response.status == "in_progress"


class ResponseStore:
    """An LRU of stored responses with a lifetime."""

    def __init__(
        self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> list[str]:
        """The ids held now, least recently used first (expired ones included)."""
        return list(self._entries)

    def put(self, stored: StoredResponse) -> None:
        """Add or refresh a response (its lifetime starts again); evicts the least
        recently used beyond `max_entries`."""
        if self.max_entries <= 0:
            return
        response_id = stored.response.id
        stored.expires_at = self._clock() + self.ttl_s
        self._entries[response_id] = stored
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, or None when unknown, deleted, evicted or expired."""
        stored = self._entries.get(response_id)
        if stored is None:
            return None
        if self._clock() >= stored.expires_at:
            del self._entries[response_id]
            return None
        self._entries.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        """Forget a response; False when there was none to forget."""
        return self.get(response_id) is not None and self._entries.pop(response_id) is not None
