"""The app's ASGI middleware: the request body's size limit and the API key check."""

from __future__ import annotations

import hmac

from fastapi import Request

from loraplex.entrypoints.openai.errors import error_response


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
        message = f"the request body is larger than {self.limit} bytes (--max-request-body-bytes)"
        await error_response(413, message)(scope, receive, send)


class _TooLarge(Exception):
    pass


def authorized(request: Request, keys: list[bytes]) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    ok = False
    for key in keys:  # constant time, and every key compared
        ok |= hmac.compare_digest(given, key)
    return ok
