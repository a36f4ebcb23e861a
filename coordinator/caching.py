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

import asyncio
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
        vary = VARY
        if b"cache-control" not in {k for k, _ in headers}:  # else the answer's own (a 304 says what its 200 said)
            vary = self._add_cache_control((scope.get("state") or {}).get("cache"), path, status, headers)
        if b"set-cookie" in {k for k, _ in headers}:  # a cookie is one caller's: never for a shared cache
            headers = [(k, v.replace(b"public", b"private") if k == b"cache-control" else v) for k, v in headers]
        return _vary(headers, vary) if vary else headers

    def _add_cache_control(self, declared: tuple | None, path: str, status: int, headers: list) -> str:
        """Cache-Control (and the ETag) for an answer that set none; returns what it varies on."""
        if declared is not None and status == 200:
            tag, cc, vary = declared
            headers += [(b"etag", tag.encode()), (b"cache-control", cc.encode())]
            return vary
        if path.startswith(self.static) and status in (200, 304):
            headers.append((b"cache-control", public(self.static_max_age).encode()))
            return ""
        headers.append((b"cache-control", PRIVATE.encode()))
        return VARY


class ResponseCache:
    """This process keeps the public answers of published reads (a 200 whose route declared
    it public, as `published` does) for `seconds`, and answers the same read from its copy,
    a 304 when If-None-Match holds its tag, without the route, a thread or the database. So a
    crowd reading the same forest costs one rendering a second, not one per reader.

    It is a shared cache in front of the routes, within what the answers allow any cache (they
    are public for cache_max_age_seconds; `seconds` is less): a change published by another
    process (a job worker, another API process or replica) shows here within `seconds`; one
    written through this process (any request other than GET or HEAD that succeeded, except
    under the `inert` paths, which change nothing published: uploads, tokens, logins) at once,
    since that empties it. An answer that varies on the caller (a page, which a signed-in user
    sees otherwise) is kept and given only for requests without credentials (no Authorization,
    no Cookie); one that sets a cookie, is not a 200 or is larger than `max_body` is never
    kept; at most `max_bytes` of bodies are kept, the oldest going first."""

    def __init__(self, app: ASGIApp, seconds: float = 1.0, inert: tuple[str, ...] = (), max_body: int = 1 << 20,
                 max_bytes: int = 64 << 20):
        self.app, self.seconds, self.inert, self.max_body, self.max_bytes = app, seconds, inert, max_body, max_bytes
        self.entries: dict[tuple[str, bytes], _Kept] = {}
        self.flying: dict[tuple[str, bytes], asyncio.Future] = {}  # reads being answered by their route
        self.plain: set[tuple[tuple[str, bytes], bool]] = set()  # reads whose route declared nothing public
        self.size = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._concerns(scope):
            return await self.app(scope, receive, send)
        if scope["method"] != "GET":
            return await self._write(scope, receive, send)
        return await self._read(scope, receive, send)

    def _concerns(self, scope: Scope) -> bool:
        """GETs, and writes that may change something published (not HEAD, OPTIONS or the inert
        writes: uploads, tokens, logins)."""
        if scope["type"] != "http" or self.seconds <= 0 or scope["method"] in ("HEAD", "OPTIONS"):
            return False
        return scope["method"] == "GET" or not scope["path"].startswith(self.inert)

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> None:
        """From the copy when it is fresh and fits this request; else from the route (one
        request at a time per read: the others wait for its answer)."""
        t0 = time.perf_counter()
        key = (scope["path"], scope["query_string"])
        headers = dict(scope["headers"])
        caller = b"authorization" in headers or b"cookie" in headers
        if (key, caller) in self.plain:  # its route answers it for this caller alone
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        kept = await self._fresh(key)
        if kept is not None and kept.fits(headers, caller):
            state["cache"] = kept.declared
            return await kept.answer(send, headers, t0)
        if key in self.flying:
            return await self.app(scope, receive, send)
        flight = self.flying[key] = asyncio.get_running_loop().create_future()
        try:
            # the route's whole answer (no If-None-Match), caught on its way out to be kept
            inner = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"if-none-match"]}
            await self.app(inner, receive, _Catch(self, key, headers, caller, state, flight, send))
        finally:
            del self.flying[key]
            if not flight.done():
                flight.set_result(None)

    async def _fresh(self, key: tuple[str, bytes]) -> _Kept | None:
        """The kept answer to this read while it is fresh, after waiting for the one being made."""
        kept = self.entries.get(key)
        if (kept is None or kept.expires <= time.monotonic()) and key in self.flying:
            kept = await asyncio.shield(self.flying[key])
        return kept if kept is not None and kept.expires > time.monotonic() else None

    async def _write(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A request that may change what is kept: when it succeeded, forget everything."""
        status = 500

        async def seen(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, seen)
        finally:
            if status < 400:
                self.clear()

    def _keep(self, key: tuple[str, bytes], kept: _Kept) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.size -= len(old.body)
        self.entries[key] = kept
        self.size += len(kept.body)
        now = time.monotonic()
        # the oldest first (a dict keeps its keys in the order they came): past the bytes, or expired
        while self.entries and (self.size > self.max_bytes or next(iter(self.entries.values())).expires <= now):
            gone = self.entries.pop(next(iter(self.entries)))
            self.size -= len(gone.body)

    def _plain(self, key: tuple[str, bytes], caller: bool) -> None:
        """This read (with or without credentials) is answered for its caller alone: pass it
        straight to the route from now on (a bounded memory of such reads)."""
        if len(self.plain) >= 50_000:
            self.plain.clear()
        self.plain.add((key, caller))

    def clear(self) -> None:
        self.entries.clear()
        self.size = 0


class _Catch:
    """The `send` of a route answering a read that is not kept: a 200 it may keep is held until
    its body is whole, then kept (and handed to the same reads waiting for it) and sent, as a
    304 when the request holds its tag; anything else goes straight on."""

    def __init__(self, cache: ResponseCache, key: tuple, headers: dict, caller: bool, state: dict,
                 flight: asyncio.Future, send: Send):
        self.cache, self.key, self.headers, self.caller, self.state = cache, key, headers, caller, state
        self.flight, self.send = flight, send
        self.expires = time.monotonic() + cache.seconds
        self.start: dict = {}
        self.chunks: list[bytes] = []
        self.passing = False

    async def __call__(self, msg: Message) -> None:
        if self.passing:
            return await self.send(msg)
        if msg["type"] == "http.response.start":
            return await self._started(msg)
        self.chunks.append(msg.get("body", b""))
        if sum(map(len, self.chunks)) > self.cache.max_body:  # too large to keep: send what came so far
            self.passing = True
            return await _pass_on(self.send, self.start, self.chunks, msg)
        if not msg.get("more_body", False):
            await self._whole()
        return None

    async def _started(self, msg: Message) -> None:
        self.start.update(msg)
        declared = self.state.get("cache")
        if _keepable(msg, declared):
            return
        self.passing = True
        if msg["status"] == 200 and declared is None:
            self.cache._plain(self.key, self.caller)
        await self.send(msg)

    async def _whole(self) -> None:
        declared = self.state["cache"]
        personal = any(n.strip().lower() in ("authorization", "cookie") for n in declared[2].split(","))
        kept = _Kept(self.expires, [(k, v) for k, v in self.start.get("headers", []) if k != b"server-timing"],
                     b"".join(self.chunks), declared, personal,
                     tuple((n, self.headers.get(n)) for n in _varies(declared[2])))
        self.flight.set_result(kept)  # for the same reads that came meanwhile
        if not (personal and self.caller):
            self.cache._keep(self.key, kept)
        if _holds(self.headers, declared):
            return await _send_304(self.send, declared, [])
        await self.send(self.start)
        await self.send({"type": "http.response.body", "body": kept.body})
        return None


def _keepable(start: Message, declared: tuple | None) -> bool:
    """A 200 its route declared public, setting no cookie."""
    return (start["status"] == 200 and declared is not None and declared[1].startswith("public")
            and not any(k == b"set-cookie" for k, _ in start.get("headers", [])))


def _holds(headers: dict[bytes, bytes], declared: tuple) -> bool:
    inm = headers.get(b"if-none-match")
    return inm is not None and matches(inm.decode("latin-1"), declared[0])


async def _send_304(send: Send, declared: tuple, extra: list) -> None:
    """The 304 `not_modified` sends, for a tag, caching and vary the route declared."""
    tag, cc, vary = declared
    raw = [(b"etag", tag.encode()), (b"cache-control", cc.encode()), *extra]
    if vary:
        raw.append((b"vary", vary.encode()))
    await send({"type": "http.response.start", "status": 304, "headers": raw})
    await send({"type": "http.response.body", "body": b""})


async def _pass_on(send: Send, start: dict, chunks: list[bytes], last: Message) -> None:
    """Send what a response has sent so far (its start, its body's first chunks), the rest to follow."""
    await send(start)
    await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
    chunks.clear()
    if not last.get("more_body", False):
        await send({"type": "http.response.body", "body": b""})


def _varies(vary: str) -> list[bytes]:
    """The request headers besides the caller's credentials an answer varies on."""
    return [n.strip().lower().encode() for n in vary.split(",")
            if n.strip() and n.strip().lower() not in ("authorization", "cookie")]


class _Kept:
    __slots__ = ("expires", "headers", "body", "declared", "personal", "varies")

    def __init__(self, expires: float, headers: list, body: bytes, declared: tuple, personal: bool, varies: tuple):
        self.expires, self.headers, self.body, self.declared = expires, headers, body, declared
        self.personal, self.varies = personal, varies

    async def answer(self, send: Send, headers: dict[bytes, bytes], t0: float) -> None:
        """This answer, or a 304 when the request holds its tag."""
        timing = (b"server-timing", f"kept;dur={(time.perf_counter() - t0) * 1000:.2f}".encode())
        if _holds(headers, self.declared):
            return await _send_304(send, self.declared, [timing])
        await send({"type": "http.response.start", "status": 200, "headers": [*self.headers, timing]})
        await send({"type": "http.response.body", "body": self.body})
        return None

    def fits(self, headers: dict[bytes, bytes], caller: bool) -> bool:
        """Whether this answer is the one a request with these headers would get."""
        return not (self.personal and caller) and all(headers.get(k) == v for k, v in self.varies)
