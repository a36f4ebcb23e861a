"""Branch initialisations: the posterior-weighted average of a forest version's ELMs, the
posterior computed on a domain sample (uploaded) or privately by the contributor (only the
weight vector is sent). Cached by (version, method, sample or weights)."""

from __future__ import annotations

import hashlib
import json
import math

from sqlalchemy import select
from sqlalchemy.orm import Session

from btm.branch import BRANCH_METHODS
from coordinator.errors import BadRequest, NotFound
from coordinator.models import BranchInit, BranchStatus, DomainStatus, User
from coordinator.services import domains as domains_svc
from coordinator.services import forests as forests_svc
from coordinator.services import uploads


def get(db: Session, user: User, init_id: int) -> BranchInit:
    b = db.get(BranchInit, init_id)
    if b is None or (b.requested_by_id != user.id and not user.is_maintainer):
        raise NotFound(f"no branch init {init_id} of yours")
    return b


def request(db: Session, user: User, forest_name: str, domain_name: str, method: str = "posterior",
            sample_sha256: str | None = None, posterior: dict[str, float] | None = None) -> tuple[BranchInit, bool]:
    """Returns (branch init, needs_job). Reuses the files of an identical earlier request."""
    f = forests_svc.get(db, forest_name)
    d = _open_domain(db, domain_name)
    if method not in BRANCH_METHODS:
        raise BadRequest(f"unknown method {method!r}; one of {', '.join(BRANCH_METHODS)}")
    v = forests_svc.version(db, f)
    elm_names = [e["name"] for e in v.manifest["elms"]]
    weights_key = None
    if posterior is not None:
        if sample_sha256:
            raise BadRequest("send either a sample or a posterior, not both")
        posterior = _normalised(posterior, elm_names, f"{f.name} v{v.number}")
        weights_key = hashlib.sha256(json.dumps(posterior, sort_keys=True).encode()).hexdigest()
    elif sample_sha256:
        uploads.require_own(db, user, sample_sha256, ("sample",), "sample")
    elif method in ("posterior", "argmax") and elm_names:
        raise BadRequest(f"method {method!r} needs a sample of the domain's text or a privately computed posterior")
    b = BranchInit(forest_id=f.id, version_id=v.id, domain_id=d.id, requested_by_id=user.id, method=method,
                   sample_sha256=sample_sha256, weights_key=weights_key, posterior=posterior)
    cached = _same_request(db, b)
    if cached is not None:
        b.posterior, b.parents, b.files, b.status = cached.posterior, cached.parents, cached.files, BranchStatus.ready
    db.add(b)
    db.flush()
    return b, cached is None


def _open_domain(db: Session, name: str):
    """The domain a new ELM is for: active, and with held-out data to evaluate the ELM on."""
    d = domains_svc.get(db, name)
    if d.status != DomainStatus.active:
        raise BadRequest(f"domain {name!r} is retired; it takes no new ELMs")
    if d.eval_data_sha256 is None:
        raise BadRequest(
            f"domain {name!r} has no held-out evaluation data yet, so no ELM for it could be evaluated; "
            f"upload some first (`elmforest domain eval-data {name} FILE`)"
        )
    return d


def _normalised(posterior: dict[str, float], elm_names: list[str], version: str) -> dict[str, float]:
    """A privately computed posterior over the version's ELMs, checked and summing to one."""
    unknown = sorted(set(posterior) - set(elm_names))
    if unknown:
        raise BadRequest(f"the posterior names ELMs {unknown} that are not in {version} "
                         f"(its ELMs: {elm_names}); request the init against the current version")
    vals = [float(posterior.get(n, 0.0)) for n in elm_names]
    if any(not math.isfinite(x) or x < 0 for x in vals) or (elm_names and sum(vals) <= 0):
        raise BadRequest("posterior weights must be finite, non-negative and not all zero")
    s = sum(vals) or 1.0
    return {n: x / s for n, x in zip(elm_names, vals, strict=True)}


def _same_request(db: Session, b: BranchInit) -> BranchInit | None:
    """A ready init of the same version, method and sample (or posterior): its files serve."""
    same = [BranchInit.version_id == b.version_id, BranchInit.method == b.method, BranchInit.status == BranchStatus.ready]
    for col, val in ((BranchInit.sample_sha256, b.sample_sha256), (BranchInit.weights_key, b.weights_key)):
        same.append(col.is_(None) if val is None else col == val)
    return db.scalar(select(BranchInit).where(*same).order_by(BranchInit.id))


def compute(db: Session, storage, settings, init_id: int) -> dict:
    """The job: posterior over the version's ELMs (streamed one at a time), then the
    streamed average, stored as a content-addressed weights file."""
    import tempfile
    from pathlib import Path

    from btm.branch import write_branch_init
    from btm.forest import Forest
    from coordinator.materialize import forest_dir

    b = db.get(BranchInit, init_id)
    if b is None:
        raise NotFound(f"branch init {init_id} vanished")
    if b.status == BranchStatus.ready:
        return {"files": b.files}
    v = b.version
    forest = Forest.load(forest_dir(storage, settings.work_dir, v.manifest))
    plan = _plan(storage, settings, forest, b)
    with tempfile.TemporaryDirectory(dir=settings.work_dir) as td:
        origin = {"forest": v.forest.name, "version": v.number, "branch_init_id": b.id}
        out = write_branch_init(forest, plan, Path(td) / "init", b.domain.name, name=f"init-{b.id}", origin=origin)
        files = uploads.put_dir(db, storage, out, f"branch init {b.id} of {v.forest.name} v{v.number}")
    b.parents = _parents(plan, v.manifest)
    if plan.posterior is not None:
        b.posterior = {n: float(p) for n, p in zip(plan.names, plan.posterior, strict=True)}
    b.files = files
    b.status = BranchStatus.ready
    b.error = None
    return {"files": files, "parents": b.parents}


def _plan(storage, settings, forest, b: BranchInit):
    """How the init averages the forest's ELMs: by the posterior stored with the request, by
    the posterior of its data sample (for the posterior and argmax methods), or by the method
    alone (the seed, for a forest without ELMs)."""
    from btm.branch import plan_branch, sample_blocks
    from coordinator.materialize import blob

    names = forest.names()
    if b.posterior is not None:
        return plan_branch(forest, None, b.method, posterior=[b.posterior.get(n, 0.0) for n in names])
    if b.sample_sha256 and names and b.method in ("posterior", "argmax"):
        sample = blob(storage, settings.work_dir, b.sample_sha256)
        return plan_branch(forest, sample_blocks(forest, sample, settings.eval_block_size, settings.posterior_prior_blocks),
                           b.method)
    return plan_branch(forest, None, b.method if names else "seed")


def _parents(plan, manifest: dict) -> list[dict]:
    """The init's parents: each ELM it averages with a positive weight, and its contribution."""
    by_name = {e["name"]: e for e in manifest["elms"]}
    return [{"name": n, "weight": float(w), "contribution_id": by_name.get(n, {}).get("contribution_id")}
            for n, w in zip(plan.names, plan.weights, strict=True) if w > 0]
