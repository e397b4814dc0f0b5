"""FastAPI dependencies shared by the routes.

`get_serving` is the gate every model route passes: it answers 503 until the model is
loaded and while draining. Admission control is the generation routes' own dependency
(`admission.TicketDep`); API keys are checked earlier, by the ApiKeyAuth middleware.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.api.errors import model_not_found, service_unavailable
from app.api.request_record import report_failure
from app.api.state import ServerState, Serving


# Both are `async def` although they never wait: FastAPI runs a plain `def` dependency
# in its thread pool, two thread hops per request for a dictionary lookup.
async def get_state(request: Request) -> ServerState:
    return request.app.state.server


async def get_serving(state: Annotated[ServerState, Depends(get_state)]) -> Serving:
    """The loaded model and engine, or a 503 saying why there are none right now."""
    if not state.readiness.is_ready or state.serving is None:
        # Loading or draining: the server doing its job, not an error (see access_log.py).
        report_failure("unavailable")
        raise service_unavailable(
            state.readiness.describe(), code=f"server_{state.readiness.phase.value}"
        )
    return state.serving


ServingDep = Annotated[Serving, Depends(get_serving)]
StateDep = Annotated[ServerState, Depends(get_state)]


# Names clients send when they address a server by URL rather than by model:
# huggingface_hub's InferenceClient(base_url=...) sends "dummy"; TGI's docs use "tgi".
PLACEHOLDER_MODEL_NAMES = frozenset({"dummy", "tgi"})


def check_model(requested: str | None, serving: Serving) -> None:
    """An absent (or placeholder) model means the served one; any other name is a 404."""
    if requested is None or requested in PLACEHOLDER_MODEL_NAMES:
        return
    if requested != serving.model.name:
        raise model_not_found(requested, serving.model.name)
