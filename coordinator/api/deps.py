"""Dependencies as Annotated aliases: the database session, settings, storage and the
caller (from a bearer API token), with the scope each route needs declared on the route."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session

from coordinator.db import get_sessionmaker
from coordinator.errors import Forbidden, Unauthorized
from coordinator.models import User
from coordinator.services import users as users_svc
from coordinator.settings import Settings
from coordinator.storage import Storage


# async (they only read the app's state): a plain function dependency would be run on a thread,
# a hand-over each way for every request that names it
async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


_teardown: dict[str, anyio.CapacityLimiter] = {}


def _limiter() -> anyio.CapacityLimiter:
    # its own threads: were ending a session to wait for a request thread while every request
    # thread waits for a connection that only an ending session gives back, all would wait
    if "db" not in _teardown:
        _teardown["db"] = anyio.CapacityLimiter(64)
    return _teardown["db"]


async def get_db(request: Request) -> AsyncIterator[Session]:
    """A session per request, committed when the endpoint returns (before the response goes
    out), rolled back if it raised or the request was cancelled. Commit and close run on
    threads of their own, whatever happened to the request."""
    db = get_sessionmaker(request.app.state.settings.db_url)()  # no connection yet: opened on first use
    ok = False
    try:
        yield db
        ok = True
    finally:
        # shielded: a request cancelled (its client went away) must still give its connection back
        with anyio.CancelScope(shield=True):
            if _ends_at_once(db):
                _end(db, ok)
            else:
                await anyio.to_thread.run_sync(_end, db, ok, limiter=_limiter())


def _ends_at_once(db: Session) -> bool:
    """Whether ending the session waits for nothing, so that it ends here rather than on a
    thread: it holds no transaction (its dependencies released it and the endpoint asked
    nothing more), or a transaction that only read a SQLite file (its end drops a read lock in
    this process, microseconds). A write's commit, or any end of a transaction with a server
    across the network, goes to a thread."""
    if not db.in_transaction():
        return True
    if db.get_bind().dialect.name != "sqlite" or db.new or db.dirty or db.deleted:
        return False
    return not db.connection().info.get("writer")  # set by coordinator.db at a transaction's first write


def _end(db: Session, commit: bool) -> None:
    try:
        if commit and db.in_transaction():
            db.commit()
        else:
            db.rollback()
    finally:
        db.close()


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StorageDep = Annotated[Storage, Depends(get_storage)]
# scope="function": commit before the response goes out, so a client never sees success
# for a write that is not yet (or never) committed
DB = Annotated[Session, Depends(get_db, scope="function")]


def _bearer(request: Request) -> str | None:
    h = request.headers.get("authorization", "")
    if h.lower().startswith("bearer "):
        return h[7:].strip()
    return None


def release(db: Session) -> None:
    """End the session's transaction so its connection goes back to the pool. A dependency
    runs on a thread of its own and the endpoint on another: a connection held between the two
    would wait for a thread while every thread might be waiting for a connection."""
    if db.in_transaction():
        db.commit()


def optional_user(request: Request, db: DB) -> User | None:
    token = _bearer(request)
    if not token:
        return None
    user, t = users_svc.resolve_token(db, token)
    request.state.scopes = set(t.scopes)
    release(db)
    return user


def _scoped(scope: str):
    def dep(request: Request, db: DB) -> User:
        token = _bearer(request)
        if not token:
            raise Unauthorized("log in first: send `Authorization: Bearer <token>` (`elmforest login` stores one)")
        user, t = users_svc.resolve_token(db, token)
        request.state.scopes = set(t.scopes)
        release(db)
        if scope not in t.scopes:
            raise Forbidden(f"this token lacks the {scope!r} scope; create one with it (`elmforest token create`)")
        if scope == "maintain":
            users_svc.require_maintainer(user)
        return user

    return dep


OptionalUser = Annotated[User | None, Depends(optional_user)]
Reader = Annotated[User, Depends(_scoped("read"))]
Contributor = Annotated[User, Depends(_scoped("contribute"))]
Maintainer = Annotated[User, Depends(_scoped("maintain"))]


# database ids: bounded so a huge number is a 422, not an overflow in the driver
Id = Annotated[int, Path(ge=1, le=2**31 - 1)]
