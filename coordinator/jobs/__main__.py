"""`python -m coordinator.jobs [--concurrency N] [--loglevel L]`: the job worker that `elmforest
serve` starts as its child on the embedded default (coordinator.jobs.supervisor). It runs
the command `elmforest worker` runs, and stops when the process that started it is gone."""

import typer

from coordinator.jobs.supervisor import follow_parent
from coordinator.jobs.worker import worker

if __name__ == "__main__":
    follow_parent()
    typer.run(worker)
