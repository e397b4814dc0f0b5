"""The playground (`GET /` from a browser) and the dashboard (`GET /dashboard`).

Plain HTML, CSS and JavaScript in static/, shipped as package data: no build step, no
CDN, only relative URLs (so the pages work behind a proxy and under a path prefix, as
long as the prefix ends with a slash). The pages call the public API like any client.

`UiPages` is an ASGI middleware placed outside the API-key check: the pages hold no
secret and must load so that they can ask for the key; every API call they then make
carries it. `GET /` is the playground only for a client that accepts text/html (a
browser); curl and JSON clients get what they got before (POST / stays TGI's route).
"""

from __future__ import annotations

from pathlib import Path

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

STATIC_DIR = Path(__file__).parent / "static"
ASSETS_PATH = "/ui"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Everything from this origin only: a page that tried to reach a CDN would break here
# (and in the browser tests) instead of silently needing the network.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'"
)


def load_static_files(folder: Path = STATIC_DIR) -> dict[str, bytes]:
    """Every shipped file by name (a flat folder of a few small files, read once)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in MEDIA_TYPES}


def _file_response(name: str, body: bytes) -> Response:
    headers = {
        "Cache-Control": "no-cache",  # revalidate: a new lamina version shows at once
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
    }
    return Response(body, media_type=MEDIA_TYPES[Path(name).suffix], headers=headers)


def wants_html(scope: Scope) -> bool:
    """A browser navigating: its Accept names text/html (curl's */* does not)."""
    return "text/html" in Headers(scope=scope).get("accept", "")


class UiPages:
    """Serves the pages and their assets for GET/HEAD; everything else goes on to `app`."""

    def __init__(self, app: ASGIApp, static_dir: Path = STATIC_DIR) -> None:
        self.app = app
        self.files = load_static_files(static_dir)
        self.routes = [
            Route("/", self._page("playground.html"), methods=["GET", "HEAD"]),
            Route("/dashboard", self._page("dashboard.html"), methods=["GET", "HEAD"]),
            Route(ASSETS_PATH + "/{name}", self._asset, methods=["GET", "HEAD"]),
        ]

    def _page(self, name: str):
        async def page(_request: Request) -> Response:
            return _file_response(name, self.files[name])

        return page

    async def _asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        return _file_response(name, self.files[name])

    def _route_for(self, scope: Scope) -> Route | None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            return None
        for route in self.routes:
            match, child = route.matches(scope)
            if match is not Match.FULL:
                continue
            if route.path == "/" and not wants_html(scope):
                return None
            name = child["path_params"].get("name")
            if name is not None and name not in self.files:
                return None  # the app's own 404, in its error envelope
            scope.update(child)
            scope["route"] = route  # what the HTTP metrics label the request with
            return route
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._route_for(scope)
        if route is None:
            await self.app(scope, receive, send)
        else:
            await route.handle(scope, receive, send)
