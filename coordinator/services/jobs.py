"""Jobs: rows in the database are the truth, Celery only delivers them.

`enqueue` is idempotent per (kind, key): asking twice for the same work returns the same
job. A runner claims a queued job atomically, names
itself on the row (host, pid and process start), heartbeats while it works, and records the
outcome in the same transaction as the work, on condition that the job is still its own. So
a runner killed mid-job leaves a job that the next one runs again, and the outcome is
recorded exactly once. `recover` finds jobs whose runner died (at once on the same host, by
an expired heartbeat elsewhere) and queues them again; every backend calls it at start and
periodically. A job whose runner died too often fails with a reason; every failed job can be
retried by a maintainer.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
from collections.abc import Callable
from datetime import timedelta
from functools import cache

from sqlalchemy import event, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from coordinator.errors import Conflict, NotFound, ServiceError, public
from coordinator.models import (
    AveragedModel,
    BranchInit,
    BranchStatus,
    Contribution,
    ContributionEvent,
    Job,
    JobStatus,
    MoeExport,
    User,
    utcnow,
)

log = logging.getLogger("elmforest.jobs")
REDISPATCH = timedelta(seconds=60)  # a queued job not picked up within this is dispatched again


class Transient(Exception):
    """A failure worth retrying (database or store unreachable)."""


def _handlers() -> dict[str, Callable]:
    from coordinator.services import (
        averages,
        branches,
        contributions,
        forests,
        leaderboard,
        moe,
        values,
    )

    def publish(db, storage, settings, payload):
        f = forests.get(db, payload["forest"])
        actor = db.get(User, payload["actor_id"]) if payload.get("actor_id") else None
        v = forests.publish(db, storage, f, actor, payload.get("add"), payload.get("remove"), payload.get("note", ""),
                            publish_key=payload["key"])
        enqueue(db, "evaluate_version", f"version:{v.id}", {"version_id": v.id}, owner=actor)
        return {"version": v.number}

    def validate(db, storage, settings, payload):
        r = contributions.validate(db, storage, settings, payload["contribution_id"])
        if r.get("ok"):
            c = db.get(Contribution, payload["contribution_id"])
            enqueue(db, "evaluate", f"contribution:{c.id}", {"contribution_id": c.id}, owner=c.owner)
        return r

    return {
        "branch_init": lambda db, s, st, p: branches.compute(db, s, st, p["branch_init_id"]),
        "validate": validate,
        "evaluate": lambda db, s, st, p: contributions.evaluate(db, s, st, p["contribution_id"]),
        "publish": publish,
        "evaluate_version": lambda db, s, st, p: leaderboard.evaluate_version(db, s, st, p["version_id"]),
        "average": lambda db, s, st, p: averages.build(db, s, st, p["average_id"]),
        "values": lambda db, s, st, p: values.compute(db, s, st, p["version_id"]),
        "moe_export": lambda db, s, st, p: moe.build(db, s, st, p["moe_id"]),
        "moe_tune": lambda db, s, st, p: moe.tune(db, s, st, p["moe_id"]),
    }


KINDS = ("branch_init", "validate", "evaluate", "publish", "evaluate_version", "average", "values", "moe_export",
         "moe_tune")
# jobs that build one artifact row, which shows their failure (and is asked for again on a retry)
ARTIFACT_ROWS = {"branch_init": (BranchInit, "branch_init_id"), "average": (AveragedModel, "average_id"),
                 "moe_export": (MoeExport, "moe_id"), "moe_tune": (MoeExport, "moe_id")}


# ----------------------------------------------------------------------------- enqueue, read


def enqueue(db: Session, kind: str, key: str, payload: dict, owner: User | None = None) -> Job:
    """The job doing `kind` of work on `key`, queued unless it is queued, running or done.
    `owner` (who asked) may read it; maintainers read every job."""
    job = db.scalar(select(Job).where(Job.kind == kind, Job.key == key))
    if job is None:
        job = Job(kind=kind, key=key, payload={**payload, "key": f"{kind}:{key}"}, owner_id=owner.id if owner else None)
        db.add(job)
        db.flush()
    elif job.status == JobStatus.failed:
        job.status, job.error, job.attempts = JobStatus.queued, None, 0
    elif job.status == JobStatus.succeeded and kind in ("evaluate_version",):
        job.status = JobStatus.queued  # re-evaluations are wanted (new domains, new data)
    else:
        return job  # already queued, running or done
    job.dispatched_at = utcnow()
    after_commit(db, lambda: dispatch(job.id))
    return job


def request_publish(db: Session, forest, user: User, add: list[int] | None = None, remove: list[int] | None = None,
                    note: str = "", owner: User | None = None) -> Job:
    """The publish job merging `add` (None: every approved contribution) and forgetting
    `remove` into the forest's next version. Keyed by the version it starts from and what it
    merges, so asking twice (a retried request, a double click) queues it once."""
    remove = remove or []
    key = f"{forest.name}:v{forest.current_version}:{sorted(add) if add is not None else 'approved'}:{sorted(remove)}"
    return enqueue(db, "publish", key, {"forest": forest.name, "add": add, "remove": remove, "note": note,
                                        "actor_id": user.id}, owner=owner)


def get(db: Session, job_id: int, user: User | None = None) -> Job:
    """A job, as `user` may see it: their own, or any for maintainers (None: no check)."""
    j = db.get(Job, job_id)
    if j is None or (user is not None and j.owner_id != user.id and not user.is_maintainer):
        raise NotFound(f"no job {job_id} of yours")
    return j


def latest(db: Session, key: str) -> Job | None:
    """The newest job working on `key` (e.g. "contribution:12")."""
    return db.scalar(select(Job).where(Job.key == key).order_by(Job.id.desc()).limit(1))


def list_(db: Session, user: User, status: str | None = None, limit: int = 100) -> list[Job]:
    q = select(Job).order_by(Job.id.desc()).limit(limit)
    if status:
        q = q.where(Job.status == JobStatus(status))
    if not user.is_maintainer:
        q = q.where(Job.owner_id == user.id)
    return list(db.scalars(q))


def failed(db: Session, limit: int = 100) -> list[Job]:
    return list(db.scalars(select(Job).where(Job.status == JobStatus.failed).order_by(Job.id.desc()).limit(limit)))


def retry(db: Session, job_id: int, user: User) -> Job:
    """Run a failed job again (a maintainer's way out for a job that failed, e.g. out of memory)."""
    j = get(db, job_id, user)
    if j.status != JobStatus.failed:
        raise Conflict(f"job {job_id} is {j.status.value}; only a failed job can be retried")
    j.status, j.error, j.attempts, j.runner, j.dispatched_at = JobStatus.queued, None, 0, None, utcnow()
    _note(db, j, f"retried by {user.username}")
    row = _artifact_row(db, j)
    if row is not None and row.status == BranchStatus.failed:
        row.status, row.error = BranchStatus.requested, None
    after_commit(db, lambda: dispatch(j.id))
    return j


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
    from coordinator.jobs import broker

    broker.send(job_id)


# ----------------------------------------------------------------------------- runners


@cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:8]
    except OSError:
        return "?"


def _start_ticks(pid: int) -> str | None:
    """When a process started (clock ticks since boot), to tell a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def runner_id() -> str:
    """This process, as written on the jobs it runs: host, boot, pid and start time."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{_boot_id()}:{pid}:{_start_ticks(pid) or '?'}"


def runner_dead(runner: str | None) -> bool:
    """True when `runner` ran on this host (this boot) and that process no longer exists. A
    runner on another host is judged by its heartbeat instead."""
    if not runner:
        return False
    try:
        host, boot, pid, start = runner.rsplit(":", 3)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    if boot != _boot_id():
        return True  # this machine restarted since
    return _start_ticks(int(pid)) != start


_running: dict[int, str] = {}  # jobs this process is running now (id -> kind), to hand back on shutdown


def lease(settings) -> timedelta:
    """A running job whose heartbeat is older than this is presumed dead."""
    return timedelta(seconds=settings.job_lease_seconds)


def claim(db: Session, job_id: int) -> bool:
    """Take a queued job. (A job whose runner died is queued again, or failed, by `recover`
    alone, so that one rule counts the attempts.)"""
    now = utcnow()
    r = db.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(status=JobStatus.running, heartbeat_at=now, started_at=now, attempts=Job.attempts + 1,
                runner=runner_id())
    )
    db.commit()
    return r.rowcount == 1


def _mine(job_id: int):
    return (Job.id == job_id) & (Job.status == JobStatus.running) & (Job.runner == runner_id())


def run(job_id: int, settings=None, max_attempts: int = 3) -> str:
    """Run one job to completion in this process. Returns its final status."""
    from coordinator.db import get_sessionmaker
    from coordinator.services.lifecycle import Lost
    from coordinator.settings import get_settings
    from coordinator.storage import make_storage

    settings = settings or get_settings()
    Sm = get_sessionmaker(settings.db_url)
    # known as ours before the claim commits: a stop that comes in between hands it back
    # (release_running only touches a job this process holds as running)
    _running[job_id] = "claiming"
    with Sm() as db:
        if not claim(db, job_id):
            _running.pop(job_id, None)
            j = db.get(Job, job_id)
            return j.status.value if j else "missing"
        job = db.get(Job, job_id)
        kind, payload, attempts = job.kind, dict(job.payload), job.attempts
    stop = threading.Event()
    _running[job_id] = kind
    try:
        settings.work_dir.mkdir(parents=True, exist_ok=True)
        storage = make_storage(settings)
        threading.Thread(target=_heartbeat, args=(Sm, job_id, stop, lease(settings)), daemon=True).start()
        with Sm() as db:
            try:
                result = _handlers()[kind](db, storage, settings, payload)
            except Lost as e:  # someone moved the subject on meanwhile (e.g. its owner abandoned it)
                db.rollback()
                result = {"skipped": e.message}
            except (OperationalError, ConnectionError, TimeoutError) as e:
                db.rollback()
                if attempts < max_attempts:
                    _requeue(Sm, job_id, f"transient: {e}")
                    raise Transient(str(e)) from e
                _fail(Sm, job_id, f"gave up after {attempts} attempts: {e}")
                return "failed"
            except Exception as e:
                db.rollback()
                msg = e.message if isinstance(e, ServiceError) else f"{type(e).__name__}: {e}"
                log.error("job %s (%s) failed: %s\n%s", job_id, kind, msg, traceback.format_exc())
                _fail(Sm, job_id, msg)
                return "failed"
            # the outcome and the work commit together, and only while the job is still ours
            done = db.execute(update(Job).where(_mine(job_id)).values(
                status=JobStatus.succeeded, result=_jsonable(result), error=None, finished_at=utcnow()))
            if done.rowcount != 1:
                db.rollback()  # recovered and handed to another runner meanwhile: its outcome counts
                return "superseded"
            db.commit()
            return "succeeded"
    finally:
        _running.pop(job_id, None)
        stop.set()
        _settle()


def _settle() -> None:
    """After a job (which may have loaded model libraries for the first time): collect once,
    then exempt what remains from full collections (see coordinator.app.settle_memory)."""
    import gc

    gc.collect()
    gc.freeze()


def _heartbeat(Sm, job_id: int, stop: threading.Event, lease_: timedelta) -> None:
    while not stop.wait(lease_.total_seconds() / 4):
        try:
            with Sm() as db:
                db.execute(update(Job).where(_mine(job_id)).values(heartbeat_at=utcnow()))
                db.commit()
        except Exception:
            log.warning("heartbeat of job %s failed", job_id)


def _requeue(Sm, job_id: int, note: str) -> None:
    with Sm() as db:
        db.execute(update(Job).where(_mine(job_id)).values(status=JobStatus.queued, error=note, runner=None))
        db.commit()


def _fail(Sm, job_id: int, msg: str, only_mine: bool = True) -> None:
    with Sm() as db:
        job = db.get(Job, job_id)
        if job is None or (only_mine and (job.status != JobStatus.running or job.runner != runner_id())):
            return
        _fail_row(db, job, msg)
        db.commit()


def _fail_row(db: Session, job: Job, msg: str) -> None:
    """Mark a job failed, and say so where its owner looks (the branch init, the averaged
    model, the contribution's history)."""
    msg = public(msg)[:4000]
    job.status, job.error, job.finished_at, job.runner = JobStatus.failed, msg, utcnow(), None
    row = _artifact_row(db, job)
    if row is not None:
        row.status, row.error = BranchStatus.failed, msg
    _note(db, job, f"{job.kind} job failed: {msg}; a maintainer can retry it (`elmforest review retry {job.id}`), "
                   "or its owner can abandon the contribution")


def _artifact_row(db: Session, job: Job):
    """The branch init, averaged model or MoE export a job builds, if it is one of those."""
    model, key = ARTIFACT_ROWS.get(job.kind, (None, None))
    return db.get(model, job.payload[key]) if model is not None and key in job.payload else None


def _note(db: Session, job: Job, reason: str) -> None:
    """A line in the history of the contribution a job works on (its state unchanged)."""
    if job.kind in ("validate", "evaluate"):
        c = db.get(Contribution, job.payload["contribution_id"])
        if c is not None:
            db.add(ContributionEvent(contribution_id=c.id, from_state=c.state.value, to_state=c.state.value,
                                     reason=reason[:4000], details={"job": job.id}))


def release_running(settings) -> list[int]:
    """Hand back the jobs this process is running (on shutdown): queued again at once, so
    another runner, or this one restarted, takes them over."""
    from coordinator.db import get_sessionmaker

    ids = list(_running)
    if not ids:
        return []
    with get_sessionmaker(settings.db_url)() as db:
        for i in ids:
            db.execute(update(Job).where(_mine(i)).values(status=JobStatus.queued, runner=None, heartbeat_at=None,
                                                          attempts=Job.attempts - 1, error="handed back at shutdown",
                                                          dispatched_at=None))  # the next sweep dispatches it
        db.commit()
    return ids


# ----------------------------------------------------------------------------- recovery


def recover(settings=None) -> dict[str, int]:
    """Queue again every job whose runner died, fail those that died too often, and dispatch
    queued jobs nobody picked up. Safe to run anywhere, any number of times."""
    from coordinator.db import get_sessionmaker
    from coordinator.settings import get_settings

    settings = settings or get_settings()
    now, lease_ = utcnow(), lease(settings)
    out = {"requeued": 0, "failed": 0, "dispatched": 0}
    with get_sessionmaker(settings.db_url)() as db:
        for j in db.scalars(select(Job).where(Job.status == JobStatus.running)):
            if not (runner_dead(j.runner) or (j.heartbeat_at is not None and j.heartbeat_at < now - lease_)):
                continue
            if j.attempts >= settings.job_retries:
                _fail_row(db, j, f"its runner died {j.attempts} times while running it (out of memory, or killed); "
                                 "see the worker's log")
                out["failed"] += 1
            else:
                j.status, j.runner, j.error = JobStatus.queued, None, "its runner died; running it again"
                j.dispatched_at = None
                out["requeued"] += 1
        ids = list(db.scalars(select(Job.id).where(
            Job.status == JobStatus.queued,
            or_(Job.dispatched_at.is_(None), Job.dispatched_at < now - REDISPATCH))))
        if ids:
            db.execute(update(Job).where(Job.id.in_(ids)).values(dispatched_at=now))
        db.commit()
    for i in ids:
        dispatch(i)
    out["dispatched"] = len(ids)
    return out


def sweep(settings=None) -> dict:
    """Everything periodic: job recovery, expired uploads, weights of discarded
    contributions that are still stored, old rate-limit counts."""
    from coordinator.db import get_sessionmaker
    from coordinator.services import contributions, limits, uploads
    from coordinator.settings import get_settings
    from coordinator.storage import make_storage

    settings = settings or get_settings()
    out = {"jobs": recover(settings)}
    storage = make_storage(settings)
    with get_sessionmaker(settings.db_url)() as db:
        out["contributions"] = contributions.sweep(db, storage, settings)
        out["uploads"] = uploads.sweep(db, storage, settings)
        limits.purge(db)
        db.commit()
    return out


def sweeper(settings, stop: threading.Event) -> threading.Thread:
    """A thread that runs `sweep` at once and then every settings.sweep_seconds."""

    def loop():
        while True:
            try:
                r = sweep(settings)
                if any(r["jobs"].values()):
                    log.info("recovery: %s", r["jobs"])
            except Exception:
                log.exception("sweep failed")
            if stop.wait(settings.sweep_seconds):
                return

    t = threading.Thread(target=loop, name="elmforest-sweeper", daemon=True)
    t.start()
    return t


def _jsonable(x):
    import json

    return json.loads(json.dumps(x, default=str)) if x is not None else None
