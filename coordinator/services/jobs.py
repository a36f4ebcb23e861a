"""Jobs: rows in the database are the truth, Celery only delivers them.

`enqueue` is idempotent per (kind, key): asking twice for the same work returns the same
job. A worker claims a job atomically (queued, or running with an expired lease), heartbeats
while it runs, and records the outcome in the same transaction as the work, so a worker
killed mid-job leaves a job that the next worker re-runs and whose outcome is recorded once.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import event, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from coordinator.errors import NotFound, ServiceError
from coordinator.models import AveragedModel, BranchInit, BranchStatus, Job, JobStatus, User

log = logging.getLogger("elmforest.jobs")



class Transient(Exception):
    """A failure worth retrying (database or store unreachable)."""


def _handlers() -> dict[str, Callable]:
    from coordinator.services import averages, branches, contributions, forests, leaderboard

    def publish(db, storage, settings, payload):
        f = forests.get(db, payload["forest"])
        actor = db.get(User, payload["actor_id"]) if payload.get("actor_id") else None
        v = forests.publish(db, storage, f, actor, payload.get("add"), payload.get("remove"), payload.get("note", ""),
                            publish_key=payload["key"])
        enqueue(db, "evaluate_version", f"version:{v.id}", {"version_id": v.id})
        return {"version": v.number}

    def validate(db, storage, settings, payload):
        r = contributions.validate(db, storage, settings, payload["contribution_id"])
        if r.get("ok"):
            enqueue(db, "evaluate", f"contribution:{payload['contribution_id']}", payload)
        return r

    return {
        "branch_init": lambda db, s, st, p: branches.compute(db, s, st, p["branch_init_id"]),
        "validate": validate,
        "evaluate": lambda db, s, st, p: contributions.evaluate(db, s, st, p["contribution_id"]),
        "publish": publish,
        "evaluate_version": lambda db, s, st, p: leaderboard.evaluate_version(db, s, st, p["version_id"]),
        "average": lambda db, s, st, p: averages.build(db, s, st, p["average_id"]),
    }


# ----------------------------------------------------------------------------- enqueue


def enqueue(db: Session, kind: str, key: str, payload: dict) -> Job:
    job = db.scalar(select(Job).where(Job.kind == kind, Job.key == key))
    if job is None:
        job = Job(kind=kind, key=key, payload={**payload, "key": f"{kind}:{key}"})
        db.add(job)
        db.flush()
    elif job.status == JobStatus.failed:
        job.status, job.error, job.attempts = JobStatus.queued, None, 0
    elif job.status == JobStatus.succeeded and kind in ("evaluate_version",):
        job.status = JobStatus.queued  # re-evaluations are wanted (new domains, new data)
    else:
        return job  # already queued, running or done
    after_commit(db, lambda: dispatch(job.id))
    return job


def after_commit(db: Session, fn: Callable[[], None]) -> None:
    db.info.setdefault("after_commit", []).append(fn)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    fns = session.info.pop("after_commit", [])
    for fn in fns:
        try:
            fn()
        except Exception:  # the job stays queued; the recovery sweep dispatches it again
            log.exception("could not dispatch a job")


@event.listens_for(Session, "after_rollback")
def _drop_after_rollback(session: Session) -> None:
    session.info.pop("after_commit", None)


def dispatch(job_id: int) -> None:
    from coordinator.jobs import celery_app

    celery_app.run_job.delay(job_id)


def get(db: Session, job_id: int) -> Job:
    j = db.get(Job, job_id)
    if j is None:
        raise NotFound(f"no job {job_id}")
    return j


# ----------------------------------------------------------------------------- run


def lease(settings) -> timedelta:
    """A running job whose heartbeat is older than this is presumed dead."""
    return timedelta(seconds=settings.job_lease_seconds)


def claim(db: Session, job_id: int, lease_: timedelta) -> bool:
    now = datetime.now(UTC)
    r = db.execute(
        update(Job)
        .where(Job.id == job_id,
               or_(Job.status == JobStatus.queued,
                   (Job.status == JobStatus.running) & (Job.heartbeat_at < now - lease_)))
        .values(status=JobStatus.running, heartbeat_at=now, started_at=now, attempts=Job.attempts + 1)
    )
    db.commit()
    return r.rowcount == 1


def run(job_id: int, settings=None, max_attempts: int = 3) -> str:
    """Run one job to completion in this process. Returns its final status."""
    from coordinator.db import get_sessionmaker
    from coordinator.settings import get_settings
    from coordinator.storage import make_storage

    settings = settings or get_settings()
    Sm = get_sessionmaker(settings.db_url)
    with Sm() as db:
        if not claim(db, job_id, lease(settings)):
            j = db.get(Job, job_id)
            return j.status.value if j else "missing"
        job = db.get(Job, job_id)
        kind, payload, attempts = job.kind, dict(job.payload), job.attempts
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    storage = make_storage(settings)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(Sm, job_id, stop, lease(settings)), daemon=True)
    beat.start()
    try:
        with Sm() as db:
            try:
                result = _handlers()[kind](db, storage, settings, payload)
                job = db.get(Job, job_id)
                job.status, job.result, job.error = JobStatus.succeeded, _jsonable(result), None
                job.finished_at = datetime.now(UTC)
                db.commit()
                return "succeeded"
            except (OperationalError, ConnectionError, TimeoutError) as e:
                db.rollback()
                if attempts < max_attempts:
                    _requeue(Sm, job_id, f"transient: {e}")
                    raise Transient(str(e)) from e
                _fail(Sm, job_id, kind, payload, f"gave up after {attempts} attempts: {e}")
                return "failed"
            except Exception as e:
                db.rollback()
                msg = e.message if isinstance(e, ServiceError) else f"{type(e).__name__}: {e}"
                log.error("job %s (%s) failed: %s\n%s", job_id, kind, msg, traceback.format_exc())
                _fail(Sm, job_id, kind, payload, msg)
                return "failed"
    finally:
        stop.set()


def _heartbeat(Sm, job_id: int, stop: threading.Event, lease_: timedelta) -> None:
    while not stop.wait(lease_.total_seconds() / 4):
        try:
            with Sm() as db:
                db.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.running)
                           .values(heartbeat_at=datetime.now(UTC)))
                db.commit()
        except Exception:
            log.warning("heartbeat of job %s failed", job_id)


def _requeue(Sm, job_id: int, note: str) -> None:
    with Sm() as db:
        db.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.queued, error=note))
        db.commit()


def _fail(Sm, job_id: int, kind: str, payload: dict, msg: str) -> None:
    with Sm() as db:
        job = db.get(Job, job_id)
        job.status, job.error, job.finished_at = JobStatus.failed, msg, datetime.now(UTC)
        # the subject says so too, for whoever polls it
        if kind == "branch_init":
            b = db.get(BranchInit, payload["branch_init_id"])
            if b:
                b.status, b.error = BranchStatus.failed, msg
        elif kind == "average":
            a = db.get(AveragedModel, payload["average_id"])
            if a:
                a.status, a.error = BranchStatus.failed, msg
        db.commit()


def recover(settings=None) -> int:
    """Dispatch again every job that is queued or whose worker died (lease expired)."""
    from coordinator.db import get_sessionmaker
    from coordinator.settings import get_settings

    settings = settings or get_settings()
    now, lease_ = datetime.now(UTC), lease(settings)
    with get_sessionmaker(settings.db_url)() as db:
        ids = list(db.scalars(select(Job.id).where(
            or_((Job.status == JobStatus.queued) & (Job.created_at < now - lease_ / 2),
                (Job.status == JobStatus.running) & (Job.heartbeat_at < now - lease_)))))
    for i in ids:
        dispatch(i)
    return len(ids)


def _jsonable(x):
    import json

    return json.loads(json.dumps(x, default=str)) if x is not None else None
