"""What each route is, declared once next to the route and looked up by path.

A route's facts are read where no route has been matched yet (middleware answering
413, 401 or a Unicode 400 before routing, the access line, the failure counters) and
where routes are described (openapi.py), so they are kept by path: the route's own
module registers them with `declare` in its decorator, e.g.

    @router.post(declare("/generate", TGI_GENERATION), ...)

A path nobody declared has the default facts: an ordinary route.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel


@dataclass(frozen=True)
class RouteFacts:
    generates: bool = False  # runs the model: admitted, counted in request_failure
    tgi_errors: bool = False  # error bodies also carry TGI's `error_type`
    event_model: type[BaseModel] | None = None  # the model of each streamed `data:` event
    ends_with_done: bool = False  # its streams end with `data: [DONE]`
    probe: bool = False  # polled every few seconds: its access line is at debug level


ORDINARY = RouteFacts()
PROBE = RouteFacts(probe=True)

_FACTS: dict[str, RouteFacts] = {}


def declare(path: str, facts: RouteFacts) -> str:
    """Record `facts` for `path` and return the path (for the route decorator)."""
    known = _FACTS.setdefault(path, facts)
    if known != facts:
        raise ValueError(f"route {path} is declared twice, with different facts")
    return path


def facts_for(path: str | None) -> RouteFacts:
    return _FACTS.get(path or "", ORDINARY)


def declared_routes() -> dict[str, RouteFacts]:
    return dict(_FACTS)
