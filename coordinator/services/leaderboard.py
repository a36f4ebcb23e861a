"""Evaluations of a forest version (the leaderboard) and domain posteriors (the heatmap)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from coordinator.errors import BadRequest
from coordinator.models import (
    Domain,
    Evaluation,
    ForestVersion,
    Posterior,
    SubjectSummary,
    utcnow,
)
from coordinator.services import cache

KINDS = ("elm", "ensemble", "average", "model")
SORTS = ("mean", "mean_train", "mean_eval")
# a summary row's columns, as a board's subjects name them
SUMMARY_COLUMNS = ("subject", "kind", "method", "mean_train", "mean_eval", "mean_all")
# the summary column that is a board's "mean": over the domains shown (all of them, or one role's)
MEAN_OF_ROLE = {None: "mean_all", "train": "mean_train", "eval": "mean_eval"}


@dataclass
class Board:
    """One page of a version's leaderboard: subjects (rows) x domains (columns). Plain data
    (no database objects), so a page can be cached and shared between requests."""

    forest: str
    version: int
    domains: list[tuple[str, str]]  # (name, role), in column order
    # {subject, kind, method, mean_train, mean_eval, mean_all, mean}, in row order; mean is over the
    # domains shown (mean_all, or mean_train / mean_eval when the board shows one role)
    subjects: list[dict]
    cells: dict[tuple[str, str], float]  # (subject, domain) -> perplexity
    total: int
    page: int
    per_page: int
    role: str | None
    kind: str | None
    sort: str
    desc: bool

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


def board(db: Session, v: ForestVersion, role: str | None = None, kind: str | None = None, sort: str = "mean",
          desc: bool = False, page: int = 1, per_page: int = 50) -> Board:
    """One page of the leaderboard, from the cache until the version is evaluated again."""
    if role not in (None, "train", "eval"):
        raise BadRequest("role is train or eval")
    if kind not in (None, *KINDS):
        raise BadRequest(f"kind is one of {', '.join(KINDS)}")
    page, per_page = max(1, page), max(1, min(per_page, 500))
    if v.evaluated_at is None:
        # not evaluated yet (as of this request's look at the version): an empty board. Its
        # rows are read by several statements, each of which may see the evaluation commit;
        # building one now could mix the two states (rows without their domains' columns)
        return Board(v.forest.name, v.number, [], [], {}, 0, page, per_page, role, kind, sort, desc)
    key = (v.id, v.evaluated_at, role, kind, sort, desc, page, per_page)
    return cache.boards.get(key, lambda: _board(db, v, role, kind, sort, desc, page, per_page))


def _board(db: Session, v: ForestVersion, role: str | None, kind: str | None, sort: str, desc: bool, page: int,
           per_page: int) -> Board:
    """Sorting and paging happen in the database (on the summaries, or on one domain's
    column), so a page costs about per_page x domains rows whatever the forest's size."""
    conn = db.connection()  # plain Core rows: thousands of cells need no ORM bookkeeping
    domains, dom_name = _domain_columns(db, conn, v, role)
    summaries = _summaries(v, kind)
    total = conn.execute(select(func.count()).select_from(summaries.subquery())).scalar() or 0
    if sort in SORTS:
        subjects = _page_by_mean(conn, summaries, role, sort, desc, page, per_page)
    else:
        subjects = _page_by_domain(db, conn, v, summaries, kind, sort, desc, page, per_page)
    for x in subjects:
        x["mean"] = x[MEAN_OF_ROLE[role]]
    cells = _cells(conn, v, [x["subject"] for x in subjects], dom_name, role)
    return Board(v.forest.name, v.number, domains, subjects, cells, total, page, per_page, role, kind, sort, desc)


def _domain_columns(db: Session, conn, v: ForestVersion, role: str | None) -> tuple[list[tuple[str, str]], dict[int, str]]:
    """The board's columns, (name, role) in order, and each one's name by domain id.

    The version's domains are those of its most-evaluated subject (every ELM, ensemble and
    average is scored on all of them): an index lookup, not a scan of every evaluation."""
    widest = db.scalar(select(SubjectSummary.subject).where(SubjectSummary.version_id == v.id)
                       .order_by(SubjectSummary.domains.desc(), SubjectSummary.subject).limit(1))
    dq = (select(Domain.id, Domain.name, Domain.role).where(Domain.id.in_(
        select(Evaluation.domain_id).where(Evaluation.version_id == v.id, Evaluation.subject == widest)))
          .order_by(Domain.role, Domain.name))
    if role:
        dq = dq.where(Domain.role == role)
    dom_rows = list(conn.execute(dq))
    domains = [(n, r.value if hasattr(r, "value") else r) for _, n, r in dom_rows]
    return domains, {i: n for i, n, _ in dom_rows}


def _summaries(v: ForestVersion, kind: str | None):
    """The query of the version's subject summaries (of one kind, if given), unordered."""
    S = SubjectSummary
    q = select(S.subject, S.kind, S.method, S.mean_train, S.mean_eval, S.mean_all).where(S.version_id == v.id)
    return q.where(S.kind == kind) if kind else q


def _page_by_mean(conn, summaries, role: str | None, sort: str, desc: bool, page: int, per_page: int) -> list[dict]:
    """One page of subjects ordered by a mean (`sort`, one of SORTS), then by name."""
    S = SubjectSummary
    col = getattr(S, MEAN_OF_ROLE[role] if sort == "mean" else sort)
    order = [col.desc().nulls_last() if desc else col.asc().nulls_last(), S.subject]
    q = summaries.order_by(*order).offset((page - 1) * per_page).limit(per_page)
    return [dict(zip(SUMMARY_COLUMNS, r, strict=True)) for r in conn.execute(q)]


def _page_by_domain(db: Session, conn, v: ForestVersion, summaries, kind: str | None, sort: str, desc: bool,
                    page: int, per_page: int) -> list[dict]:
    """One page of subjects ordered by their perplexity on the domain named `sort`, then by name."""
    d = db.scalar(select(Domain.id).where(Domain.name == sort))
    if d is None:
        raise BadRequest(f"cannot sort by {sort!r}: not a domain of this leaderboard (or one of {', '.join(SORTS)})")
    E = Evaluation
    q = (select(E.subject).where(E.version_id == v.id, E.domain_id == d)
         .order_by(E.perplexity.desc() if desc else E.perplexity.asc(), E.subject))
    if kind:
        q = q.where(E.kind == kind)
    names = list(conn.execute(q.offset((page - 1) * per_page).limit(per_page)).scalars())
    info = {r[0]: r for r in conn.execute(summaries.where(SubjectSummary.subject.in_(names)))}
    return [dict(zip(SUMMARY_COLUMNS, info[n], strict=True)) for n in names if n in info]


def _cells(conn, v: ForestVersion, names: list[str], dom_name: dict[int, str], role: str | None
           ) -> dict[tuple[str, str], float]:
    """The perplexities of a page's subjects on the board's columns, by (subject, domain)."""
    if not (names and dom_name):
        return {}
    cq = select(Evaluation.subject, Evaluation.domain_id, Evaluation.perplexity).where(
        Evaluation.version_id == v.id, Evaluation.subject.in_(names))
    if role:
        cq = cq.where(Evaluation.domain_id.in_(list(dom_name)))
    return {(s_, dom_name[d_]): p for s_, d_, p in conn.execute(cq).all() if d_ in dom_name}


def rows(db: Session, v: ForestVersion, role: str | None = None, method: str | None = None,
         domain: str | None = None) -> list[dict]:
    """Every evaluation of a version, unpaged (for exports and small forests)."""
    q = (select(Evaluation.subject, Evaluation.kind, Evaluation.method, Evaluation.perplexity, Evaluation.tokens,
                Domain.name, Domain.role)
         .join(Domain, Domain.id == Evaluation.domain_id).where(Evaluation.version_id == v.id))
    if role:
        q = q.where(Domain.role == role)
    if method:
        q = q.where(Evaluation.method == method)
    if domain:
        q = q.where(Domain.name == domain)
    return [{"subject": s, "kind": k, "method": m, "ppl": p, "tokens": t, "domain": dn, "role": r.value}
            for s, k, m, p, t, dn, r in db.execute(q)]


def posteriors(db: Session, v: ForestVersion) -> dict[str, dict[str, float]]:
    def load():
        q = select(Posterior.weights, Domain.name).join(Domain, Domain.id == Posterior.domain_id).where(
            Posterior.version_id == v.id)
        return {name: w for w, name in db.execute(q)}

    if v.evaluated_at is None:
        return {}  # not evaluated yet (see board)
    return cache.boards.get((v.id, v.evaluated_at, "posteriors"), load)


def summarize(db: Session, v: ForestVersion) -> None:
    """(Re)compute the version's subject summaries from its evaluations."""
    db.query(SubjectSummary).filter(SubjectSummary.version_id == v.id).delete()
    q = (select(Evaluation.subject, Evaluation.kind, Evaluation.method, Domain.role, Evaluation.perplexity)
         .join(Domain, Domain.id == Evaluation.domain_id).where(Evaluation.version_id == v.id))
    acc: dict[str, dict] = {}
    for subj, kind, method, role, ppl in db.execute(q):
        a = acc.setdefault(subj, {"kind": kind, "method": method, "train": [], "eval": []})
        a[role.value].append(ppl)
    rows_ = []
    for subj, a in acc.items():
        both = a["train"] + a["eval"]
        rows_.append({"version_id": v.id, "subject": subj, "kind": a["kind"], "method": a["method"],
                      "mean_train": sum(a["train"]) / len(a["train"]) if a["train"] else None,
                      "mean_eval": sum(a["eval"]) / len(a["eval"]) if a["eval"] else None,
                      "mean_all": sum(both) / len(both), "domains": len(both)})
    if rows_:
        db.execute(insert(SubjectSummary), rows_)


def evaluate_version(db: Session, storage, settings, version_id: int) -> dict:
    """The job: every ELM, the ensemble (all, top-k), the averages and the forest's baselines
    on every active domain with held-out data, and every ELM's value (services/values). Models
    whose scores the artifact store holds are not run again. Replaces the version's rows, so
    running it again changes nothing."""
    from btm.evaluate import evaluate_forest
    from coordinator.materialize import model_dir
    from coordinator.services import values
    from coordinator.services.forests import baselines

    v = db.get(ForestVersion, version_id)
    forest, blocks, by_name = values.version_inputs(db, storage, settings, v)
    extra = {b.name: model_dir(storage, settings.work_dir, b.files) for b in baselines(db, v.forest)}
    with tempfile.TemporaryDirectory(dir=settings.work_dir) as work:
        rep = evaluate_forest(forest, blocks, work, top_ks=settings.top_k, extra_models=extra,
                              store=values.ArtifactScores(storage), permutations=settings.value_permutations)
    db.query(Evaluation).filter(Evaluation.version_id == v.id).delete()
    db.query(Posterior).filter(Posterior.version_id == v.id).delete()
    for r in rep["rows"]:
        db.add(Evaluation(version_id=v.id, subject=r["subject"], kind=r["kind"], method=r["method"],
                          domain_id=by_name[r["domain"]].id, perplexity=float(r["ppl"]), tokens=int(r["tokens"])))
    for dn, w in rep["priors"].items():
        db.add(Posterior(version_id=v.id, domain_id=by_name[dn].id, weights=w))
    db.flush()
    summarize(db, v)
    values.save(db, v, rep["values"], by_name)
    v.evaluated_at = utcnow()  # a new key for every cached page of this leaderboard
    return {"rows": len(rep["rows"]), "domains": len(blocks), **rep["scoring"]}
