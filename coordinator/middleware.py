"""ASGI middleware that keeps the API polite under abuse and load: request bodies are capped;
past capacity a request gets 503 with Retry-After at once instead of timing out; and a
client past its requests a minute gets 429 with Retry-After."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time

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


class Lane:
    """A class of requests with places of its own: those whose path starts with one of
    `prefixes` or ends with one of `suffixes` (a lane with neither takes every other request).
    Past its places a request waits up to `wait` seconds (0: not at all; None: as long as it
    takes, for requests that must never be refused)."""

    def __init__(self, name: str, limit: int, wait: float | None, prefixes: tuple[str, ...] = (),
                 suffixes: tuple[str, ...] = ()):
        self.name, self.limit, self.wait, self.prefixes, self.suffixes = name, max(1, limit), wait, prefixes, suffixes
        self.gate: asyncio.Semaphore | None = None  # made in the server's event loop

    def takes(self, path: str) -> bool:
        return (not self.prefixes and not self.suffixes) or path.startswith(self.prefixes) or path.endswith(
            self.suffixes)


class Overload:
    """Admission by lanes: each lane lets at most `limit` of its requests into the
    application at once; one more gets 503 with Retry-After at once, or after waiting the
    lane's `wait` for a place. So a burst of one kind (large part uploads, completions that
    hash and check whole files) cannot crowd out the quick reads, and no request waits long
    for an answer. Paths under `exempt` always pass. Every answer carries a Server-Timing
    header: the wait for a place and the work."""

    def __init__(self, app: ASGIApp, lanes: list[Lane], exempt: tuple[str, ...] = ()):
        self.app, self.lanes, self.exempt = app, lanes, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith(self.exempt):
            return await self.app(scope, receive, send)
        lane = next(x for x in self.lanes if x.takes(path))
        if lane.gate is None:
            lane.gate = asyncio.Semaphore(lane.limit)
        t0 = time.perf_counter()
        if not await self._admit(lane):
            return await _send_error(send, 503, "overloaded", "the coordinator is at capacity; try again shortly",
                                     {"Retry-After": "2"})
        t1 = time.perf_counter()

        async def timed(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                t = f"wait;dur={(t1 - t0) * 1000:.1f}, app;dur={(time.perf_counter() - t1) * 1000:.1f}"
                msg = {**msg, "headers": [*msg.get("headers", []), (b"server-timing", t.encode())]}
            await send(msg)

        try:
            await self.app(scope, receive, timed)
        finally:
            lane.gate.release()

    @staticmethod
    async def _admit(lane: Lane) -> bool:
        if lane.wait is None or not lane.gate.locked():
            await lane.gate.acquire()  # a free place is taken without waiting
            return True
        if lane.wait <= 0:
            return False
        try:
            await asyncio.wait_for(lane.gate.acquire(), lane.wait)
            return True
        except TimeoutError:
            return False


log = logging.getLogger("elmforest")


def client_of(scope: Scope) -> str:
    """Who a request counts against: its API token (by hash), else its address."""
    for k, v in scope.get("headers", []):
        if k == b"authorization" and v[:7].lower() == b"bearer " and v[7:].strip():
            return "token:" + hashlib.sha256(v[7:].strip()).hexdigest()[:32]
    client = scope.get("client")
    return "addr:" + (client[0] if client else "unknown")


class RateLimit:
    """At most `per_minute` requests a minute per client (client_of); past that 429 with
    Retry-After (the seconds left of the minute). `counter` (services.limits.request_counter)
    keeps the counts where every process sees them. Paths under `exempt` do not count. A
    counter that cannot be reached lets requests through (and says so in the log)."""

    WINDOW = 60

    def __init__(self, app: ASGIApp, per_minute: int, counter, exempt: tuple[str, ...] = ()):
        self.app, self.per_minute, self.counter, self.exempt = app, per_minute, counter, exempt
        self._threads = None  # made in the server's event loop
        self._warned = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.per_minute <= 0 or scope.get("path", "").startswith(self.exempt):
            return await self.app(scope, receive, send)
        import anyio.to_thread

        if self._threads is None:
            self._threads = anyio.CapacityLimiter(8)
        key = client_of(scope)
        try:
            if hasattr(self.counter, "ahit"):  # Redis: awaited here, no thread
                counted = await self.counter.ahit(key, self.WINDOW)
            else:  # the file: counted here when that waits for nothing, else on a thread
                counted = self.counter.hit_now(key, self.WINDOW) if hasattr(self.counter, "hit_now") else None
            n, left = counted or await anyio.to_thread.run_sync(self.counter.hit, key, self.WINDOW,
                                                                limiter=self._threads)
        except Exception as e:  # noqa: BLE001 - Redis away, a locked file: serve rather than refuse
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.warning("request counts unavailable (%s); not limiting requests meanwhile", e)
            return await self.app(scope, receive, send)
        if n > self.per_minute:
            wait = max(1, math.ceil(left))
            return await _send_error(send, 429, "too_many_requests",
                                     f"too many requests from you (at most {self.per_minute} a minute); try again in "
                                     f"{wait} s", {"Retry-After": str(wait)})
        await self.app(scope, receive, send)
