"""Averaged models of a forest version for a target domain: posterior, argmax or uniform."""

from __future__ import annotations

import tempfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from btm.average import METHODS
from coordinator.errors import BadRequest, NotFound
from coordinator.models import AveragedModel, BranchStatus, ForestVersion
from coordinator.services import domains as domains_svc
from coordinator.services import uploads


def request(db: Session, v: ForestVersion, method: str, target: str | None) -> tuple[AveragedModel, bool]:
    """Returns (the averaged model, needs_job); cached per (version, method, target)."""
    if method not in METHODS:
        raise BadRequest(f"unknown averaging method {method!r}; one of {', '.join(METHODS)}")
    if not v.manifest["elms"]:
        raise BadRequest(f"{v.forest.name} v{v.number} has no ELMs to average yet")
    if method != "uniform":
        if not target:
            raise BadRequest(f"the {method} average needs a target domain (its posterior gives the weights)")
        d = domains_svc.get(db, target)
        if d.eval_data_sha256 is None:
            raise BadRequest(f"domain {target!r} has no held-out data to compute its posterior from")
    target = "" if method == "uniform" else target
    a = db.scalar(select(AveragedModel).where(AveragedModel.version_id == v.id, AveragedModel.method == method,
                                              AveragedModel.target == target))
    if a is not None:
        if a.status == BranchStatus.failed:
            a.status, a.error = BranchStatus.requested, None
            return a, True
        return a, False
    a = AveragedModel(version_id=v.id, method=method, target=target)
    db.add(a)
    db.flush()
    return a, True


def target_posterior(db: Session, storage, settings, v: ForestVersion, forest, target: str) -> dict[str, float]:
    """The cached prior of domain `target` over the version's ELMs ({ELM: weight}): the one its
    evaluation stored, else computed now from the domain's held-out data (`forest`: the
    version on disk)."""
    from btm.posterior import domain_prior
    from coordinator.services.leaderboard import posteriors

    names = forest.names()
    post = posteriors(db, v).get(target)
    if post is None or set(post) != set(names):
        from btm.tokenizer import load_tokenizer

        d = domains_svc.get(db, target)
        blocks = domains_svc.held_out_blocks(storage, settings, d, load_tokenizer(forest.seed_dir))
        if blocks is None:
            raise BadRequest(domains_svc.too_short(settings, d))
        post = dict(zip(names, domain_prior([e.path for e in forest.elms], blocks.dev).tolist(), strict=True))
    return post


def build(db: Session, storage, settings, avg_id: int) -> dict:
    from btm.family import Card
    from btm.forest import Forest
    from btm.recipes import average_forest
    from coordinator.materialize import forest_dir

    a = db.get(AveragedModel, avg_id)
    if a is None:
        raise NotFound(f"averaged model {avg_id} vanished")
    if a.status == BranchStatus.ready:
        return {"files": a.files}
    v = a.version
    forest = Forest.load(forest_dir(storage, settings.work_dir, v.manifest))
    names = forest.names()
    prior = None
    if a.method != "uniform":  # the target's posterior, from its held-out text (cached per version)
        post = target_posterior(db, storage, settings, v, forest, a.target)
        prior = [post[n] for n in names]
    card = Card(name=f"{v.forest.name}-v{v.number}-{a.method}" + (f"-{a.target}" if a.target else ""), kind="average",
                domain=a.target or None, data={"forest": v.forest.name, "version": v.number, "method": a.method},
                recipe=f"elmforest download average {v.forest.name} --version {v.number} --method {a.method}"
                + (f" --domain {a.target}" if a.target else ""))
    with tempfile.TemporaryDirectory(dir=settings.work_dir) as td:
        out, _, w = average_forest(forest, Path(td) / "avg", a.method, prior=prior, card=card)
        files = uploads.put_dir(db, storage, out, f"averaged model {a.id} of {v.forest.name} v{v.number}")
    a.weights = {n: float(x) for n, x in zip(names, w, strict=True)}
    a.files = files
    a.status = BranchStatus.ready
    return {"files": files}
