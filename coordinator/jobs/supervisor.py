"""The embedded default's job worker, as a child process of `elmforest serve`: heavy jobs
(evaluations, averages, validation of large files) never run in the interpreter that answers
requests. The child is `python -m coordinator.jobs`, which runs the very command `elmforest
worker` runs, against the same (broker-less, filesystem) queue. It lives in a process group
of its own, so a Ctrl-C at the terminal reaches the server only, which then stops it (SIGTERM:
it hands back its job in flight); if it dies, it is started again; if the server dies, it
follows (follow_parent). A job its dead runner left behind is queued again by the recovery
sweep (coordinator.services.jobs.recover) and run once more, as with any worker."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("elmforest.worker")

PARENT_ENV = "ELMFOREST_WORKER_PARENT"  # the pid the child follows
LONG_LIFE = 60.0  # a child that lived this long died of something new: start it again at once
MAX_DELAY = 30.0


class WorkerProcess:
    """Start `cmd` as a child and keep it running until `stop`: after a death, again after a
    delay that doubles while it keeps dying young (1 s, 2 s, ... 30 s)."""

    def __init__(self, cmd: list[str] | None = None, stop_grace: float = 5.0):
        self.cmd = cmd or [sys.executable, "-m", "coordinator.jobs", "--loglevel", "WARNING", "--quiet"]
        self.stop_grace = stop_grace
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a start and a stop never cross
        self._thread = threading.Thread(target=self._keep_running, name="elmforest-worker-supervisor", daemon=True)

    def start(self) -> WorkerProcess:
        self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            env = {**os.environ, PARENT_ENV: str(os.getpid())}
            # its own process group: signals for the server's group (a terminal's Ctrl-C) do not
            # reach it; the server stops it, after it has stopped answering
            self.proc = subprocess.Popen(self.cmd, env=env, process_group=0)
            self.starts += 1
            return self.proc

    def _keep_running(self) -> None:
        delay = 1.0
        while True:
            p = self._spawn()
            if p is None:
                return
            born = time.monotonic()
            code = p.wait()
            if self._stopping.is_set():
                return
            delay = 1.0 if time.monotonic() - born > LONG_LIFE else delay
            log.warning("the job worker (pid %s) exited with %s; starting it again in %.0f s", p.pid, code, delay)
            if self._stopping.wait(delay):
                return
            delay = min(MAX_DELAY, delay * 2)

    def stop(self) -> None:
        """Stop the child (SIGTERM: it hands back its job in flight; SIGKILL after the grace)
        and start no other."""
        with self._lock:
            self._stopping.set()
            p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
            try:
                p.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
        if self._thread.is_alive():
            self._thread.join(self.stop_grace)


def follow_parent() -> None:
    """In the child: stop (SIGTERM, which hands back the job in flight) when the process that
    started it is gone, however it ended (a SIGKILL too)."""
    want = os.environ.get(PARENT_ENV)
    if not want:
        return
    parent = int(want)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # gone before this was set up
        os._exit(0)

    def watch() -> None:  # wherever there is no parent-death signal
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="elmforest-follow-parent", daemon=True).start()
