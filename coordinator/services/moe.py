"""A published version as one native mixture-of-experts model (btm.moe: Mixtral for Llama and
Mistral forests, Qwen2-MoE for Qwen2), built by a job beside the forest and its averages; and
router tunings of such an export (btm.moe.tune_router), which maintainers start. Both are
cached per (version, options): asking again returns the same artifact.

The router rows (and a tuning's training text) come from the text of each ELM's domain the
coordinator already holds, as for its routing vector: the sample its branch init was computed
from, else the domain's held-out data.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

from sqlalchemy import select
from sqlalchemy.orm import Session

from btm.errors import FamilyError
from btm.moe import BACKBONES, moe_form
from coordinator.errors import BadRequest, Conflict, NotFound, ServiceError, Unprocessable
from coordinator.models import (
    BranchInit,
    BranchStatus,
    Contribution,
    Domain,
    ForestVersion,
    MoeExport,
)
from coordinator.services import domains as domains_svc
from coordinator.services import forests, uploads

DEFAULT_EXPERTS_PER_TOKEN = 2
TEXTS = {"sample": "branch-init sample", "held-out": "held-out data"}


# ----------------------------------------------------------------------------- what can be built


def check(db: Session, v: ForestVersion) -> dict[str, dict]:
    """Refuse a version that cannot become an MoE model (422 for its family, 400 for no ELMs or
    a domain with no text); else each ELM's router text (`router_texts`)."""
    try:
        moe_form(SimpleNamespace(**(v.forest.config or {})))
    except FamilyError as e:
        raise Unprocessable(f"{v.forest.name}: {e}") from None
    if not forests.manifest_of(db, v)["elms"]:
        raise BadRequest(f"{v.forest.name} v{v.number} has no ELMs to make experts of yet; publish a version with "
                         "ELMs first")
    return router_texts(db, v)


def unavailable(db: Session, v: ForestVersion) -> str | None:
    """Why version `v` cannot become an MoE model, or None (for pages and listings)."""
    try:
        check(db, v)
    except ServiceError as e:
        return e.message
    return None


def router_texts(db: Session, v: ForestVersion) -> dict[str, dict]:
    """{ELM: {"domain", "text", "sha256"}}: the text of each ELM's domain the coordinator holds,
    for its router rows and a router tuning: its branch init's sample, else the domain's
    held-out data. An error names every domain with neither."""
    elms = forests.manifest_of(db, v)["elms"]
    ids = [e["contribution_id"] for e in elms if e.get("contribution_id")]
    samples = dict(db.execute(select(Contribution.id, BranchInit.sample_sha256)
                              .join(BranchInit, Contribution.branch_init_id == BranchInit.id)
                              .where(Contribution.id.in_(ids))).all()) if ids else {}
    held_outs = dict(db.execute(select(Domain.name, Domain.eval_data_sha256)
                                .where(Domain.name.in_({e["domain"] for e in elms}))).all())
    out, missing = {}, []
    for e in elms:
        sample, held_out = samples.get(e.get("contribution_id")), held_outs.get(e["domain"])
        if sample or held_out:
            out[e["name"]] = {"domain": e["domain"], "text": "sample" if sample else "held-out",
                              "sha256": sample or held_out}
        else:
            missing.append(f"{e['domain']!r} (ELM {e['name']})")
    if missing:
        raise BadRequest(f"no text of domain {', '.join(missing)} on the coordinator for its router rows: the ELM "
                         "came without a branch-init sample and the domain has no held-out data; its creator or a "
                         "maintainer can add it (`elmforest domain eval-data DOMAIN FILE`), then ask again")
    return out


def _experts_per_token(v: ForestVersion, n: int, k: int | None) -> int:
    if k is None:
        return min(DEFAULT_EXPERTS_PER_TOKEN, n)
    if not 1 <= k <= n:
        raise BadRequest(f"experts_per_token {k} is out of range: {v.forest.name} v{v.number} has {n} ELM(s), so a "
                         f"token can run 1 to {n} experts; ask for at most {n}")
    return k


def _target(db: Session, backbone: str, domain: str | None) -> str:
    """The backbone's target domain ("" unless posterior), checked."""
    if backbone not in BACKBONES:
        raise BadRequest(f"unknown backbone {backbone!r}; one of uniform, posterior (with a target domain), seed")
    if backbone != "posterior":
        if domain:
            raise BadRequest(f"a target domain goes with the posterior backbone only; drop {domain!r} or ask for "
                             "backbone posterior")
        return ""
    if not domain:
        raise BadRequest("the posterior backbone needs a target domain (its posterior over the ELMs weighs the "
                         "average); name one, or ask for backbone uniform")
    if domains_svc.get(db, domain).eval_data_sha256 is None:
        raise BadRequest(f"domain {domain!r} has no held-out data to compute its posterior from; add it "
                         "(`elmforest domain eval-data`) or ask for backbone uniform")
    return domain


# ----------------------------------------------------------------------------- requests


def _get_or_add(db: Session, v: ForestVersion, key: str, **fields) -> tuple[MoeExport, bool]:
    """The artifact of (version, options), made if new and asked for again if it failed."""
    m = db.scalar(select(MoeExport).where(MoeExport.version_id == v.id, MoeExport.options_key == key))
    if m is not None:
        if m.status == BranchStatus.failed:
            m.status, m.error = BranchStatus.requested, None
            return m, True
        return m, False
    m = MoeExport(version_id=v.id, options_key=key, **fields)
    db.add(m)
    db.flush()
    return m, True


def request(db: Session, v: ForestVersion, experts_per_token: int | None = None, backbone: str = "uniform",
            domain: str | None = None) -> tuple[MoeExport, bool]:
    """Returns (the MoE export of `v` with these options, needs_job)."""
    texts = check(db, v)
    k = _experts_per_token(v, len(texts), experts_per_token)
    target = _target(db, backbone, domain)
    return _get_or_add(db, v, f"k{k}:{backbone}:{target}", experts_per_token=k, backbone=backbone, target=target,
                       samples=texts)


def request_tuning(db: Session, settings, parent: MoeExport, steps: int, whole: bool = False, batch_size: int = 8,
                   block_size: int = 128, lr: float = 1e-3) -> tuple[MoeExport, bool]:
    """Returns (the router tuning of `parent` with these settings, needs_job). Bounds are the
    coordinator's: ELMFOREST_MOE_TUNE_MAX_STEPS, the model's context and
    ELMFOREST_MOE_TUNE_MAX_BATCH_TOKENS."""
    if parent.status != BranchStatus.ready:
        raise Conflict(f"MoE export {parent.id} is {parent.status.value}; tune it once it is ready")
    if not 1 <= steps <= settings.moe_tune_max_steps:
        raise BadRequest(f"steps {steps} is out of bounds: this coordinator runs 1 to {settings.moe_tune_max_steps} "
                         "updates per tuning (ELMFOREST_MOE_TUNE_MAX_STEPS); ask for fewer")
    context = parent.version.forest.config.get("max_position_embeddings")
    if context and block_size > context:
        raise BadRequest(f"block_size {block_size} is longer than the model's context ({context} tokens); ask for "
                         f"at most {context}")
    if batch_size * block_size > settings.moe_tune_max_batch_tokens:
        raise BadRequest(f"batch_size x block_size = {batch_size * block_size} tokens per update is over this "
                         f"coordinator's {settings.moe_tune_max_batch_tokens} (ELMFOREST_MOE_TUNE_MAX_BATCH_TOKENS); "
                         "lower one of them")
    what = "all" if whole else "router"
    tuning = {"what": what, "steps": steps, "batch_size": batch_size, "block_size": block_size, "lr": lr}
    key = f"tune:{parent.id}:{what}:s{steps}:b{batch_size}:t{block_size}:lr{lr:g}"
    return _get_or_add(db, parent.version, key, experts_per_token=parent.experts_per_token, backbone=parent.backbone,
                       target=parent.target, parent_id=parent.id, tuning=tuning, samples=parent.samples)


def get(db: Session, forest: str, moe_id: int) -> MoeExport:
    m = db.get(MoeExport, moe_id)
    if m is None or m.version.forest.name != forest:
        raise NotFound(f"no MoE export {moe_id} of forest {forest!r}")
    return m


def of_version(db: Session, v: ForestVersion) -> list[MoeExport]:
    return list(db.scalars(select(MoeExport).where(MoeExport.version_id == v.id).order_by(MoeExport.id)))


def describe_samples(m: MoeExport) -> dict[str, str]:
    """{ELM: which text of which domain} (no hashes: a sample is its uploader's)."""
    return {n: f"{TEXTS[t['text']]} of {t['domain']}" for n, t in (m.samples or {}).items()}


def recipe(m: MoeExport) -> str:
    """The command that asks a coordinator for this artifact."""
    v = m.version
    opts = f"--version {v.number} --experts-per-token {m.experts_per_token} --backbone {m.backbone}" + (
        f" --domain {m.target}" if m.target else "")
    t = m.tuning
    if not t:
        return f"elmforest download moe {v.forest.name} {opts} --out DIR"
    return (f"elmforest review tune-router {v.forest.name} {opts} --steps {t['steps']} --batch-size {t['batch_size']} "
            f"--block-size {t['block_size']} --lr {t['lr']:g}" + (" --all" if t["what"] == "all" else ""))


# ----------------------------------------------------------------------------- jobs


def _row(db: Session, moe_id: int) -> MoeExport:
    m = db.get(MoeExport, moe_id)
    if m is None:
        raise NotFound(f"MoE export {moe_id} vanished")
    return m


def _samples(storage, settings, m: MoeExport) -> dict[str, Path]:
    from coordinator.materialize import blob

    return {n: blob(storage, settings.work_dir, t["sha256"]) for n, t in (m.samples or {}).items()}


def build(db: Session, storage, settings, moe_id: int) -> dict:
    """The job of an MoE export: btm.moe.export_moe over the version, its files stored."""
    from btm.forest import Forest
    from btm.moe import export_moe
    from coordinator.materialize import forest_dir
    from coordinator.services.averages import target_posterior

    m = _row(db, moe_id)
    if m.status == BranchStatus.ready:
        return {"files": m.files}
    v = m.version
    forest = Forest.load(forest_dir(storage, settings.work_dir, v.manifest))
    weights = None
    if m.backbone == "posterior":
        post = target_posterior(db, storage, settings, v, forest, m.target)
        weights = [post[n] for n in forest.names()]
    name = f"{v.forest.name}-v{v.number}-moe-k{m.experts_per_token}-{m.backbone}" + (f"-{m.target}" if m.target else "")
    m.recipe = recipe(m)
    with tempfile.TemporaryDirectory(dir=settings.work_dir) as td:
        out = export_moe(forest, Path(td) / name, m.experts_per_token, m.backbone, None, _samples(storage, settings, m),
                         weights=weights, provenance=describe_samples(m), recipe=m.recipe)
        m.files = uploads.put_dir(db, storage, out, f"MoE export {m.id} of {v.forest.name} v{v.number}")
    m.status = BranchStatus.ready
    return {"files": m.files}


def tune(db: Session, storage, settings, moe_id: int) -> dict:
    """The job of a router tuning: btm.moe.tune_router on the export it tunes, over a balanced
    mix of the domains' texts. Its run directory stays between attempts, so a job run again
    after its worker died resumes from its last checkpoint; it goes once the files are stored."""
    from btm.moe import tune_router
    from btm.train_config import TrainConfig
    from coordinator.materialize import model_dir

    m = _row(db, moe_id)
    if m.status == BranchStatus.ready:
        return {"files": m.files}
    t, v = m.tuning, m.version
    src = model_dir(storage, settings.work_dir, m.parent.files)
    cfg = TrainConfig(steps=t["steps"], batch_size=t["batch_size"], block_size=t["block_size"], lr=t["lr"],
                      log_every=max(1, t["steps"] // 10), checkpoint_every=max(50, t["steps"] // 10), progress=False)
    run_dir = settings.work_dir / "moe-tunings" / str(m.id)
    m.recipe = recipe(m)
    tune_router(src, run_dir, cfg, _samples(storage, settings, m), t["what"] == "all", settings.work_dir / "tokens",
                provenance=describe_samples(m), recipe=m.recipe)
    m.files = uploads.put_dir(db, storage, run_dir, f"router tuning {m.id} of {v.forest.name} v{v.number}")
    m.status = BranchStatus.ready
    shutil.rmtree(run_dir, ignore_errors=True)  # its files are stored
    return {"files": m.files}
