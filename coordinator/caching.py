"""HTTP caching of what the coordinator publishes. A published forest version never changes;
what is derived from it (its leaderboard, posteriors, values) changes only when it is
evaluated again; and which version is current changes only when a new one is published.
So a route answering such a read names what its body is made of (a version's id, the time
of its last evaluation, the query), `etag` turns that into an entity tag without rendering
or hashing the body, and `conditional` answers a matching If-None-Match with 304 before any
rendering happens.

Every other answer depends, or may depend, on who asks: `CacheHeaders` marks each response
that no route declared public `private, no-store`, with `Vary: Authorization, Cookie` (as are
the public web pages, which a signed-in user sees otherwise), so that no shared cache hands
one caller's answer to another. A response that sets a cookie is never public, whatever its
route declared."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PRIVATE = "private, no-store"
VARY = "Authorization, Cookie"


def code_stamp(*roots: Path, patterns: tuple[str, ...] = ("*.py",)) -> str:
    """A short hash of the code that renders bodies: a deploy that changes it changes every tag."""
    h = hashlib.sha256()
    for root in roots:
        for pattern in patterns:
            for f in sorted(root.rglob(pattern)):
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:12]


BUILD = code_stamp(Path(__file__).parent)


def etag(*parts: object, weak: bool = False, build: str = BUILD) -> str:
    """A tag for the body these parts (and the code) determine. Weak (W/) when equal parts
    give bodies that mean the same but differ in bytes (freshly signed download URLs)."""
    digest = hashlib.sha256(repr((build, *parts)).encode()).hexdigest()[:32]
    return f'{"W/" if weak else ""}"{digest}"'


def public(max_age: int) -> str:
    """Any cache may keep it for `max_age` seconds, then must ask again (If-None-Match)."""
    return f"public, max-age={max(0, int(max_age))}, must-revalidate"


class NotModified(Exception):
    """The caller's copy is current: answered 304 with no body (see `not_modified`)."""

    def __init__(self, tag: str, cache_control: str, vary: str):
        self.tag, self.cache_control, self.vary = tag, cache_control, vary


def matches(if_none_match: str | None, tag: str) -> bool:
    """If-None-Match's weak comparison (RFC 9110 13.1.2): any listed tag, or *, with W/ ignored."""
    if not if_none_match:
        return False
    mine = tag.removeprefix("W/")
    return any(t.strip() == "*" or t.strip().removeprefix("W/") == mine for t in if_none_match.split(","))


def conditional(request: Request, tag: str, cache_control: str, vary: str = VARY) -> None:
    """Declare the answer's tag and caching; raise NotModified when the caller holds it. Call
    it before doing the work the tag stands for."""
    request.state.cache = (tag, cache_control, vary)
    if matches(request.headers.get("if-none-match"), tag):
        raise NotModified(tag, cache_control, vary)


def published(request: Request, *parts: object, weak: bool = False) -> None:
    """A public read of published data whose body `parts` (with the URL) determine: 304 when the
    caller holds it, else any cache may keep it for cache_max_age_seconds. It does not depend
    on who asks, so it does not vary on Authorization or Cookie."""
    settings = request.app.state.settings
    conditional(request, etag(request.url.path, request.url.query, *parts, weak=weak),
                public(settings.cache_max_age_seconds), vary="")


def url_epoch(settings) -> int:
    """Download URLs signed within one epoch stay valid at least half their lifetime past its
    end, so a copy revalidated within the epoch (its tag names the epoch) still downloads."""
    return int(time.time()) // max(1, settings.url_ttl_seconds // 2)


async def not_modified(request: Request, exc: NotModified):
    from starlette.responses import Response

    headers = {"ETag": exc.tag, "Cache-Control": exc.cache_control}
    if exc.vary:
        headers["Vary"] = exc.vary
    return Response(status_code=304, headers=headers)


def _vary(headers: list[tuple[bytes, bytes]], want: str) -> list[tuple[bytes, bytes]]:
    """`headers` with one Vary naming what it named and `want`."""
    have = [v.decode() for k, v in headers if k == b"vary"]
    names = [n.strip() for v in have for n in v.split(",") if n.strip()]
    for n in want.split(","):
        if n.strip().lower() not in {x.lower() for x in names}:
            names.append(n.strip())
    return [(k, v) for k, v in headers if k != b"vary"] + [(b"vary", ", ".join(names).encode())]


class CacheHeaders:
    """Caching headers on every HTTP answer: a 200 of a route that called `conditional` gets
    its ETag, Cache-Control and Vary; any other answer with no Cache-Control of its own gets
    `private, no-store` and varies on Authorization and Cookie; one that sets a cookie is made
    private. Paths under `static` (the web pages' CSS, scripts, icons: the same for everyone)
    may be kept by any cache for `static_max_age` seconds."""

    def __init__(self, app: ASGIApp, static: tuple[str, ...] = (), static_max_age: int = 600):
        self.app, self.static, self.static_max_age = app, static, static_max_age

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")

        async def headed(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": self._headers(scope, path, msg["status"], list(msg.get("headers", [])))}
            await send(msg)

        await self.app(scope, receive, headed)

    def _headers(self, scope: Scope, path: str, status: int, headers: list) -> list:
        declared = (scope.get("state") or {}).get("cache")
        names = {k for k, _ in headers}
        vary = VARY
        if b"cache-control" in names:  # the answer's own (a 304 says what its 200 said)
            pass
        elif declared is not None and status == 200:
            tag, cc, vary = declared
            headers += [(b"etag", tag.encode()), (b"cache-control", cc.encode())]
        elif path.startswith(self.static) and status in (200, 304):
            headers.append((b"cache-control", public(self.static_max_age).encode()))
            vary = ""
        else:
            headers.append((b"cache-control", PRIVATE.encode()))
        if b"set-cookie" in {k for k, _ in headers}:  # a cookie is one caller's: never for a shared cache
            headers = [(k, v.replace(b"public", b"private") if k == b"cache-control" else v) for k, v in headers]
        return _vary(headers, vary) if vary else headers
