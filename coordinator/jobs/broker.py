"""The Celery app, configured from the settings: what both sides of the job queue share.
Production: Redis as the broker. Embedded default: kombu's filesystem transport under the
data directory, so `elmforest serve` needs no broker server yet stays asynchronous (the worker
process it starts as its child consumes the queue: coordinator.jobs.supervisor). Results live in the jobs table, not in a
Celery result backend. Senders name the task (RUN_JOB); its code is coordinator.jobs.celery_app.
"""

from __future__ import annotations

from celery import Celery

from coordinator.settings import Settings, get_settings

RUN_JOB = "elmforest.run_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("elmforest", broker=settings.celery_broker)
    conf = dict(
        task_acks_late=True,  # a worker killed mid-task leaves the message for another
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_default_queue=settings.queue,
    )
    if settings.celery_broker.startswith("filesystem://"):
        q = settings.queue_dir
        for sub in ("messages", "processed", "control"):
            (q / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(q / "messages"),
            "data_folder_out": str(q / "messages"),
            "processed_folder": str(q / "processed"),
            "control_folder": str(q / "control"),  # else kombu writes ./control in the cwd
            "store_processed": False,
        }
    else:
        conf["broker_transport_options"] = {"visibility_timeout": settings.visibility_timeout}
    app.conf.update(conf)
    return app


app = make_celery(get_settings())


def send(job_id: int) -> None:
    """Queue job `job_id` for a worker."""
    app.send_task(RUN_JOB, args=[job_id])
