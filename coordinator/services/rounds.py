"""Federated rounds: what the API, the web and the ServerApp share.

A maintainer creates a round for a forest (pending). A ServerApp picks it up (running),
records each Flower node's part in round_nodes as it goes, checks every branch init and
contribution a node names against the database, and finishes it (succeeded, partial,
failed, empty or cancelled). The decisions themselves are in coordinator.federated.logic.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.errors import BadRequest, Conflict, NotFound
from coordinator.federated import logic
from coordinator.models import (
    BranchInit,
    Contribution,
    Domain,
    DomainRole,
    DomainStatus,
    Round,
    RoundNode,
    RoundStatus,
    State,
    User,
)
from coordinator.services import forests as forests_svc
from coordinator.services.users import require_maintainer

ACTIVE = (RoundStatus.pending, RoundStatus.running)
# a contribution in one of these states means its domain needs no new ELM
LIVE = (State.uploaded, State.validating, State.validated, State.evaluated, State.approved, State.merged)


def _now() -> datetime:
    return datetime.now(UTC)


# ----------------------------------------------------------------------------- maintainers


def create(db: Session, user: User, forest: str, config: dict[str, Any] | None = None, note: str = "") -> Round:
    """A new pending round for `forest`; one active round per forest at a time."""
    require_maintainer(user)
    f = forests_svc.get(db, forest)
    busy = db.scalar(select(Round).where(Round.forest_id == f.id, Round.status.in_(ACTIVE)))
    if busy is not None:
        raise Conflict(f"round {busy.id} of forest {forest!r} is still {busy.status.value}; wait for it to finish "
                       f"or cancel it (`elmforest round cancel {busy.id}`)")
    cfg = logic.RoundConfig.from_dict(config)
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.block_size < 8 or cfg.min_nodes < 1 or cfg.max_attempts < 1:
        raise BadRequest("steps, batch_size, min_nodes and max_attempts must be at least 1, block_size at least 8")
    r = Round(forest_id=f.id, status=RoundStatus.pending, config=cfg.to_dict(), note=note, created_by_id=user.id)
    db.add(r)
    db.flush()
    return r


def get(db: Session, user: User, round_id: int) -> Round:
    require_maintainer(user)
    r = db.get(Round, round_id)
    if r is None:
        raise NotFound(f"no round {round_id}")
    return r


def list_(db: Session, user: User, forest: str | None = None, limit: int = 50) -> list[Round]:
    require_maintainer(user)
    return _rounds(db, forest, limit)


def _rounds(db: Session, forest: str | None, limit: int) -> list[Round]:
    q = select(Round).order_by(Round.id.desc()).limit(limit)
    if forest:
        q = q.where(Round.forest_id == forests_svc.get(db, forest).id)
    return list(db.scalars(q))


def cancel(db: Session, user: User, round_id: int) -> Round:
    """Stop a pending or running round: the ServerApp notices between steps and stops
    asking nodes; ELMs already uploaded stay."""
    r = get(db, user, round_id)
    if r.status not in ACTIVE:
        raise Conflict(f"round {round_id} is {r.status.value}; only pending or running rounds can be cancelled")
    r.finished_at = _now()
    r.status = RoundStatus.cancelled
    r.error = f"cancelled by {user.username}"
    return r


def summary(db: Session, r: Round) -> dict[str, Any]:
    """A round with its per-node status, as plain data (the API's RoundOut, the web's rows).

    A node that timed out but whose ELM arrived later shows that contribution too."""
    late = _late_contributions(db, r)
    nodes = [_node_row(n, _node_contribution(n, late)) for n in r.nodes]
    counts = dict(Counter(n.status for n in r.nodes))  # in the order the nodes show them
    return {
        "id": r.id, "forest": r.forest.name, "version": r.version, "status": r.status.value, "config": r.config,
        "note": r.note, "flower_run_id": r.flower_run_id, "error": r.error,
        "created_by": r.created_by.username if r.created_by else None, "created_at": r.created_at,
        "started_at": r.started_at, "finished_at": r.finished_at, "counts": counts, "nodes": nodes,
    }


def _late_contributions(db: Session, r: Round) -> dict[int, Contribution]:
    """By branch init: the first contribution made from the init of a node the round recorded
    without one (it timed out, and its ELM arrived later)."""
    missing = [n.branch_init_id for n in r.nodes if n.contribution_id is None and n.branch_init_id]
    late: dict[int, Contribution] = {}
    if missing:
        for c in db.scalars(select(Contribution).where(Contribution.branch_init_id.in_(missing))):
            late.setdefault(c.branch_init_id, c)
    return late


def _node_contribution(n: RoundNode, late: dict[int, Contribution]) -> Contribution | None:
    """The node's contribution: the one it named, else its owner's late one from its init."""
    if n.contribution is not None:
        return n.contribution
    c = late.get(n.branch_init_id)
    return c if c is not None and c.owner_id == n.owner_id else None


def _node_row(n: RoundNode, c: Contribution | None) -> dict[str, Any]:
    """One node of a round's summary, with its contribution `c` (if any)."""
    return {
        "node_id": n.node_id, "domain": n.domain, "owner": n.owner.username if n.owner else None,
        "status": n.status, "reason": n.reason, "attempt": n.attempt, "documents": n.documents,
        "data_bytes": n.data_bytes, "branch_init_id": n.branch_init_id,
        "contribution_id": c.id if c else None, "contribution_state": c.state.value if c else None,
        "contribution_name": c.name if c else None, "late": bool(c and n.contribution_id is None),
        "metrics": n.metrics, "updated_at": n.updated_at,
    }


def list_with_nodes(db: Session, forest: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Recent rounds, newest first, each with its per-node status (for the web's rounds page;
    the caller decides who may see them: maintainers)."""
    return [summary(db, r) for r in _rounds(db, forest, limit)]


# ----------------------------------------------------------------------------- the ServerApp


def start(db: Session, round_id: int, flower_run_id: str | None = None) -> Round:
    """pending -> running, once: a second ServerApp run for the same round is refused."""
    r = db.get(Round, round_id, with_for_update=True)
    if r is None:
        raise NotFound(f"no round {round_id}; create one first (`elmforest round start`)")
    if r.status != RoundStatus.pending:
        raise Conflict(f"round {round_id} is {r.status.value}, not pending; each round runs once "
                       "(start a new one for the domains that failed)")
    r.status = RoundStatus.running
    r.started_at = _now()
    r.version = r.forest.current_version
    r.flower_run_id = flower_run_id
    return r


def is_cancelled(db: Session, round_id: int) -> bool:
    return db.scalar(select(Round.status).where(Round.id == round_id)) == RoundStatus.cancelled


def trainable_domains(db: Session) -> dict[str, str | None]:
    """Every registered domain -> None if a node may train an ELM for it, else why not."""
    out: dict[str, str | None] = {}
    for d in db.scalars(select(Domain)):
        if d.status != DomainStatus.active:
            out[d.name] = "the domain is retired"
        elif d.role != DomainRole.train:
            out[d.name] = "an evaluation domain (ELMs are trained for train domains)"
        elif d.eval_data_sha256 is None:
            out[d.name] = "the domain has no held-out evaluation data yet, so no ELM for it could be evaluated"
        else:
            out[d.name] = None
    return out


def domain_history(db: Session, r: Round) -> dict[str, logic.DomainHistory]:
    """For each domain: is there a live ELM of it in the forest (uploaded or later, from a
    round or an ordinary upload), and how many earlier rounds failed at it in a row."""
    hist: dict[str, logic.DomainHistory] = {}
    live = db.execute(select(Domain.name, Contribution.id, Contribution.state)
                      .join(Contribution, Contribution.domain_id == Domain.id)
                      .where(Contribution.forest_id == r.forest_id, Contribution.state.in_(LIVE))
                      .order_by(Contribution.id))
    for name, cid, state in live:
        hist.setdefault(name, logic.DomainHistory()).done = f"contribution {cid} is {state.value}"
    rows = db.execute(select(RoundNode.domain, RoundNode.status).join(Round, Round.id == RoundNode.round_id)
                      .where(Round.forest_id == r.forest_id, Round.id < r.id, RoundNode.domain.is_not(None))
                      .order_by(RoundNode.round_id, RoundNode.id))
    for name, status in rows:
        h = hist.setdefault(name, logic.DomainHistory())
        if status in logic.UNSUCCESSFUL:
            h.failures += 1
        elif status == logic.SUBMITTED:
            h.failures = 0
    return hist


def record_plan(db: Session, r: Round, reports: list[logic.NodeReport], decisions: dict[str, logic.Decision]) -> None:
    """One row per node. Its owner stays unset until the coordinator vouches for it (the
    requester of the node's branch init); what the node says about itself goes to metrics."""
    for rep in reports:
        d = decisions[rep.node_id]
        said = {k: v for k, v in (("reported_owner", rep.owner), ("device", rep.device)) if v}
        db.add(RoundNode(round_id=r.id, node_id=rep.node_id, domain=rep.domain, status=d.status, reason=d.reason,
                         attempt=d.attempt, documents=rep.documents, data_bytes=rep.data_bytes,
                         metrics=said or None))
    db.flush()


def node(db: Session, r: Round, node_id: str) -> RoundNode:
    n = db.scalar(select(RoundNode).where(RoundNode.round_id == r.id, RoundNode.node_id == node_id))
    if n is None:
        raise NotFound(f"node {node_id} has no part in round {r.id}")
    return n


def set_status(db: Session, r: Round, node_id: str, status: str, reason: str = "") -> RoundNode:
    n = node(db, r, node_id)
    n.status = status
    if reason:
        n.reason = logic.clean_text(reason)
    return n


def claim_init(db: Session, r: Round, node_id: str, init_id: int) -> BranchInit:
    """The branch init a node says it requested: it must exist, be for the round's forest and
    the node's domain, and not be claimed already. Its requester (authenticated by the
    owner's API token at the coordinator) is the node's owner from now on."""
    n = node(db, r, node_id)
    b = db.get(BranchInit, init_id)
    if b is None or b.forest_id != r.forest_id:
        raise BadRequest(f"branch init {init_id} is not an init of forest {r.forest.name!r}")
    if b.domain.name != n.domain:
        raise BadRequest(f"branch init {init_id} is for domain {b.domain.name!r}, the node serves {n.domain!r}")
    other = db.scalar(select(RoundNode).where(RoundNode.branch_init_id == init_id, RoundNode.id != n.id))
    if other is not None:
        raise Conflict(f"branch init {init_id} already belongs to node {other.node_id} of round {other.round_id}")
    n.branch_init_id = b.id
    n.owner_id = b.requested_by_id
    n.status = logic.BRANCHING
    owner = db.get(User, b.requested_by_id)
    n.reason = f"branch init {b.id}, requested by {owner.username if owner else '?'}"
    return b


def init_state(db: Session, init_id: int) -> tuple[str, BranchInit]:
    b = db.get(BranchInit, init_id)
    db.refresh(b)
    return b.status.value, b


def taken_names(db: Session, r: Round) -> set[str]:
    from coordinator.services.contributions import FINAL

    return set(db.scalars(select(Contribution.name).where(Contribution.forest_id == r.forest_id,
                                                          Contribution.state.not_in(FINAL))))


def claim_contribution(db: Session, r: Round, node_id: str, cid: int, metrics: dict | None = None) -> Contribution:
    """The contribution a node says it uploaded: it must be trained from the node's init and
    owned by the init's requester. It is then part of the round."""
    n = node(db, r, node_id)
    c = db.get(Contribution, cid)
    if c is None or n.branch_init_id is None or c.branch_init_id != n.branch_init_id:
        raise BadRequest(f"contribution {cid} was not trained from the node's branch init {n.branch_init_id}")
    if c.owner_id != n.owner_id:
        raise BadRequest(f"contribution {cid} is not owned by the node's owner")
    c.round_id = r.id
    n.contribution_id = c.id
    n.status = logic.SUBMITTED
    n.reason = f"uploaded as contribution {c.id} ({c.name})"
    if metrics:
        n.metrics = {**(n.metrics or {}), **metrics}
    return c


def finish(db: Session, round_id: int, error: str | None = None) -> Round:
    """Attach ELMs that arrived after their node's time-out, then the final status."""
    r = db.get(Round, round_id)
    db.refresh(r)
    for n in r.nodes:
        if n.contribution_id is None and n.branch_init_id:
            c = db.scalar(select(Contribution).where(Contribution.branch_init_id == n.branch_init_id,
                                                     Contribution.owner_id == n.owner_id,
                                                     Contribution.state.in_(LIVE)))
            if c is not None:
                c.round_id = r.id
                n.contribution_id = c.id
                n.reason = f"{n.reason}; its ELM arrived anyway as contribution {c.id}"
                n.status = logic.SUBMITTED
    cancelled = r.status == RoundStatus.cancelled
    status = logic.final_status([n.status for n in r.nodes], cancelled=cancelled, error=error)
    r.status = RoundStatus(status)
    if error:
        r.error = logic.clean_text(error)
    elif status == "failed" and not r.nodes:
        r.error = "no Flower node connected"
    r.finished_at = _now()
    return r
