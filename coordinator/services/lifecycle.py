"""The lifecycle of a contribution: its states, the moves allowed between them, and the one
function that makes a move (and logs who made it and why).

    uploading -> uploaded -> validating -> validated -> evaluated -> approved -> merged -> removed
                                  \\------------\\-> rejected    \\-> declined
    any state before merged -> abandoned (by the owner, or an upload never finished)

A move is a conditional update (`... WHERE state = <from>`), so two processes racing to move
one contribution (a job finishing while its owner abandons it) cannot both win.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from coordinator.errors import Conflict
from coordinator.models import Contribution, ContributionEvent, State, User

ALLOWED: dict[State, set[State]] = {
    State.uploading: {State.uploaded, State.abandoned},
    State.uploaded: {State.validating, State.rejected, State.abandoned},
    State.validating: {State.validated, State.rejected, State.validating, State.abandoned},
    State.validated: {State.evaluated, State.rejected, State.abandoned},
    State.evaluated: {State.approved, State.declined, State.rejected, State.abandoned},
    State.approved: {State.merged, State.declined, State.abandoned},
    State.merged: {State.removed},
    State.rejected: set(),
    State.declined: set(),
    State.removed: set(),
    State.abandoned: set(),
}
FINAL = {s for s, moves in ALLOWED.items() if not moves}
# final states whose weights were never accepted: their bytes are deleted
DISCARDED = {State.rejected, State.declined, State.abandoned}
PUBLIC = {State.merged, State.removed}  # anyone may read these


class Lost(Conflict):
    """The contribution moved on under us (another process changed its state first)."""


def transition(db: Session, c: Contribution, to: State, actor: User | None, reason: str = "",
               details: dict | None = None) -> None:
    if to not in ALLOWED[c.state]:
        raise Conflict(f"contribution {c.id} is {c.state.value}; it cannot become {to.value}")
    if to != c.state:
        done = db.execute(update(Contribution).where(Contribution.id == c.id, Contribution.state == c.state)
                          .values(state=to).execution_options(synchronize_session=False)).rowcount
        if done != 1:
            db.refresh(c)
            raise Lost(f"contribution {c.id} is now {c.state.value}; it cannot become {to.value}")
    db.add(ContributionEvent(contribution_id=c.id, from_state=c.state.value, to_state=to.value,
                             actor_id=actor.id if actor else None, reason=reason, details=details))
    c.state = to
