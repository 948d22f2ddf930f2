"""The app's ASGI middleware: the request body's size limit, the API key check and the
request id header. Plain ASGI, not Starlette's ``BaseHTTPMiddleware``: that one hides a
client's disconnect from the routes (a whole response would then run to its end)."""

from __future__ import annotations

import hmac
import os

from loraplex.entrypoints.openai.errors import error_response

DRAIN_BYTES = 64 << 20  # a refused body read past this is answered mid-send


class BodyLimit:
    """Refuses (413, OpenAI's shape) a request body past ``limit`` bytes: by its
    Content-Length before reading it, or as it streams in past the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        # read (and drop) what the client is still sending, so that it reads the answer
        # rather than a reset; a body past the drain bound gets its answer at once
        drained, more = 0, True
        while more and drained < DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        message = f"the request body is larger than {self.limit} bytes (--max-request-body-bytes)"
        await error_response(413, message)(scope, receive, send)


class _TooLarge(Exception):
    pass


def authorized(header: str, keys: list[bytes]) -> bool:
    """Whether an ``Authorization`` header bears one of ``keys`` (constant time, every key
    compared)."""
    scheme, _, token = header.partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key)
    return ok


class APIKeyAuth:
    """A 401 for any route but ``open_routes`` without one of ``keys``."""

    def __init__(self, app, keys: list[bytes], open_routes: set[str]):
        self.app, self.keys, self.open_routes = app, keys, open_routes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") not in self.open_routes:
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not authorized(header.decode("latin-1"), self.keys):
                response = error_response(401, "Unauthorized: a valid API key is required")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class RequestIdHeader:
    """vLLM's ``--enable-request-id-headers``: ``X-Request-Id`` on every response (the
    request's own, or a new one)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id")
        rid = given or os.urandom(16).hex().encode()

        async def with_id(message):
            if message["type"] == "http.response.start":
                message = dict(
                    message, headers=[*message.get("headers", []), (b"x-request-id", rid)]
                )
            await send(message)

        return await self.app(scope, receive, with_id)
