"""Crash points: named places where a crash (power cut, OOM killer, SIGKILL) would leave
a state of its own, so that tests can kill the process at each of them deterministically
and check that a retry recovers from what it left.

`crash_point(name)` does nothing unless the environment variable ELMFOREST_CRASH_AT names
that point; then the process SIGKILLs itself there (no `finally`, no cleanup: a real crash).
ELMFOREST_CRASH_AT=@FILE reads the name from FILE at every check instead, so that a test can
arm and disarm a running server. Never set it in production.
"""

from __future__ import annotations

import os
import signal

VARIABLE = "ELMFOREST_CRASH_AT"


def crash_point(name: str) -> None:
    at = os.environ.get(VARIABLE)
    if not at:
        return
    if at.startswith("@"):
        try:
            with open(at[1:]) as f:
                at = f.read().strip()
        except OSError:
            return
    if at == name:
        os.kill(os.getpid(), signal.SIGKILL)
