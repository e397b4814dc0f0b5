"""Optional API keys: `Authorization: Bearer <key>` on every route but the open ones.

With LAMINA_API_KEYS empty (the default) every route is open. With keys configured, a
request to any route not listed in LAMINA_OPEN_ROUTES (default /health, /ready,
/metrics; an entry ending in `*` is a prefix) needs one of the keys, else it gets a 401
in the error envelope with `WWW-Authenticate: Bearer`, before its body is read.

An entry `key:N` (N an integer) also gives the key's requests the scheduling priority N
(`key_priorities`): their default, and the most urgent they may ask for (routes.admit,
driver.resolve_priority). A colon is not a bearer-token character (RFC 6750), so the
suffix cannot be part of a key.

Keys are compared in constant time: the presented token and every key are hashed to
the same length and all keys are compared (hmac.compare_digest), so neither the
position of a matching key nor a shared prefix shows in the response time.

A pure ASGI middleware (streams pass through untouched). In create_app it sits inside
CORS (so preflights and 401s carry CORS headers) and outside the body-size limit.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import APIError, error_response

BEARER = "bearer"
_PRIORITY_SUFFIX = re.compile(r"(.+):(-?\d+)")


def split_key_entry(entry: str) -> tuple[str, int | None]:
    """A LAMINA_API_KEYS entry -> (the key, its priority or None)."""
    match = _PRIORITY_SUFFIX.fullmatch(entry)
    if match is None:
        return entry, None
    return match.group(1), int(match.group(2))


def key_client(token: str) -> str:
    """Who a keyed request is, for admission's fair share and the scheduler: a digest
    of its key (raw keys are not kept)."""
    return "key:" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def key_priorities(entries: Iterable[str]) -> dict[str, int]:
    """key_client(key) -> priority, for the entries that give one."""
    priorities = {}
    for entry in entries:
        key, priority = split_key_entry(entry)
        if priority is not None:
            priorities[key_client(key)] = priority
    return priorities


def unauthorized(message: str, code: str) -> APIError:
    return APIError(
        401,
        message,
        type="authentication_error",
        code=code,
        headers={"WWW-Authenticate": "Bearer"},
    )


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The configured keys, kept only as digests."""

    def __init__(self, api_keys: Iterable[str]) -> None:
        keys = (split_key_entry(entry)[0] for entry in api_keys)
        self._digests = [_digest(key) for key in keys if key]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, token: str) -> bool:
        presented = _digest(token)
        matched = False
        for key in self._digests:  # no early exit: every key is compared
            matched |= hmac.compare_digest(presented, key)
        return matched


class OpenRoutes:
    """Paths that need no key: exact paths, or prefixes written with a trailing `*`."""

    def __init__(self, routes: Iterable[str]) -> None:
        routes = list(routes)
        self._exact = frozenset(r for r in routes if not r.endswith("*"))
        self._prefixes = tuple(r[:-1] for r in routes if r.endswith("*"))

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and (path in self._exact or path.startswith(self._prefixes))


def bearer_token(headers: Headers) -> str | None:
    """The token of `Authorization: Bearer <token>`; None when absent or another scheme."""
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != BEARER or not token.strip():
        return None
    return token.strip()


class ApiKeyAuth:
    """401 for requests without a valid key, unless the route is open or no key is set."""

    def __init__(self, app: ASGIApp, api_keys: Iterable[str], open_routes: Iterable[str]):
        self.app = app
        self.keys = KeyRing(api_keys)
        self.open_routes = OpenRoutes(open_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_routes:
            await self.app(scope, receive, send)
            return
        token = bearer_token(Headers(scope=scope))
        if token is None:
            error = unauthorized(
                "this server requires an API key: send the header `Authorization: Bearer <key>`",
                "missing_api_key",
            )
        elif not self.keys.accepts(token):
            error = unauthorized("the API key is not valid", "invalid_api_key")
        else:
            await self.app(scope, receive, send)
            return
        await error_response(error, scope["path"])(scope, receive, send)
