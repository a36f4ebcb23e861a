from __future__ import annotations

from fastapi import APIRouter, Query, status

from coordinator.api.deps import DB, Contributor, Maintainer
from coordinator.schemas import DomainIn, DomainOut, DomainPatch, Error, EvalDataIn
from coordinator.services import domains

router = APIRouter(prefix="/domains", tags=["domains"],
                   responses={400: {"model": Error}, 401: {"model": Error}, 403: {"model": Error}, 404: {"model": Error}, 422: {"model": Error}})


@router.get("", response_model=list[DomainOut])
def list_domains(db: DB, role: str | None = Query(default=None, pattern="^(train|eval)$"), include_retired: bool = False):
    return domains.list_(db, role, include_retired)


@router.get("/{name}", response_model=DomainOut)
def get_domain(name: str, db: DB):
    return domains.get(db, name)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DomainOut, responses={409: {"model": Error}})
def create_domain(body: DomainIn, user: Contributor, db: DB):
    """Declare a domain (contributors: train domains; maintainers: either role)."""
    return domains.create(db, user, **body.model_dump())


@router.patch("/{name}", response_model=DomainOut)
def update_domain(name: str, body: DomainPatch, user: Maintainer, db: DB):
    """Change a domain's role or retire it (maintainers)."""
    return domains.update(db, user, name, body.role, body.status, body.description)


@router.put("/{name}/eval-data", response_model=DomainOut, responses={400: {"model": Error}})
def set_eval_data(name: str, body: EvalDataIn, user: Contributor, db: DB):
    """Attach held-out evaluation data (an uploaded file) to a domain (its creator or a maintainer)."""
    return domains.set_eval_data(db, user, name, body.sha256)
