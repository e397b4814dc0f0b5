"""The slice of the engine the HTTP layer uses (see app/engine/engine.py).

Routes type against this protocol so they can be tested with a fake engine, and so the
API never imports the model or torch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from app.core import SamplingParams, TokenDelta
from app.engine.engine import EngineDeadError


class RequestStream(Protocol):
    """Deltas of one request's n choices, interleaved; closing it aborts the request."""

    def __aiter__(self) -> AsyncIterator[TokenDelta]: ...

    async def __anext__(self) -> TokenDelta: ...

    async def aclose(self) -> None: ...


class EngineClient(Protocol):
    max_model_len: int  # context window (prompt + output) in tokens

    def start(self) -> None:
        """Start the engine thread; called once from the running event loop."""
        ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, n: int = 1
    ) -> RequestStream:
        """Queue a request. Raises EngineDeadError when the engine thread is not alive."""
        ...

    def abort(self, request_id: str) -> None: ...

    @property
    def is_alive(self) -> bool: ...

    def shutdown(self, timeout_s: float = 5.0) -> None: ...


__all__ = ["EngineClient", "EngineDeadError", "RequestStream"]
