"""Rate limits. Per-address and per-user limits on what costs (accounts, wrong passwords,
uploads), counted in the database so that they hold across API processes and backends
alike; and the per-client limit on requests (coordinator.middleware.RateLimit), counted per
minute where every process sees the counts without a write to the database on each read:
in Redis when the broker is Redis (every process of every replica), else in a small SQLite
file in the data directory (every process of this machine, which is every process of an
embedded deployment: its queue is a directory there too)."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from coordinator.errors import TooMany
from coordinator.models import RateEvent, utcnow

HOUR = timedelta(hours=1)


def count(db: Session, bucket: str, window: timedelta = HOUR) -> int:
    return db.scalar(select(func.count()).select_from(RateEvent)
                     .where(RateEvent.bucket == bucket, RateEvent.at > utcnow() - window)) or 0


def check(db: Session, bucket: str, limit: int, what: str, window: timedelta = HOUR) -> None:
    """Refuse with 429 (and Retry-After) once `bucket` has `limit` events in the window."""
    if count(db, bucket, window) >= limit:
        oldest = db.scalar(select(func.min(RateEvent.at)).where(RateEvent.bucket == bucket,
                                                                 RateEvent.at > utcnow() - window))
        wait = int(((oldest + window) - utcnow()).total_seconds()) + 1 if oldest else int(window.total_seconds())
        raise TooMany(f"too many {what} (at most {limit} per {_span(window)}); try again in {wait} s",
                      retry_after=wait)


def record(db: Session, bucket: str) -> None:
    db.add(RateEvent(bucket=bucket))


def purge(db: Session, older_than: timedelta = timedelta(days=1)) -> int:
    return db.execute(delete(RateEvent).where(RateEvent.at < utcnow() - older_than)).rowcount or 0


def _span(w: timedelta) -> str:
    return "hour" if w == HOUR else f"{int(w.total_seconds())} s"


# ----------------------------------------------------------------------------- requests per minute


class RedisWindows:
    """Counts per key and fixed window in Redis: one INCR (and EXPIRE) per hit."""

    def __init__(self, url: str, prefix: str):
        self.url, self.prefix = url, prefix
        self._client = None
        self._async = None  # the server's event loop's client (ahit)

    def hit(self, key: str, window: int) -> tuple[int, float]:
        """Count a hit of `key`; the hits in its current window so far, and the seconds left of it."""
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        now = time.time()
        k = f"{self.prefix}:rate:{key}:{int(now // window)}"
        p = self._client.pipeline(transaction=True)
        p.incr(k)
        p.expire(k, 2 * window)
        n, _ = p.execute()
        return int(n), window - now % window

    async def ahit(self, key: str, window: int) -> tuple[int, float]:
        """`hit` without a thread: awaited in the server's event loop (one round trip)."""
        if self._async is None:
            import redis.asyncio

            self._async = redis.asyncio.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        now = time.time()
        k = f"{self.prefix}:rate:{key}:{int(now // window)}"
        async with self._async.pipeline(transaction=True) as p:
            p.incr(k)
            p.expire(k, 2 * window)
            n, _ = await p.execute()
        return int(n), window - now % window


class FileWindows:
    """Counts per key and fixed window in a SQLite file of their own (not the coordinator's
    database: no request waits behind a job's write for them). One connection per process,
    used by one caller at a time: `hit_now` in the server's event loop when it is free and the
    file's write lock is too (no wait: tens of microseconds), else `hit` on a thread, which
    waits its turn (another process may be writing)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._c: sqlite3.Connection | None = None
        self._purged = 0

    def _conn(self) -> sqlite3.Connection:
        if self._c is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            c = sqlite3.connect(self.path, timeout=2, isolation_level=None, check_same_thread=False)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=OFF")  # counts, not records: a crash may lose a few
            c.execute("CREATE TABLE IF NOT EXISTS hits (k TEXT, w INTEGER, n INTEGER, PRIMARY KEY (k, w)) WITHOUT ROWID")
            c.execute("PRAGMA busy_timeout=0")  # never wait inside a statement: `hit` waits between tries
            self._c = c
        return self._c

    def hit(self, key: str, window: int, patience: float = 2.0) -> tuple[int, float]:
        """Count a hit of `key`; the hits in its current window so far, and the seconds left of
        it. Waits up to `patience` seconds for another process's write."""
        end = time.monotonic() + patience
        while True:
            with self._lock:
                try:
                    return self._hit(self._conn(), key, window)
                except sqlite3.OperationalError:
                    if time.monotonic() > end:
                        raise
            time.sleep(0.002)

    def hit_now(self, key: str, window: int) -> tuple[int, float] | None:
        """`hit`, if it needs no wait; else None (the caller then counts on a thread, with `hit`)."""
        if self._c is None or not self._lock.acquire(blocking=False):
            return None
        try:
            return self._hit(self._c, key, window)
        except sqlite3.OperationalError:  # another process is writing the file
            return None
        finally:
            self._lock.release()

    def _hit(self, c: sqlite3.Connection, key: str, window: int) -> tuple[int, float]:
        now = time.time()
        w = int(now // window)
        n = c.execute("INSERT INTO hits VALUES (?, ?, 1) ON CONFLICT (k, w) DO UPDATE SET n = n + 1 RETURNING n",
                      (key, w)).fetchone()[0]
        if w > self._purged:  # once a window per process: forget the windows before the last
            self._purged = w
            c.execute("DELETE FROM hits WHERE w < ?", (w - 1,))
        return int(n), window - now % window


def request_counter(settings) -> RedisWindows | FileWindows:
    """Where the per-client request counts live (see the module's docstring)."""
    url = settings.broker_url or ""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisWindows(url, settings.queue)
    return FileWindows(settings.data_dir / "ratelimit.db")
