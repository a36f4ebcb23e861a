from __future__ import annotations

from fastapi import APIRouter, Query, status
from fastapi.responses import Response
from sqlalchemy import func, select

from coordinator.api.deps import (
    DB,
    Contributor,
    Id,
    Maintainer,
    OptionalUser,
    Reader,
    SettingsDep,
    StorageDep,
)
from coordinator.errors import NotFound
from coordinator.models import BranchInit, Contribution, ContributionEvent, Job, State
from coordinator.schemas import (
    AbandonIn,
    BranchIn,
    BranchOut,
    CompleteIn,
    ContributionCreated,
    ContributionIn,
    ContributionOut,
    DecisionIn,
    Error,
    EventOut,
    FilesOut,
    ImportIn,
    JobBrief,
    JobOut,
    RemoveIn,
    UploadOut,
)
from coordinator.services import branches, cache, contributions, forests, jobs
from coordinator.services.lifecycle import DISCARDED, PUBLIC

router = APIRouter(tags=["contributions"],
                   responses={400: {"model": Error}, 401: {"model": Error}, 403: {"model": Error},
                              404: {"model": Error}, 409: {"model": Error}, 413: {"model": Error},
                              422: {"model": Error}})


def branch_out(storage, b: BranchInit, job: Job | None = None) -> BranchOut:
    return BranchOut(id=b.id, forest=b.forest.name, version=b.version.number, domain=b.domain.name, method=b.method,
                     status=b.status.value, posterior=b.posterior, parents=b.parents, files=b.files, error=b.error,
                     urls=forests.file_urls(storage, b.files) if b.files else {}, job_id=job.id if job else None)


def contribution_out(c: Contribution, history: bool = True, db=None) -> ContributionOut:
    out = ContributionOut(
        id=c.id, name=c.name, owner=c.owner.username, forest=c.forest.name, domain=c.domain.name,
        branch_init_id=c.branch_init_id, source=c.source, state=c.state.value, weights_sha256=c.weights_sha256,
        weights_size=c.weights_size, training=c.training, validation=c.validation, evaluation=c.evaluation,
        created_at=c.created_at, updated_at=c.updated_at,
        files=c.files if c.state not in DISCARDED else None,
    )
    if history:
        out.routing_vector = c.routing_vector
        out.history = [EventOut(from_state=e.from_state, to_state=e.to_state, actor=e.actor.username if e.actor else None,
                                reason=e.reason, at=e.at, details=e.details) for e in c.events]
    if db is not None:
        j = jobs.latest(db, f"contribution:{c.id}")
        if j is not None:
            out.job = JobBrief(id=j.id, kind=j.kind, status=j.status.value, error=j.error)
    return out


@router.post("/branch-inits", status_code=status.HTTP_202_ACCEPTED, response_model=BranchOut)
def request_branch_init(body: BranchIn, user: Contributor, db: DB, storage: StorageDep):
    """Ask for a new ELM's initialisation: the posterior-weighted average of the current
    version, from an uploaded sample of the domain or a posterior computed privately."""
    b, needs_job = branches.request(db, user, body.forest, body.domain, body.method, body.sample_sha256, body.posterior)
    job = jobs.enqueue(db, "branch_init", f"branch:{b.id}", {"branch_init_id": b.id}, owner=user) if needs_job else None
    return branch_out(storage, b, job)


@router.get("/branch-inits/{init_id}", response_model=BranchOut)
def get_branch_init(init_id: Id, user: Contributor, db: DB, storage: StorageDep):
    return branch_out(storage, branches.get(db, user, init_id))


@router.post("/contributions", status_code=status.HTTP_201_CREATED, response_model=ContributionCreated)
def create_contribution(body: ContributionIn, user: Contributor, db: DB, storage: StorageDep, settings: SettingsDep):
    """Declare a trained ELM (its weights' sha256 and size, config, training metadata, and
    the routing vector computed where it was trained privately) and get the URLs to upload
    model.safetensors."""
    c, up = contributions.create(db, storage, settings, user, body.forest, body.branch_init_id, body.sha256, body.size,
                                 body.config, body.tokenizer_sha256, body.name, body.training, body.forest_version,
                                 body.routing_vector)
    return ContributionCreated(contribution=contribution_out(c), upload=UploadOut(**up))


@router.post("/forests/{forest}/imports", status_code=status.HTTP_201_CREATED, response_model=ContributionCreated)
def import_checkpoint(forest: str, body: ImportIn, user: Maintainer, db: DB, storage: StorageDep,
                      settings: SettingsDep):
    """For maintainers: bring an existing checkpoint of the forest's family (a Hub model, one
    trained elsewhere) into the forest as an ELM of a domain. Upload its model.safetensors
    like a contribution's; it is validated like one and evaluated against the seed."""
    c, up = contributions.create_import(db, storage, settings, user, forest, body.domain, body.sha256, body.size,
                                        body.config, body.tokenizer_sha256, body.source.model_dump(exclude_none=True),
                                        body.name, body.training, body.routing_vector)
    return ContributionCreated(contribution=contribution_out(c), upload=UploadOut(**up))


@router.get("/contributions", response_model=list[ContributionOut])
def list_contributions(db: DB, user: OptionalUser, state: State | None = None, mine: bool = False,
                       forest: str | None = Query(default=None, max_length=64)):
    return [contribution_out(c, history=False) for c in contributions.list_(db, user, state, mine, forest)]


@router.get("/contributions/{cid}", response_model=ContributionOut)
def get_contribution(cid: Id, db: DB, user: OptionalUser):
    """A contribution's state, its whole history (who, when, why) and the job working on it."""
    # what everyone else sees of a public contribution (a merged ELM's metadata, read by many)
    # is made once per change of it: its row's last update and its last event name the version
    last = (select(func.max(ContributionEvent.id)).where(ContributionEvent.contribution_id == Contribution.id)
            .scalar_subquery())
    row = db.execute(select(Contribution.owner_id, Contribution.state, Contribution.updated_at, last)
                     .where(Contribution.id == cid)).first()
    if row is not None and row.state in PUBLIC and not (user is not None and (
            row.owner_id == user.id or user.is_maintainer)):
        body = cache.boards.get(("contribution", cid, row.updated_at, row[3]), lambda: contribution_out(
            contributions.get(db, None, cid)).model_dump_json().encode())
        return Response(body, media_type="application/json")
    c = contributions.get(db, user, cid)
    return contribution_out(c, db=db if contributions.visible(c, user) else None)


@router.get("/contributions/{cid}/upload", response_model=UploadOut)
def upload_status(cid: Id, user: Contributor, db: DB, storage: StorageDep, settings: SettingsDep):
    """Where the weights upload stands (parts done, fresh URLs), to resume it."""
    return contributions.upload_info(db, storage, settings, user, cid)


@router.post("/contributions/{cid}/complete", response_model=ContributionOut)
def complete(cid: Id, body: CompleteIn, user: Contributor, db: DB, storage: StorageDep, settings: SettingsDep):
    """Finish the upload: the server checks the sha256, then validation starts. Safe to call
    again (after a lost answer or a crash): it finishes what is left."""
    c = contributions.complete_upload(db, storage, settings, user, cid)
    if c.state.value in ("uploaded", "validating"):
        jobs.enqueue(db, "validate", f"contribution:{c.id}", {"contribution_id": c.id}, owner=c.owner)
    return contribution_out(c)


@router.post("/contributions/{cid}/abandon", response_model=ContributionOut)
def abandon(cid: Id, body: AbandonIn, user: Contributor, db: DB, storage: StorageDep, settings: SettingsDep):
    """Withdraw your contribution (any state before merged); its uploaded weights are deleted."""
    return contribution_out(contributions.abandon(db, storage, settings, user, cid, body.reason))


@router.post("/contributions/{cid}/approve", response_model=ContributionOut)
def approve(cid: Id, body: DecisionIn, user: Maintainer, db: DB, storage: StorageDep, settings: SettingsDep):
    return contribution_out(contributions.decide(db, storage, settings, user, cid, "approve", body.reason))


@router.post("/contributions/{cid}/decline", response_model=ContributionOut)
def decline(cid: Id, body: DecisionIn, user: Maintainer, db: DB, storage: StorageDep, settings: SettingsDep):
    """Turn an evaluated or approved contribution down; its weights are deleted."""
    return contribution_out(contributions.decide(db, storage, settings, user, cid, "decline", body.reason))


@router.post("/contributions/{cid}/remove", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def remove(cid: Id, body: RemoveIn, user: Maintainer, db: DB):
    """Forget a merged ELM: a new version without it, with the reason recorded."""
    c = db.get(Contribution, cid)
    if c is None:
        raise NotFound(f"no contribution {cid}")
    f = c.forest
    return jobs.enqueue(db, "publish", f"{f.name}:v{f.current_version}:remove:{cid}",
                        {"forest": f.name, "add": [], "remove": [cid], "note": body.reason, "actor_id": user.id},
                        owner=user)


@router.get("/contributions/{cid}/download", response_model=FilesOut)
def download_contribution(cid: Id, db: DB, user: OptionalUser, storage: StorageDep):
    """The ELM's files with their sha256 and download URLs (once validated, while kept)."""
    c = contributions.get(db, user, cid)
    if not c.files or c.state in DISCARDED:
        raise NotFound(f"contribution {cid} has no files to download (state {c.state.value})")
    return FilesOut(files=c.files, urls=forests.file_urls(storage, c.files))


@router.get("/jobs", response_model=list[JobOut])
def list_jobs(user: Reader, db: DB, status: str | None = Query(default=None, pattern="^(queued|running|succeeded|failed)$"),
              limit: int = Query(default=100, ge=1, le=1000)):
    """Recent jobs: yours, or everyone's for maintainers."""
    return jobs.list_(db, user, status, limit)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: Id, user: Reader, db: DB):
    """A job you started (or any job, for maintainers)."""
    return jobs.get(db, job_id, user)


@router.post("/jobs/{job_id}/retry", response_model=JobOut)
def retry_job(job_id: Id, user: Maintainer, db: DB):
    """Run a failed job again (maintainers)."""
    return jobs.retry(db, job_id, user)
