"""ASGI middleware that keeps the API polite under abuse and load: request bodies are capped,
and past capacity a request waits briefly, then gets 503 with Retry-After instead of timing out."""

from __future__ import annotations

import asyncio
import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send


async def _send_error(send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    """Raised while the body streams in; an HTTPException so that FastAPI's body reading passes
    it on (as the app's 413) instead of calling it a parse error."""


class BodyLimit:
    """413 for a request body over `max_bytes` (declared or streamed), except under `exempt`
    path prefixes (part uploads, which have limits of their own)."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: tuple[str, ...] = ()):
        self.app, self.max_bytes, self.exempt = app, max_bytes, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt):
            return await self.app(scope, receive, send)
        message = (f"the request body is over the {self.max_bytes}-byte limit for API calls; files go up as "
                   "uploads (POST /api/v1/uploads)")
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit() and int(v) > self.max_bytes:
                return await _send_error(send, 413, "too_large", message)
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(413, message)
            return msg

        async def tracked(msg: dict) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, "too_large", message)


class Overload:
    """At most `limit` requests in the application at once; one more waits up to `wait`
    seconds for a place, then gets 503 with Retry-After (paths under `exempt` always pass)."""

    def __init__(self, app: ASGIApp, limit: int, wait: float, exempt: tuple[str, ...] = ()):
        self.app, self.wait, self.exempt = app, wait, exempt
        self.limit = limit
        self._gate: asyncio.Semaphore | None = None  # made in the server's event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt) or self.limit <= 0:
            return await self.app(scope, receive, send)
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.limit)
        try:
            await asyncio.wait_for(self._gate.acquire(), self.wait)
        except TimeoutError:
            return await _send_error(send, 503, "overloaded", "the coordinator is at capacity; try again shortly",
                                     {"Retry-After": "2"})
        try:
            await self.app(scope, receive, send)
        finally:
            self._gate.release()
