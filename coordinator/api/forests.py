from __future__ import annotations

import json

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import Response

from coordinator.api.deps import DB, Id, Maintainer, Reader, SettingsDep, StorageDep
from coordinator.caching import published, url_epoch
from coordinator.errors import NotFound
from coordinator.models import AveragedModel, Job
from coordinator.schemas import (
    AverageIn,
    AverageOut,
    BaselineIn,
    BaselineOut,
    DownloadOut,
    Error,
    ForestIn,
    ForestOut,
    JobOut,
    LeaderboardOut,
    MoeIn,
    MoeListOut,
    MoeOut,
    MoeTuneIn,
    PublishIn,
    VersionOut,
)
from coordinator.services import averages, cache, domains, forests, jobs, leaderboard, moe

router = APIRouter(prefix="/forests", tags=["forests"],
                   responses={400: {"model": Error}, 401: {"model": Error}, 403: {"model": Error},
                              404: {"model": Error}, 409: {"model": Error}, 422: {"model": Error}})


def version_out(db, v) -> VersionOut:
    return VersionOut(number=v.number, manifest_sha256=v.manifest_sha256, note=v.note, created_at=v.created_at,
                      elms=len(forests.manifest_of(db, v)["elms"]))


@router.get("", response_model=list[ForestOut])
def list_forests(request: Request, db: DB):
    fs = forests.list_(db)
    published(request, "forests", [(f.id, f.current_version) for f in fs])
    return fs


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ForestOut)
def create_forest(body: ForestIn, user: Maintainer, db: DB, storage: StorageDep, settings: SettingsDep):
    """Register an uploaded seed LM as the root of a new forest (version 1)."""
    return forests.create(db, storage, settings, user, body.name, body.files, body.description)


@router.get("/{name}", response_model=ForestOut)
def get_forest(request: Request, name: str, db: DB):
    f = forests.get(db, name)
    published(request, "forest", f.id, f.current_version)
    return f


@router.get("/{name}/baselines", response_model=list[BaselineOut])
def list_baselines(name: str, db: DB):
    """Models every version's leaderboard is compared with (e.g. the dense baseline)."""
    return forests.baselines(db, forests.get(db, name))


@router.post("/{name}/baselines", status_code=status.HTTP_201_CREATED, response_model=BaselineOut)
def add_baseline(name: str, body: BaselineIn, user: Maintainer, db: DB, storage: StorageDep, settings: SettingsDep):
    """Register an uploaded model of the forest's family as a baseline (idempotent)."""
    return forests.add_baseline(db, storage, settings, user, name, body.name, body.files, body.description)


@router.get("/{name}/versions", response_model=list[VersionOut])
def list_versions(request: Request, name: str, db: DB):
    f = forests.get(db, name)
    published(request, "versions", f.id, f.current_version)  # versions are immutable; a new one is current
    return [version_out(db, v) for v in forests.versions(db, f)]


@router.get("/{name}/versions/{number}", response_model=dict)
def get_manifest(request: Request, name: str, number: Id, db: DB):
    """The version's manifest (immutable)."""
    v = forests.version(db, forests.get(db, name), number)
    published(request, "manifest", v.id, v.manifest_sha256)
    return forests.manifest_of(db, v)


@router.get("/{name}/download", response_model=DownloadOut)
def download(request: Request, name: str, db: DB, storage: StorageDep, settings: SettingsDep,
             version: int | None = Query(default=None, ge=1)):
    """The manifest of a version (default: current) and a download URL for every file."""
    v = forests.version(db, forests.get(db, name), version)
    # weak: the same files, with URLs signed afresh (their bytes differ, their meaning does not)
    published(request, "download", v.id, url_epoch(settings), weak=True)
    return forests.version_download(db, storage, v)


@router.post("/{name}/publish", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def publish(name: str, body: PublishIn, user: Maintainer, db: DB):
    """Merge approved contributions (and forget removed ones) into a new version, as a job."""
    f = forests.get(db, name)
    return jobs.request_publish(db, f, user, body.add, body.remove, body.note)


@router.post("/{name}/evaluate", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def evaluate(name: str, user: Maintainer, db: DB, version: int | None = Query(default=None, ge=1)):
    """Evaluate a version again (e.g. after a domain got held-out data)."""
    v = forests.version(db, forests.get(db, name), version)
    return jobs.enqueue(db, "evaluate_version", f"version:{v.id}", {"version_id": v.id})


@router.get("/{name}/leaderboard", response_model=LeaderboardOut)
def get_leaderboard(request: Request, name: str, db: DB, version: int | None = Query(default=None, ge=1, le=2**31 - 1),
                    role: str | None = Query(default=None, pattern="^(train|eval)$"),
                    kind: str | None = Query(default=None, pattern="^(elm|ensemble|average|model)$"),
                    sort: str = Query(default="mean", max_length=64,
                                      description="mean, mean_train, mean_eval, or a domain's name"),
                    desc: bool = False, page: int = Query(default=1, ge=1, le=100_000),
                    per_page: int = Query(default=25, ge=1, le=500)):
    """One page of a version's leaderboard: subjects x domains, sorted and filtered."""
    v = forests.version(db, forests.get(db, name), version)
    published(request, "leaderboard", v.id, v.evaluated_at, domains.stamp(db))

    def render() -> bytes:
        b = leaderboard.board(db, v, role, kind, sort, desc, page, per_page)
        return json.dumps({
            "forest": b.forest, "version": b.version, "total": b.total, "page": b.page, "per_page": b.per_page,
            "domains": [{"name": n, "role": r} for n, r in b.domains],
            "rows": [{"subject": x["subject"], "kind": x["kind"], "method": x["method"], "mean_train": x["mean_train"],
                      "mean_eval": x["mean_eval"], "mean": x["mean"],
                      "ppl": {d: b.cells[(x["subject"], d)] for d, _ in b.domains if (x["subject"], d) in b.cells}}
                     for x in b.subjects],
        }).encode()

    # plain JSON, made once per page of a version's evaluation (the schema above documents the
    # shape, and tests check it): thousands of numbers need no validation pass per request
    body = cache.boards.get(("json", v.id, v.evaluated_at, role, kind, sort, desc, page, per_page), render)
    return Response(body, media_type="application/json")


@router.get("/{name}/posteriors", response_model=dict[str, dict[str, float]])
def get_posteriors(request: Request, name: str, db: DB,
                   version: int | None = Query(default=None, ge=1, le=2**31 - 1)):
    """The cached prior of each domain over the version's ELMs (what the ensemble uses)."""
    v = forests.version(db, forests.get(db, name), version)
    published(request, "posteriors", v.id, v.evaluated_at)
    return leaderboard.posteriors(db, v)


def average_out(storage, a: AveragedModel, job: Job | None = None) -> AverageOut:
    out = AverageOut.model_validate(a)
    out.status = a.status.value
    if a.files:
        out.urls = forests.file_urls(storage, a.files)
    out.job_id = job.id if job else None
    return out


@router.post("/{name}/averages", status_code=status.HTTP_202_ACCEPTED, response_model=AverageOut)
def request_average(name: str, body: AverageIn, user: Reader, db: DB, storage: StorageDep,
                    version: int | None = Query(default=None, ge=1)):
    """An averaged model of a version for a target domain (cached; built by a job)."""
    v = forests.version(db, forests.get(db, name), version)
    a, needs_job = averages.request(db, v, body.method, body.domain)
    job = jobs.enqueue(db, "average", f"average:{a.id}", {"average_id": a.id}) if needs_job else None
    return average_out(storage, a, job)


@router.get("/{name}/averages/{average_id}", response_model=AverageOut)
def get_average(name: str, average_id: Id, db: DB, storage: StorageDep):
    a = db.get(AveragedModel, average_id)
    if a is None or a.version.forest.name != name:
        raise NotFound(f"no averaged model {average_id} of forest {name!r}")
    return average_out(storage, a)


def moe_out(storage, m, job: Job | None = None) -> MoeOut:
    return MoeOut(id=m.id, forest=m.version.forest.name, version=m.version.number,
                  experts_per_token=m.experts_per_token, backbone=m.backbone, target=m.target, parent_id=m.parent_id,
                  tuning=m.tuning, samples=moe.describe_samples(m), status=m.status.value, error=m.error,
                  recipe=m.recipe, files=m.files, urls=forests.file_urls(storage, m.files) if m.files else {},
                  job_id=job.id if job else None)


@router.get("/{name}/moe", response_model=MoeListOut)
def list_moe(name: str, db: DB, storage: StorageDep, version: int | None = Query(default=None, ge=1, le=2**31 - 1)):
    """The mixture-of-experts exports of a version (default: current) and their tunings, or why
    the version cannot have one."""
    v = forests.version(db, forests.get(db, name), version)
    why = moe.unavailable(db, v)
    return MoeListOut(forest=name, version=v.number, available=why is None, reason=why,
                      exports=[moe_out(storage, m) for m in moe.of_version(db, v)])


@router.post("/{name}/moe", status_code=status.HTTP_202_ACCEPTED, response_model=MoeOut)
def request_moe(name: str, body: MoeIn, user: Reader, db: DB, storage: StorageDep,
                version: int | None = Query(default=None, ge=1, le=2**31 - 1)):
    """A version as one native mixture-of-experts model (Mixtral for Llama and Mistral forests,
    Qwen2-MoE for Qwen2): each ELM's MLP an expert, the rest the chosen backbone, router rows
    from each domain's text. Cached per options; built by a job. A family with no MoE form: 422."""
    v = forests.version(db, forests.get(db, name), version)
    m, needs_job = moe.request(db, v, body.experts_per_token, body.backbone, body.domain)
    job = jobs.enqueue(db, "moe_export", f"moe:{m.id}", {"moe_id": m.id}, owner=user) if needs_job else None
    return moe_out(storage, m, job)


@router.get("/{name}/moe/{moe_id}", response_model=MoeOut)
def get_moe(name: str, moe_id: Id, db: DB, storage: StorageDep):
    """An MoE export or tuning: its status, and once ready its files (sha256) and download URLs."""
    return moe_out(storage, moe.get(db, name, moe_id))


@router.post("/{name}/moe/{moe_id}/tune", status_code=status.HTTP_202_ACCEPTED, response_model=MoeOut)
def tune_moe(name: str, moe_id: Id, body: MoeTuneIn, user: Maintainer, db: DB, storage: StorageDep,
             settings: SettingsDep):
    """Train the routers of a ready MoE export (or every tensor, `whole`) on a balanced mix of its
    domains' text, with the load-balancing loss, as a job (maintainers). The result is a new
    artifact; steps are bounded by ELMFOREST_MOE_TUNE_MAX_STEPS."""
    m, needs_job = moe.request_tuning(db, settings, moe.get(db, name, moe_id), body.steps, body.whole,
                                      body.batch_size, body.block_size, body.lr)
    job = jobs.enqueue(db, "moe_tune", f"moe:{m.id}", {"moe_id": m.id}, owner=user) if needs_job else None
    return moe_out(storage, m, job)
