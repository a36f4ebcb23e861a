"""The worker side of the job queue: the task that runs a Job row, the recovery sweeper and
the worker's clean stop. (The Celery app itself, which senders need too, is
coordinator.jobs.broker; the embedded default's worker process, coordinator.jobs.supervisor.)"""

from __future__ import annotations

import logging
import os
import signal
import threading

from celery.signals import worker_ready

from coordinator.jobs import broker
from coordinator.services import jobs
from coordinator.settings import Settings, get_settings

log = logging.getLogger("elmforest.worker")


app = broker.app


@app.task(name=broker.RUN_JOB, bind=True, acks_late=True, max_retries=None)
def run_job(self, job_id: int) -> str:
    try:
        return jobs.run(job_id, get_settings(), max_attempts=get_settings().job_retries)
    except jobs.Transient as e:
        # exponential backoff: 2, 4, 8 ... seconds
        raise self.retry(exc=e, countdown=min(300, 2 ** (self.request.retries + 1))) from e


_sweeping = threading.Event()  # set once this process runs a sweeper


def start_sweeper(settings: Settings | None = None) -> None:
    """Recover unfinished jobs and expire uploads now and every sweep_seconds (once per process)."""
    if not _sweeping.is_set():
        _sweeping.set()
        jobs.sweeper(settings or get_settings(), threading.Event())


@worker_ready.connect
def _on_ready(sender=None, **kw):
    start_sweeper()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _hand_back_and_exit)


def _hand_back_and_exit(signum, frame) -> None:
    """Stop now: the jobs in flight go back to the queue (another worker, or this one
    restarted, runs them again), then the process exits without waiting for them."""
    try:
        ids = jobs.release_running(get_settings())
        if ids:
            log.warning("stopping: handed back jobs %s", ids)
    finally:
        logging.shutdown()
        os._exit(0)

