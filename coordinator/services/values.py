"""What each contribution is worth: every ELM's value to a version's forest on every domain,
the sums per contributor, the domains the forest most needs, and what merging a candidate
would change. All of it is arithmetic on the scores evaluation computes (btm.value), which
are kept in the artifact store by content (btm.score_cache), so a new version scores only
the ELMs it has not seen and a removal scores nothing.

Definitions (per domain; the seed is the forest of no ELMs):
    improvement  log ppl(seed) - log ppl(forest)                       nats per token
    loo          ppl(forest without the ELM) / ppl(forest) - 1         > 0: the ELM helps
    shapley      the ELM's Shapley value for v(S) = log ppl(seed) - log ppl(ensemble of S),
                 from `value_permutations` random orderings (with its standard error); the
                 ELMs' values on a domain sum to its improvement
    merge change ppl(forest + candidate) / ppl(forest) - 1             < 0: the merge helps
"""

from __future__ import annotations

import math
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.errors import Conflict
from coordinator.models import (
    Contribution,
    Domain,
    DomainStatus,
    DomainValue,
    ElmValue,
    Evaluation,
    ForestVersion,
    Job,
    utcnow,
)
from coordinator.storage import Storage, StorageError

CANDIDATE = "(candidate)"  # a contribution's key in the scores beside the forest's ELMs
WANTED = 3  # domains listed as wanted
Enqueue = Callable[..., Job]  # services.jobs.enqueue


class ArtifactScores:
    """btm.score_cache's store over the coordinator's artifact store (S3 or a local directory)."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def read(self, key: str) -> bytes | None:
        try:
            if not self.storage.exists(key):
                return None
            return b"".join(self.storage.iter_chunks(key))
        except (StorageError, OSError):
            return None  # unreadable: scored again and written anew

    def write(self, key: str, data: bytes) -> None:
        self.storage.put_bytes(key, data)


def version_inputs(db: Session, storage: Storage, settings, v: ForestVersion):
    """The version as a btm forest, every active domain's held-out blocks, and the domains by name."""
    from btm.forest import Forest
    from btm.tokenizer import load_tokenizer
    from coordinator.materialize import forest_dir
    from coordinator.services.domains import held_out_blocks

    forest = Forest.load(forest_dir(storage, settings.work_dir, v.manifest))
    tok = load_tokenizer(forest.seed_dir)
    doms = list(db.scalars(select(Domain).where(Domain.status == DomainStatus.active,
                                                Domain.eval_data_sha256.is_not(None)).order_by(Domain.name)))
    blocks = [b for d in doms if (b := held_out_blocks(storage, settings, d, tok)) is not None]
    return forest, blocks, {d.name: d for d in doms}


def save(db: Session, v: ForestVersion, values: dict[str, dict], by_name: dict[str, Domain]) -> None:
    """Replace the version's values with `values` (btm.evaluate.forest_values)."""
    db.query(DomainValue).filter(DomainValue.version_id == v.id).delete()
    db.query(ElmValue).filter(ElmValue.version_id == v.id).delete()
    entries = {e["name"]: e for e in v.manifest.get("elms", [])}
    for dn, dv in values.items():
        did = by_name[dn].id
        db.add(DomainValue(version_id=v.id, domain_id=did, forest_ppl=dv["forest_ppl"], seed_ppl=dv["seed_ppl"],
                           improvement=dv["improvement"], permutations=dv["permutations"]))
        for elm, x in dv["elms"].items():
            e = entries.get(elm, {})
            se = x["shapley_se"]
            db.add(ElmValue(version_id=v.id, domain_id=did, elm=elm, contribution_id=e.get("contribution_id"),
                            owner=e.get("owner"), loo=x["loo"], without_ppl=x["without_ppl"], shapley=x["shapley"],
                            shapley_se=se if math.isfinite(se) else None))
    v.valued_at = utcnow()


def compute(db: Session, storage: Storage, settings, version_id: int) -> dict:
    """The values job, for a version evaluated before values existed: its ELMs and seed from the
    score cache (scoring only what it lacks), then the arithmetic. No averages are built."""
    from btm.evaluate import SEED, Scores, elm_fingerprint, forest_values
    from btm.score_cache import files_fingerprint

    v = db.get(ForestVersion, version_id)
    forest, blocks, by_name = version_inputs(db, storage, settings, v)
    scores = Scores(store=ArtifactScores(storage))
    for e in forest.elms:
        scores.add_model(e.name, e.path, blocks, fingerprint=elm_fingerprint(e))
    scores.add_model(SEED, forest.seed_dir, blocks, dev_too=False,
                     fingerprint=files_fingerprint(forest.manifest["seed"]["files"]))
    save(db, v, forest_values(scores, forest.names(), blocks, settings.value_permutations), by_name)
    return {"domains": len(blocks), "scored": scores.scored, "reused": scores.reused}


def require(db: Session, v: ForestVersion, enqueue: Enqueue | None = None) -> None:
    """409 unless the version's values exist, saying what to wait for. A version evaluated
    before values existed gets a values job from `enqueue` (services.jobs.enqueue, passed in by
    the caller: jobs run this module), committed before the answer."""
    where = f"version {v.number} of forest {v.forest.name!r}"
    if v.evaluated_at is None:
        j = db.scalar(select(Job).where(Job.kind == "evaluate_version", Job.key == f"version:{v.id}"))
        wait = {"kind": "evaluate_version", "job_id": j.id if j else None, "status": j.status.value if j else None}
        raise Conflict(f"{where} is not evaluated yet; its values come with its evaluation: wait for "
                       f"{'job ' + str(j.id) if j else 'its evaluate_version job'} and ask again", wait_for=wait)
    if v.valued_at is None:
        if enqueue is None:
            raise Conflict(f"{where} was evaluated before values existed; ask the API for them to start their job")
        j = enqueue(db, "values", f"version:{v.id}", {"version_id": v.id})
        db.commit()  # the job must outlive this refusal
        raise Conflict(f"{where} was evaluated before values existed; job {j.id} computes them from its "
                       "evaluation's scores: ask again when it has succeeded",
                       wait_for={"kind": "values", "job_id": j.id, "status": j.status.value})


def version_values(db: Session, v: ForestVersion, enqueue: Enqueue | None = None) -> dict:
    """Every ELM's value on every domain, and each ELM's mean over the domains."""
    require(db, v, enqueue)
    doms = db.execute(select(DomainValue, Domain.name, Domain.role).join(Domain, Domain.id == DomainValue.domain_id)
                      .where(DomainValue.version_id == v.id).order_by(Domain.role, Domain.name)).all()
    rows = db.execute(select(ElmValue, Domain.name).join(Domain, Domain.id == ElmValue.domain_id)
                      .where(ElmValue.version_id == v.id).order_by(ElmValue.elm)).all()
    by_dom: dict[str, list] = {}
    for x, dn in rows:
        by_dom.setdefault(dn, []).append(_elm_out(x))
    domains = [{"name": dn, "role": _role(r), "forest_ppl": d.forest_ppl, "seed_ppl": d.seed_ppl,
                "improvement": d.improvement, "permutations": d.permutations, "elms": by_dom.get(dn, [])}
               for d, dn, r in doms]
    return {"forest": v.forest.name, "version": v.number, "permutations": max((d.permutations for d, *_ in doms),
                                                                               default=0),
            "domains": domains, "elms": _means(rows, lambda x: x.elm)}


def _role(r) -> str:
    return r.value if hasattr(r, "value") else r


def _elm_out(x: ElmValue) -> dict:
    return {"elm": x.elm, "owner": x.owner, "contribution_id": x.contribution_id, "loo": x.loo,
            "without_ppl": x.without_ppl, "shapley": x.shapley, "shapley_se": x.shapley_se}


def _means(rows, key) -> list[dict]:
    """Per key (an ELM, a contributor): the sum over its ELMs on each domain, and the mean of
    those sums over the domains; sorted by Shapley value, highest first."""
    acc: dict[str, dict] = {}
    for x, dn in rows:
        k = key(x) or "(unknown)"
        a = acc.setdefault(k, {"elms": set(), "loo": {}, "shapley": {}})
        a["elms"].add(x.elm)
        a["loo"][dn] = a["loo"].get(dn, 0.0) + x.loo
        a["shapley"][dn] = a["shapley"].get(dn, 0.0) + x.shapley
    out = [{"name": k, "elms": sorted(a["elms"]), "loo_mean": sum(a["loo"].values()) / len(a["loo"]),
            "shapley_mean": sum(a["shapley"].values()) / len(a["shapley"]), "shapley": a["shapley"],
            "loo": a["loo"]} for k, a in acc.items()]
    return sorted(out, key=lambda r: -r["shapley_mean"])


def contributors(db: Session, v: ForestVersion, enqueue: Enqueue | None = None) -> dict:
    """Per contributor, the sums over their ELMs; and the wanted domains."""
    require(db, v, enqueue)
    rows = db.execute(select(ElmValue, Domain.name).join(Domain, Domain.id == ElmValue.domain_id)
                      .where(ElmValue.version_id == v.id)).all()
    return {"forest": v.forest.name, "version": v.number, "contributors": _means(rows, lambda x: x.owner),
            "wanted": wanted(db, v)}


def wanted(db: Session, v: ForestVersion, limit: int = WANTED) -> list[dict]:
    """The domains where the forest is weakest against the dense baseline (a baseline named
    "dense", else the first baseline, else the seed): the highest ratio forest ppl / baseline ppl."""
    dv = db.execute(select(DomainValue, Domain.name, Domain.role).join(Domain, Domain.id == DomainValue.domain_id)
                    .where(DomainValue.version_id == v.id)).all()
    models = db.execute(select(Evaluation.subject, Domain.name, Evaluation.perplexity)
                        .join(Domain, Domain.id == Evaluation.domain_id)
                        .where(Evaluation.version_id == v.id, Evaluation.kind == "model")).all()
    names = sorted({s for s, _, _ in models})
    base = "dense" if "dense" in names else (names[0] if names else None)
    ppl = {dn: p for s, dn, p in models if s == base}
    out = []
    for d, dn, r in dv:
        ref, ref_name = (ppl[dn], base) if dn in ppl else (d.seed_ppl, "seed")
        out.append({"domain": dn, "role": _role(r), "forest_ppl": d.forest_ppl, "baseline": ref_name,
                    "baseline_ppl": ref, "ratio": d.forest_ppl / ref, "behind": d.forest_ppl > ref})
    return sorted(out, key=lambda x: -x["ratio"])[:limit]


def user_values(db: Session, username: str) -> list[dict]:
    """A contributor's value in the current version of every forest that holds their ELMs."""
    from coordinator.models import Forest

    out = []
    for f in db.scalars(select(Forest).order_by(Forest.name)):
        v = db.scalar(select(ForestVersion).where(ForestVersion.forest_id == f.id,
                                                  ForestVersion.number == f.current_version))
        if v is None or v.valued_at is None:
            continue
        rows = db.execute(select(ElmValue, Domain.name).join(Domain, Domain.id == ElmValue.domain_id)
                          .where(ElmValue.version_id == v.id, ElmValue.owner == username)).all()
        if rows:
            out.append({"forest": f.name, "version": v.number, **_means(rows, lambda x: x.owner)[0]})
    return out


def preview(db: Session, storage: Storage, settings, c: Contribution) -> dict:
    """What merging contribution `c` into its forest's current version would change on every
    domain: the forest's perplexity without and with it (scores from the cache, plus the candidate's)."""
    from btm.evaluate import SEED, Scores, elm_fingerprint, subset_scorer
    from btm.score_cache import files_fingerprint
    from btm.value import merge_preview
    from coordinator.materialize import model_dir
    from coordinator.services import forests as forests_svc

    v = forests_svc.version(db, c.forest)
    forest, blocks, _ = version_inputs(db, storage, settings, v)
    scores = Scores(store=ArtifactScores(storage))
    for e in forest.elms:
        scores.add_model(e.name, e.path, blocks, fingerprint=elm_fingerprint(e))
    scores.add_model(CANDIDATE, model_dir(storage, settings.work_dir, c.files), blocks,
                     fingerprint=files_fingerprint(c.files))
    scores.add_model(SEED, forest.seed_dir, blocks, dev_too=False,
                     fingerprint=files_fingerprint(forest.manifest["seed"]["files"]))
    names = [*forest.names(), CANDIDATE]
    doms = {b.name: {"role": b.role, **merge_preview(subset_scorer(scores, names, b.name))} for b in blocks}
    return {"forest_version": v.number, "own_domain": c.domain.name, "domains": doms}


def preview_of(c: Contribution) -> dict | None:
    return (c.evaluation or {}).get("merge_preview")
