"""Engine and sessions. One engine per database URL; SQLite gets WAL and a busy timeout so
the API and a worker process can share the file, and one writer at a time per process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

# connections one process may hold: requests admitted at once (settings.max_concurrent_requests)
# plus the process's own threads (job runner and its heartbeat, sweeper, token-use writer, health)
POOL_SIZE, POOL_OVERFLOW = 10, 20
BACKGROUND_CONNECTIONS = 6


@lru_cache
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        from pathlib import Path

        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _):
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
            _private(path)

        _one_writer_at_a_time(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)


def _one_writer_at_a_time(engine: Engine) -> None:
    """SQLite lets one transaction write at a time; a second writer sleeps and polls (in steps
    of up to 100 ms) until the first commits. Within this process writers queue on a lock
    instead and go the moment it is free: a write transaction takes the lock at its first
    write and gives it back at its commit or rollback. (Reads never wait for it.)"""
    lock = threading.Lock()
    writes = ("INSERT", "UPDATE", "DELETE", "REPLACE")

    @event.listens_for(engine, "before_cursor_execute")
    def _take(conn, cursor, statement, parameters, context, executemany):
        if not conn.info.get("writer") and statement.lstrip()[:7].upper().startswith(writes):
            if not lock.acquire(timeout=30):
                from sqlalchemy.exc import OperationalError

                raise OperationalError(statement, parameters, Exception("database is locked (waited 30 s)"))
            conn.info["writer"] = True

    def _give(conn, *args):
        if conn.info.pop("writer", False):
            lock.release()

    event.listen(engine, "commit", _give)
    event.listen(engine, "rollback", _give)

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn, record):  # a connection returned mid-transaction rolls back: free the lock
        if record.info.pop("writer", False):
            lock.release()


def _private(path: str) -> None:
    """The database file and its journal: readable by their owner only."""
    import os

    for suffix in ("", "-wal", "-shm"):
        if path and path != ":memory:" and os.path.exists(path + suffix):
            os.chmod(path + suffix, 0o600)


@lru_cache
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    s = get_sessionmaker(url)()
    try:
        yield s
        s.commit()
    except BaseException:
        s.rollback()
        raise
    finally:
        s.close()
