"""create_app: the FastAPI application (API under /api/v1, web pages at /)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from btm.errors import BTMError
from coordinator.errors import ServiceError
from coordinator.settings import Settings, get_settings
from coordinator.storage import make_storage

log = logging.getLogger("elmforest")


def create_app(settings: Settings | None = None, worker: bool | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    run_worker = settings.embedded_broker and settings.embedded_worker if worker is None else worker

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from coordinator.migrate import check_at_head

        check_at_head(settings.db_url)
        if hasattr(app.state.storage, "ensure_bucket"):
            app.state.storage.ensure_bucket()
        if run_worker:
            from coordinator.jobs.celery_app import start_embedded_worker

            start_embedded_worker()
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

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        body = {"error": {"code": exc.code, "message": exc.message, **exc.details}}
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(BTMError)
    async def btm_error(request: Request, exc: BTMError):
        return JSONResponse({"error": {"code": "unprocessable", "message": str(exc)}}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # e.g. a body that is not JSON at all: the same error shape as everything else
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(IntegrityError)
    async def integrity_error(request: Request, exc: IntegrityError):
        # two requests raced to create the same thing; the loser gets what a check would have said
        return JSONResponse({"error": {"code": "conflict", "message": "that already exists (a concurrent request "
                                       "created it); fetch it or choose another name"}}, status_code=409)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"error": {"code": "validation_error", "message": "; ".join(problems)[:2000]}},
                            status_code=422)

    from coordinator.api import accounts, contributions, domains, forests, rounds, storage, uploads

    for r in (accounts, domains, uploads, storage, forests, contributions, rounds):
        app.include_router(r.router, prefix="/api/v1")

    @app.get("/healthz", tags=["health"])
    def healthz():
        from coordinator.db import get_engine

        with get_engine(settings.db_url).connect() as c:
            c.execute(text("select 1"))
        return {"status": "ok"}

    try:
        from web.routes import mount
    except ModuleNotFoundError as e:  # the web package is optional for API-only deployments
        if e.name not in ("web", "web.routes"):
            raise
    else:
        mount(app)
    return app
