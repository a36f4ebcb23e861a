"""create_app: the coordinator's FastAPI application (the API under /api/v1, /healthz). The
`elmforest` command composes it with the web pages (elmforest_cli.create_app)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from btm.errors import BTMError
from coordinator.caching import CacheHeaders, NotModified, ResponseCache, not_modified
from coordinator.errors import ServiceError, public
from coordinator.middleware import BodyLimit, Lane, Overload, RateLimit
from coordinator.schemas import Error
from coordinator.services import limits
from coordinator.settings import Settings, get_settings
from coordinator.storage import make_storage

log = logging.getLogger("elmforest")


def secure_data_dir(settings: Settings) -> None:
    """The embedded default keeps everything under data_dir: only its owner may read it."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(settings.data_dir, 0o700)


def create_app(settings: Settings | None = None, extend: Callable[[FastAPI], None] | None = None) -> FastAPI:
    """The API. `extend(app)` adds more routes (the web pages) before the admission and body
    limits wrap everything, so they hold for those routes too. No job runs in this process:
    jobs run in `elmforest worker` processes (on the embedded default, the one `elmforest
    serve` starts as its child: coordinator.jobs.supervisor)."""
    settings = settings or get_settings()
    secure_data_dir(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from coordinator.jobs import celery_app
        from coordinator.migrate import check_at_head

        check_at_head(settings.db_url)
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        if hasattr(app.state.storage, "ensure_bucket"):
            app.state.storage.ensure_bucket()
        celery_app.start_sweeper(settings)  # dead jobs run again, expired uploads go: on every backend
        share_the_interpreter()
        settle_memory()
        yield

    app = FastAPI(
        title="elmforest coordinator",
        version="1",
        description="Grow one language model as a forest of expert LMs: domains, branch inits, "
        "contributions, forests and their versions.",
        lifespan=lifespan,
        openapi_url="/openapi.json",
    )
    app.state.settings = settings
    app.state.storage = make_storage(settings)
    add_error_handlers(app)

    from coordinator.api import (
        accounts,
        contributions,
        domains,
        forests,
        rounds,
        storage,
        uploads,
        values,
    )

    for r in (accounts, domains, uploads, storage, forests, values, contributions, rounds):
        app.include_router(r.router, prefix="/api/v1", responses=BUSY)

    health_lock = threading.Lock()

    @app.get("/healthz", tags=["health"])
    async def healthz():
        """Liveness and the database: answered outside the request thread pool, so it stays
        responsive while the pool is busy."""

        def check():
            from coordinator.db import get_engine

            with health_lock, get_engine(settings.db_url).connect() as c:
                c.execute(text("select 1"))

        try:
            await asyncio.wait_for(asyncio.to_thread(check), 5)
        except Exception as e:  # noqa: BLE001 - any failure is "not healthy"
            return JSONResponse({"status": "unhealthy", "database": type(e).__name__}, status_code=503,
                                headers={"Retry-After": "5"})
        return {"status": "ok"}

    if extend is not None:
        extend(app)
    # outermost last: each client's rate, then this process's copies of published reads, then the
    # overload gate, then the body limit
    app.add_middleware(BodyLimit, max_bytes=settings.max_json_bytes, exempt=("/api/v1/storage/parts/",))
    app.add_middleware(Overload, lanes=lanes(settings), exempt=("/healthz", "/api/v1/storage/objects/"))
    # published reads answered from this process's copy need no place, thread or connection
    app.add_middleware(ResponseCache, seconds=settings.response_cache_seconds, inert=INERT_WRITES)
    app.add_middleware(RateLimit, per_minute=settings.requests_per_minute, counter=limits.request_counter(settings),
                       exempt=("/healthz", "/static/", "/api/v1/storage/parts/", "/api/v1/storage/objects/"))
    # outermost: every answer (a 429 or 503 too) says who may keep it
    app.add_middleware(CacheHeaders, static=("/static/",))
    return app


# writes that change nothing a published read shows (so they leave each process's copies of those
# reads as they are): uploads and their parts, accounts' tokens, logins, invitations
INERT_WRITES = ("/api/v1/storage/", "/api/v1/uploads", "/api/v1/auth/", "/api/v1/tokens", "/api/v1/invites",
                "/login", "/logout")

# what any API call may answer whoever asks (coordinator.middleware): documented on every route
BUSY = {429: {"model": Error, "description": "Too many requests from this client; try again after Retry-After "
                                            "seconds."},
        503: {"model": Error, "description": "At capacity; try again after Retry-After seconds."}}


def lanes(settings: Settings) -> list[Lane]:
    """Part uploads stream bytes (no database, no request thread) but make the server copy
    them: a few at a time, the rest wait, never refused (an upload in flight is never dropped;
    its sender is slowed by TCP). Completions hash and check whole files: two at a time, the
    next waits a while (it finishes an upload). The rest share what is left and are refused
    with 503 past it, after waiting up to overload_wait_seconds for a place."""
    n = admitted(settings)
    return [Lane("parts", 4, None, prefixes=("/api/v1/storage/parts/",)),
            Lane("completions", 2, max(COMPLETION_WAIT, settings.overload_wait_seconds), suffixes=("/complete",)),
            Lane("requests", n - 2, settings.overload_wait_seconds)]


COMPLETION_WAIT = 30.0  # seconds an upload's completion may wait for one of its two places


def share_the_interpreter() -> None:
    """Hand the interpreter between threads every 1 ms (Python's default: 5 ms), so a short
    request is not kept waiting behind a thread hashing or checking a large upload."""
    import sys

    sys.setswitchinterval(0.001)


def settle_memory() -> None:
    """Exempt what is loaded so far (the libraries: hundreds of thousands of objects) from the
    garbage collector's full passes, which would otherwise stop every request thread for
    ~0.1 s each time they run."""
    import gc

    gc.collect()
    gc.freeze()


def admitted(settings: Settings) -> int:
    """Requests let in at once. Every one of them can hold a database connection while it
    waits for a thread (FastAPI validates a response on a thread of its own before the session
    closes), so never more than the pool can serve and the threads can run: then no request
    waits on another for either, and none can deadlock."""
    from coordinator.db import BACKGROUND_CONNECTIONS, POOL_OVERFLOW, POOL_SIZE

    return max(1, min(settings.max_concurrent_requests, POOL_SIZE + POOL_OVERFLOW - BACKGROUND_CONNECTIONS,
                      settings.api_threads))


def add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON {"error": {"code", "message"}} with a message that says what to do
    and never a server path."""
    for exc, handler in ((ServiceError, _service_error), (BTMError, _btm_error),
                         (StarletteHTTPException, _http_error), (IntegrityError, _integrity_error),
                         (PoolTimeout, _pool_timeout), (OperationalError, _operational_error),
                         (RequestValidationError, _validation_error), (NotModified, not_modified)):
        app.add_exception_handler(exc, handler)


def _err(status: int, code: str, message: str, headers: dict | None = None, **details) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": public(message), **details}}, status_code=status,
                        headers=headers)


async def _service_error(request: Request, exc: ServiceError):
    return _err(exc.status, exc.code, exc.message, getattr(exc, "headers", None), **exc.details)


async def _btm_error(request: Request, exc: BTMError):
    return _err(422, "unprocessable", str(exc))


async def _http_error(request: Request, exc: StarletteHTTPException):
    # e.g. a body that is not JSON at all: the same error shape as everything else
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request))
    code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
        exc.status_code, "error")
    return _err(exc.status_code, code, str(exc.detail), headers or None)


async def _integrity_error(request: Request, exc: IntegrityError):
    # a constraint the database enforced that no check in the code caught first: in practice two
    # requests racing to create the same thing (a unique name). The loser gets this generic 409,
    # not the specific message the service's own check gives once the row is there.
    return _err(409, "conflict", "that already exists (a concurrent request created it); fetch it or choose "
                "another name")


async def _pool_timeout(request: Request, exc: PoolTimeout):
    return _err(503, "unavailable", "the coordinator is busy; try again shortly", {"Retry-After": "2"})


async def _operational_error(request: Request, exc: OperationalError):
    if "locked" in str(exc.orig).lower() or "busy" in str(exc.orig).lower():
        return _err(503, "unavailable", "the database is busy; try again shortly", {"Retry-After": "1"})
    log.error("database error on %s %s: %s", request.method, request.url.path, exc)
    return _err(503, "unavailable", "the database cannot be reached; try again shortly", {"Retry-After": "5"})


async def _validation_error(request: Request, exc: RequestValidationError):
    problems = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return _err(422, "validation_error", "; ".join(problems)[:2000])


def allowed_methods(request: Request) -> list[str]:
    """Every method some route accepts at this path (Starlette's own 405 names only the first
    matching route's)."""
    path = request.url.path
    methods: set[str] = set()
    for route in api_routes(request.app):
        regex = getattr(route, "path_regex", None)
        if route.methods and regex is not None and regex.match(path):
            methods |= set(route.methods)
    return sorted(methods)


def api_routes(app: FastAPI) -> list:
    """Every route of the app, included routers flattened (their paths with prefixes)."""
    from fastapi.routing import iter_route_contexts

    return [r for r in iter_route_contexts(app.routes) if getattr(r, "methods", None)]
