"""Domains: what an ELM is an expert on, defined by provenance."""

from __future__ import annotations

import hashlib

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.errors import BadRequest, Conflict, Forbidden, NotFound
from coordinator.models import Domain, DomainRole, DomainStatus, User
from coordinator.names import SLUG
from coordinator.services import uploads
from coordinator.services.users import require_maintainer


def get(db: Session, name: str) -> Domain:
    d = db.scalar(select(Domain).where(Domain.name == name))
    if d is None:
        raise NotFound(f"unknown domain {name!r}; register it first (`elmforest domain register {name}`)")
    return d


def list_(db: Session, role: str | None = None, include_retired: bool = False) -> list[Domain]:
    q = select(Domain).order_by(Domain.name)
    if role:
        q = q.where(Domain.role == DomainRole(role))
    if not include_retired:
        q = q.where(Domain.status == DomainStatus.active)
    return list(db.scalars(q))


def stamp(db: Session) -> str:
    """What pages and leaderboards show of the domains (names, roles, states, descriptions,
    held-out data), as a short hash: part of their HTTP tags, so that a change shows."""
    rows = db.execute(select(Domain.id, Domain.name, Domain.role, Domain.status, Domain.description,
                             Domain.eval_data_sha256).order_by(Domain.id)).all()
    return hashlib.sha256(repr([tuple(str(x) for x in r) for r in rows]).encode()).hexdigest()[:16]


def create(db: Session, user: User, name: str, description: str = "", category: str = "", provenance: str = "",
           license: str = "", role: str = "train") -> Domain:
    if not SLUG.match(name):
        raise BadRequest("domain names are 2-64 lowercase letters, digits, '_' or '-' (e.g. python_stdlib)")
    if role != "train" and not user.is_maintainer:
        raise Forbidden("only maintainers declare evaluation domains; contributors register train domains")
    if db.scalar(select(Domain).where(Domain.name == name)):
        raise Conflict(f"domain {name!r} already exists; pick another name or contribute to it")
    d = Domain(name=name, description=description, category=category, provenance=provenance, license=license,
               role=DomainRole(role), created_by_id=user.id)
    db.add(d)
    db.flush()
    return d


def update(db: Session, user: User, name: str, role: str | None = None, status: str | None = None,
           description: str | None = None) -> Domain:
    d = get(db, name)
    require_maintainer(user, "only maintainers change a domain's role or retire it")
    if role is not None:
        d.role = DomainRole(role)
    if status is not None:
        d.status = DomainStatus(status)
    if description is not None:
        d.description = description
    return d


def held_out_blocks(storage, settings, d: Domain, tokenizer):
    """A domain's held-out data as btm DomainBlocks: exactly posterior_prior_blocks blocks at
    the start estimate the cached prior, and up to eval_scored_blocks after them are scored
    (disjoint, so the experts' weights never come from the text they are judged on). None if
    the data is too short for that."""
    from btm.data import encode_texts, eval_blocks, read_documents
    from btm.evaluate import DomainBlocks
    from coordinator.materialize import blob

    if d.eval_data_sha256 is None:
        return None
    tokens = encode_texts(tokenizer, read_documents(blob(storage, settings.work_dir, d.eval_data_sha256)))
    if len(tokens) < 16:
        return None
    n_prior = settings.posterior_prior_blocks
    size = min(settings.eval_block_size, max(8, (len(tokens) - 1) // 2))
    if (len(tokens) - 1) // size < n_prior + 1:
        return None
    b = eval_blocks(tokens, size, settings.eval_scored_blocks + n_prior)
    return DomainBlocks(d.name, d.role.value, b[n_prior:], b[:n_prior])


def too_short(settings, d: Domain) -> str:
    return (f"domain {d.name!r} has too little held-out text: the cached prior takes its first "
            f"{settings.posterior_prior_blocks} blocks of {settings.eval_block_size} tokens "
            "(ELMFOREST_POSTERIOR_PRIOR_BLOCKS) and at least one more is scored; upload more held-out text")


def set_eval_data(db: Session, user: User, name: str, sha256: str) -> Domain:
    d = get(db, name)
    if not (user.is_maintainer or d.created_by_id == user.id):
        raise Forbidden("only the domain's creator or a maintainer sets its held-out evaluation data")
    up = uploads.require_own(db, user, sha256, ("eval-data",), "evaluation data")
    d.eval_data_sha256 = sha256
    d.eval_data_bytes = up.size
    return d
