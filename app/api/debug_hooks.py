"""Test-only routes, mounted only when Settings.enable_test_hooks is true.

POST /debug/engine/crash kills the engine thread the way an unexpected bug would
(Engine.crash_for_test), so system tests can check what an orchestrator sees: /health
turns 503 and every waiting caller gets an error. Never enable it in production; the
route is absent (404) otherwise, and behind the API key like every non-open route.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI

from app.api.errors import APIError, service_unavailable
from app.api.state import StateDep
from app.config import Settings

logger = logging.getLogger("lamina")

router = APIRouter(include_in_schema=False)


@router.post("/debug/engine/crash")
async def crash_engine(state: StateDep) -> dict[str, str]:
    serving = state.serving
    if serving is None:
        raise service_unavailable("no engine is running yet", code="server_loading")
    crash = getattr(serving.engine, "crash_for_test", None)
    if crash is None:
        raise APIError(501, "this engine has no crash hook", type="server_error")
    crash()
    return {"status": "crashing"}


def install_test_hooks(app: FastAPI, settings: Settings) -> None:
    if settings.enable_test_hooks:
        logger.warning("test hooks are enabled (POST /debug/engine/crash): never in production")
        app.include_router(router)
