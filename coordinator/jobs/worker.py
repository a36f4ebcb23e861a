"""`elmforest worker`: a job worker, the command and (as `python -m coordinator.jobs`) the child
process `elmforest serve` starts on the embedded default."""

from __future__ import annotations

from typing import Annotated

import typer


def worker(
    concurrency: Annotated[int, typer.Option(help="Jobs at a time.")] = 1,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    quiet: Annotated[bool, typer.Option("--quiet", help="No start-up banner.")] = False,
    nice: Annotated[int, typer.Option(min=0, max=19, help="Lower the worker's CPU priority by this much: on a "
                                      "machine that also answers requests (the embedded default), the jobs take "
                                      "the CPU that the requests leave. 0: the same priority.")] = 10,
):
    """Run a job worker (Celery) against the configured broker; with none, against the
    embedded queue in ELMFOREST_DATA_DIR (as the worker `elmforest serve` starts does).

    EXAMPLES
      ELMFOREST_BROKER_URL=redis://127.0.0.1:6379/0 elmforest worker --concurrency 2
    """
    import os

    from coordinator.jobs.celery_app import app

    os.umask(0o077)
    if nice:
        os.nice(nice)  # an evaluation next to the API must not hold up its answers
    # threads, not prefork: the jobs in flight live in this process, so a stop can hand them back
    app.worker_main(["--quiet"] * quiet + ["worker", f"--concurrency={concurrency}", f"--loglevel={loglevel}",
                     "--pool=threads" if concurrency > 1 else "--pool=solo", "--without-gossip", "--without-mingle"])
