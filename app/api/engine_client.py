"""The slice of the engine the HTTP layer uses (see app/engine/engine.py).

Routes type against this protocol so they can be tested with a fake engine, and so the
API never imports the model or torch. A fake returns the engine's own RequestStream.
"""

from __future__ import annotations

from typing import Protocol

from app.core import SamplingParams
from app.engine.engine import EngineDeadError
from app.engine.request_stream import RequestStream


class EngineClient(Protocol):
    max_model_len: int  # context window (prompt + output) in tokens

    def start(self) -> None:
        """Start the engine thread; called once from the running event loop."""
        ...

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        n: int = 1,
        log_request_id: str | None = None,
        client: str = "",
        priority: int = 0,
    ) -> RequestStream:
        """Queue a request; `client` is whose work it is (admission's client), `priority`
        how urgent (lower first). Raises EngineDeadError when the engine thread is not
        alive."""
        ...

    def abort(self, request_id: str, reason: str = "request aborted") -> None:
        """End the request now: its stream ends with an ABORT delta carrying `reason`."""
        ...

    @property
    def is_alive(self) -> bool: ...

    def shutdown(self, timeout_s: float = 5.0) -> None: ...


__all__ = ["EngineClient", "EngineDeadError", "RequestStream"]
