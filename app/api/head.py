"""HEAD on every GET route: answered as that GET, without its body.

FastAPI routes answer only the methods they declare, so the HEAD a load balancer or an
uptime monitor sends to /health would be a 405. `HeadAsGet` runs a HEAD whose path a
GET route matches as that GET and passes on its status and headers (Content-Length
included, the length the GET's body has) with an empty body. The routes stay GET-only,
so /openapi.json lists no HEAD operations. A HEAD that no GET route matches goes on as
it came (a 404, or a 405 whose Allow lists the route's methods).
"""

from __future__ import annotations

from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    def _get_route_matches(self, scope: Scope) -> bool:
        as_get = {**scope, "method": "GET"}
        return any(route.matches(as_get)[0] is Match.FULL for route in self.router.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_head = scope["type"] == "http" and scope["method"] == "HEAD"
        if not (is_head and self._get_route_matches(scope)):
            await self.app(scope, receive, send)
            return
        ended = False

        async def send_without_body(message: Message) -> None:
            nonlocal ended
            if message["type"] == "http.response.body":
                if ended:  # the rest of a body sent in parts
                    return
                ended = True
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        # A new scope: the server's own still says HEAD, so it sends no body either.
        as_get = {**scope, "method": "GET"}
        try:
            await self.app(as_get, receive, send_without_body)
        finally:
            if "route" in as_get:  # what the access log and HTTP metrics label it by
                scope["route"] = as_get["route"]
