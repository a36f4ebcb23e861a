"""Federated rounds: maintainers create them (a Flower ServerApp runs them, see
coordinator/federated) and follow each node's part."""

from __future__ import annotations

from fastapi import APIRouter, Query, status

from coordinator.api.deps import DB, Id, Maintainer
from coordinator.schemas import Error, RoundIn, RoundOut
from coordinator.services import rounds

router = APIRouter(tags=["rounds"], responses={400: {"model": Error}, 401: {"model": Error}, 403: {"model": Error},
                                               404: {"model": Error}, 409: {"model": Error},
                                               422: {"model": Error}})


@router.post("/rounds", status_code=status.HTTP_201_CREATED, response_model=RoundOut)
def create_round(body: RoundIn, user: Maintainer, db: DB):
    """Create a pending round for a forest; `elmforest round start` then submits the Flower
    run that executes it (`flwr run ... --run-config round-id=ID`)."""
    cfg = body.model_dump(exclude={"forest", "note"})
    r = rounds.create(db, user, body.forest, cfg, body.note)
    db.refresh(r)
    return rounds.summary(db, r)


@router.get("/rounds", response_model=list[RoundOut])
def list_rounds(user: Maintainer, db: DB, forest: str | None = Query(default=None, max_length=64),
                limit: int = Query(default=50, ge=1, le=500)):
    """Recent rounds, newest first, with each node's status."""
    return [rounds.summary(db, r) for r in rounds.list_(db, user, forest, limit)]


@router.get("/rounds/{round_id}", response_model=RoundOut)
def get_round(round_id: Id, user: Maintainer, db: DB):
    return rounds.summary(db, rounds.get(db, user, round_id))


@router.post("/rounds/{round_id}/cancel", response_model=RoundOut)
def cancel_round(round_id: Id, user: Maintainer, db: DB):
    """Stop a pending or running round; ELMs already uploaded stay."""
    return rounds.summary(db, rounds.cancel(db, user, round_id))
