"""ASGI middleware that answers before a request reaches any route: API key, body size and encoding.

Written as plain ASGI (not Starlette's BaseHTTPMiddleware) so that streamed responses and client disconnects pass
through untouched.
"""
from __future__ import annotations

import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mixquant.server.errors import error_response


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on the OpenAI routes (/v1/...), as `vllm serve --api-key` does."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("authorization", "").encode()
        if not secrets.compare_digest(given, self.expected):
            message = "missing API key" if not given else "invalid API key"
            return await error_response(401, f"{message}: send the server's key as 'Authorization: Bearer <key>'")(
                scope, receive, send)
        await self.app(scope, receive, send)


class RequestBodyMiddleware:
    """Reads the whole body first: refuses it past `max_bytes` (413) or when it is not UTF-8 (400), then replays it.

    Reading it here, rather than counting inside the route, keeps these errors out of the JSON parser, which would
    report both as a vague parse failure.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send, int(declared))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send, size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return await error_response(400, f"the request body is not valid UTF-8 (byte {body[e.start]:#04x} at "
                                             f"offset {e.start}); JSON must be sent as UTF-8")(scope, receive, send)

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body only a disconnect can come
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: int):
        response = error_response(413, f"the request body has {size} bytes or more; this server accepts at most "
                                       f"{self.max_bytes} (--max-request-bytes)")
        await response(scope, receive, send)
