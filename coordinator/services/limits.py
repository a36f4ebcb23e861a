"""Per-address and per-user rate limits, counted in the database so that they hold across
API processes and backends alike."""

from __future__ import annotations

from datetime import timedelta

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
