"""The web pages. Queries go through coordinator.services (the API's own logic), except a
few plain reads made here: the session's user (`session_user`), an ELM's
lineage and per-domain figures (`_elm_figures`), and the averaged models of a version
(`download_page`, `average_page`); MoE exports go through coordinator.services.moe. Forms post back here with a CSRF token and a session
cookie."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from starlette.middleware.sessions import SessionMiddleware

from btm.hub import describe
from coordinator import caching
from coordinator.api.deps import DB, Id, SettingsDep, StorageDep, release
from coordinator.errors import Forbidden, NotFound, ServiceError, public
from coordinator.models import AveragedModel, Contribution, Domain, Evaluation, Role, State, User
from coordinator.services import (
    averages,
    cache,
    contributions,
    domains,
    forests,
    jobs,
    leaderboard,
    moe,
    users,
    values,
)
from web import svg

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)


# ----------------------------------------------------------------------------- session, CSRF


def session_user(request: Request, db: DB) -> User | None:
    uid = request.session.get("uid")
    if uid is None:
        return None
    u = db.get(User, uid)
    release(db)
    return u if u is not None and u.is_active else None


WebUser = Annotated[User | None, Depends(session_user)]


def csrf_token(request: Request) -> str:
    if "csrf" not in request.session:
        request.session["csrf"] = secrets.token_urlsafe(24)
    return request.session["csrf"]


def check_csrf(request: Request, token: str) -> None:
    if not token or not secrets.compare_digest(token, request.session.get("csrf", "")):
        raise Forbidden("the form expired or came from another site; reload the page and try again")


class _Csrf:
    """The session's CSRF token, made when a template prints it: a page without a form makes
    no session, so it sets no cookie and an anonymous visitor's copy can be shared."""

    def __init__(self, request: Request):
        self.request = request

    def __str__(self) -> str:
        return csrf_token(self.request)

    __html__ = __str__


def render(request: Request, name: str, user: User | None, status_code: int = 200, **ctx) -> HTMLResponse:
    ctx.update(user=user, csrf=_Csrf(request), flash=request.session.pop("flash", None),
               is_maintainer=user is not None and user.is_maintainer)
    return templates.TemplateResponse(request, name, ctx, status_code=status_code)


PAGES_BUILD = caching.BUILD + caching.code_stamp(HERE, patterns=("*.py", "*.html"))


def published_page(request: Request, user: User | None, *parts, weak: bool = False) -> None:
    """A page of published data as an anonymous visitor sees it is the same for everyone:
    tagged from `parts` (what its body is made of), 304 when the visitor holds it, and public.
    A signed-in user's page (their name, their links, a message for them) is theirs alone:
    no tag, `private, no-store` (coordinator.caching)."""
    if user is not None or "flash" in request.session:
        return
    settings = request.app.state.settings
    tag = caching.etag(request.url.path, request.url.query, request.headers.get("hx-request"),
                       request.headers.get("hx-boosted"), *parts, weak=weak, build=PAGES_BUILD)
    caching.conditional(request, tag, caching.public(settings.cache_max_age_seconds),
                        vary="Authorization, Cookie, HX-Request")


def flash(request: Request, msg: str) -> None:
    request.session["flash"] = msg


def require_maintainer(request: Request, user: User | None) -> User:
    if user is None:
        raise _LoginRequired(request.url.path)
    users.require_maintainer(user, "only maintainers can review contributions")
    return user


class _LoginRequired(Exception):
    def __init__(self, next_: str):
        self.next = next_


# ----------------------------------------------------------------------------- pages


@router.get("/", response_class=HTMLResponse)
def home(request: Request, db: DB, user: WebUser):
    cards = []
    fs = forests.list_(db)
    published_page(request, user, [(f.id, f.current_version) for f in fs])
    for f in fs:
        v = forests.version(db, f)
        m = forests.manifest_of(db, v)
        cards.append({"forest": f, "version": v, "elms": m["elms"],
                      "domains": sorted({e["domain"] for e in m["elms"]}),
                      "history": list(reversed(m.get("history", [])))[:6]})
    if len(cards) == 1:
        return RedirectResponse(f"/forests/{cards[0]['forest'].name}", status_code=303)
    return render(request, "home.html", user, cards=cards, title="Forests")


@router.get("/forests/{name}", response_class=HTMLResponse)
def forest_page(request: Request, name: str, db: DB, user: WebUser):
    f = forests.get(db, name)
    v = forests.version(db, f)
    published_page(request, user, v.id, v.evaluated_at, domains.stamp(db))
    b = leaderboard.board(db, v, kind=None, per_page=8)
    doms = {d.name: d for d in domains.list_(db)}
    m = forests.manifest_of(db, v)
    bar_items = [(x["subject"], x["mean"], x["kind"]) for x in b.subjects]
    versions = [(x, len(forests.manifest_of(db, x)["elms"])) for x in forests.versions(db, f)]
    return render(request, "forest.html", user, title=f"{f.name} forest", forest=f, version=v,
                  versions=versions, elms=m["elms"], domains=doms,
                  history=list(reversed(m.get("history", [])))[:12],
                  pending=len(contributions.list_(db, user, "evaluated")) if user is not None and user.is_maintainer else 0,
                  bars=svg.bars(bar_items, title="mean perplexity, best subjects"))


def _board_ctx(db, f, v, role, kind, sort, desc, page, per_page):
    """The leaderboard page's table, prepared here (links, numbers, best cells) so the
    template only loops: with 100 domains a page has thousands of cells."""
    b = leaderboard.board(db, v, role or None, kind or None, sort, desc, page, per_page)
    base = {"version": v.number, "role": role or "", "kind": kind or "", "sort": sort, "desc": int(desc),
            "page": page, "per_page": per_page}

    def url(**change):
        q = {**base, **change}
        return f"/forests/{f.name}/leaderboard?" + urlencode({k: x for k, x in q.items() if x not in ("", None)})

    def column(key, label, role_=None):
        on = sort == key
        return {"label": label, "role": role_, "url": url(sort=key, desc=int(not desc) if on else 0, page=1),
                "aria": ("descending" if desc else "ascending") if on else "none",
                "arrow": (" ▼" if desc else " ▲") if on else ""}

    return {"board": b, "url": url, "mean_col": column("mean", "mean"),
            "columns": [column(d, d, r) for d, r in b.domains], "rows": _board_rows(b, _best_per_domain(b))}


def _best_per_domain(b) -> dict[str, float | None]:
    """Each column's lowest perplexity on the page (None for an empty column)."""
    best = {}
    for d, _ in b.domains:
        vals = [b.cells[(x["subject"], d)] for x in b.subjects if (x["subject"], d) in b.cells]
        best[d] = min(vals) if vals else None
    return best


def _board_rows(b, best: dict[str, float | None]) -> list[dict]:
    """The page's rows as the template shows them: the subject, its mean and its cells, each
    cell (text, whether it is its column's best)."""
    rows = []
    for x in b.subjects:
        cells = []
        for d, _ in b.domains:
            p = b.cells.get((x["subject"], d))
            cells.append(("–", False) if p is None else (f"{p:.2f}", p == best[d]))
        rows.append({"x": x, "mean": "–" if x["mean"] is None else f"{x['mean']:.2f}", "cells": cells})
    return rows


@router.get("/forests/{name}/leaderboard", response_class=HTMLResponse)
def leaderboard_page(request: Request, name: str, db: DB, user: WebUser,
                     version: int | None = Query(default=None, ge=1, le=2**31 - 1),
                     role: str = Query(default="", pattern="^(|train|eval)$"),
                     kind: str = Query(default="", pattern="^(|elm|ensemble|average|model)$"),
                     sort: str = Query(default="mean", max_length=64), desc: bool = False,
                     page: int = Query(default=1, ge=1, le=100_000), per_page: int = Query(default=25, ge=1, le=500)):
    f = forests.get(db, name)
    v = forests.version(db, f, version)
    published_page(request, user, v.id, v.evaluated_at, f.current_version, domains.stamp(db))
    ctx = _board_ctx(db, f, v, role, kind, sort, desc, page, per_page)
    ctx.update(forest=f, version=v, versions=forests.version_numbers(db, f), role=role, kind=kind, sort=sort,
               desc=desc)
    if request.headers.get("hx-request") and not request.headers.get("hx-boosted"):
        return templates.TemplateResponse(request, "_board.html", ctx)
    return render(request, "leaderboard.html", user, title=f"Leaderboard · {f.name} v{v.number}", **ctx)


@router.get("/forests/{name}/posterior", response_class=HTMLResponse)
def posterior_page(request: Request, name: str, db: DB, user: WebUser,
                   version: int | None = Query(default=None, ge=1, le=2**31 - 1)):
    f = forests.get(db, name)
    v = forests.version(db, f, version)
    published_page(request, user, v.id, v.evaluated_at, f.current_version, domains.stamp(db))
    post = leaderboard.posteriors(db, v)
    roles = {d.name: d.role.value for d in domains.list_(db, include_retired=True)}
    rows = sorted(post, key=lambda d: (roles.get(d) != "train", d))
    weight = {(d, e): w for d, ws in post.items() for e, w in ws.items()}
    cols = [e["name"] for e in forests.manifest_of(db, v)["elms"]]
    # large forests: keep the ELMs some domain actually leans on
    if len(cols) > 60:
        top = sorted(cols, key=lambda e: -max((weight.get((d, e), 0) for d in rows), default=0))
        cols = [c for c in cols if c in set(top[:60])]
    return render(request, "posterior.html", user, title=f"Domain posterior · {f.name} v{v.number}", forest=f,
                  version=v, versions=forests.versions(db, f), heatmap=svg.heatmap(rows, cols, weight),
                  rows=rows, cols=cols, roles=roles, post=post)


def _elm_entry(db, v, elm: str) -> dict:
    for e in forests.manifest_of(db, v)["elms"]:
        if e["name"] == elm:
            return e
    raise NotFound(f"{v.forest.name} v{v.number} has no ELM named {elm!r}")


@router.get("/forests/{name}/elms/{elm}", response_class=HTMLResponse)
def elm_page(request: Request, name: str, elm: str, db: DB, user: WebUser):
    f = forests.get(db, name)
    v = forests.version(db, f)
    published_page(request, user, v.id, v.evaluated_at, domains.stamp(db))
    e = _elm_entry(db, v, elm)
    # the lineage and the scores change only with the version and its evaluation
    graph, per_domain, bars = cache.boards.get(("elm-page", v.id, v.evaluated_at, elm), lambda: _elm_figures(db, f, v, e))
    return render(request, "elm.html", user, title=f"{elm} · {f.name}", forest=f, version=v, elm=e,
                  contribution_id=e.get("contribution_id"), graph=graph, per_domain=per_domain, bars=bars)


def _elm_figures(db, f, v, e) -> tuple[str, list, str]:
    nodes, edges = _lineage(db, e)
    graph = svg.lineage(nodes, edges, e["name"], href=lambda n: f"/forests/{f.name}/elms/{n}")
    per_domain = _perplexity_by_domain(db, v, e["name"])
    bars = svg.bars([(d, p, r) for d, p, r in per_domain], title=f"perplexity of {e['name']} by domain")
    return graph, per_domain, bars


def _lineage(db, e) -> tuple[dict[str, dict], list[tuple[str, str, float]]]:
    """The ELM's ancestry as the lineage graph's nodes (by name) and weighted edges (parent,
    child, weight): its parents, walked through their contributions' branch inits back to the seed."""
    nodes = {e["name"]: {"label": e["name"], "sub": f"domain {e['domain']}"
                         + (f" · imported from {describe(e['source'])}" if e.get("source") else "")}}
    edges: list[tuple[str, str, float]] = []
    todo, seen = [(e["name"], e.get("parents", []))], set()
    while todo:
        child, ps = todo.pop()
        if child in seen:
            continue
        seen.add(child)
        for p in ps:
            node, its_parents = _lineage_parent(db, p)
            nodes.setdefault(p["name"], node)
            if its_parents is not None:
                todo.append((p["name"], its_parents))
            edges.append((p["name"], child, float(p["weight"])))
    return nodes, edges


def _lineage_parent(db, p: dict) -> tuple[dict, list | None]:
    """A parent's node in the lineage graph, and its own parents to walk (None for the seed
    or an ELM not made from a branch init)."""
    name = p["name"]
    if name == "seed" or not p.get("contribution_id"):
        return {"label": name, "sub": "seed LM", "seed": True}, None
    pc = db.get(Contribution, p["contribution_id"])
    if pc is None:
        return {"label": name, "sub": ""}, None
    node = {"label": name, "sub": f"domain {pc.domain.name}" + (" · imported" if pc.source else "")}
    return node, (pc.branch_init.parents or []) if pc.branch_init is not None else None


def _perplexity_by_domain(db, v, subject: str) -> list[tuple[str, float, str]]:
    """(domain, perplexity, role) of a subject of the version, lowest perplexity first."""
    q = (select(Domain.name, Evaluation.perplexity, Domain.role).join(Domain, Domain.id == Evaluation.domain_id)
         .where(Evaluation.version_id == v.id, Evaluation.subject == subject))
    return sorted(((d, p, r.value) for d, p, r in db.execute(q)), key=lambda t: t[1])


@router.get("/forests/{name}/values", response_class=HTMLResponse)
def values_page(request: Request, name: str, db: DB, user: WebUser,
                version: int | None = Query(default=None, ge=1, le=2**31 - 1)):
    """What each ELM and each contributor adds to a version: a table per ELM and domain, a plot
    of the ELMs' mean Shapley values, the contributors and the wanted domains."""
    f = forests.get(db, name)
    v = forests.version(db, f, version)
    if v.evaluated_at is not None and v.valued_at is not None:  # else a page saying what to wait for
        published_page(request, user, v.id, v.evaluated_at, v.valued_at, f.current_version, domains.stamp(db))
    ctx = cache.boards.get(("values-page", v.id, v.evaluated_at, v.valued_at), lambda: _values_ctx(db, v))
    return render(request, "values.html", user, title=f"Values · {f.name} v{v.number}", forest=f, version=v,
                  versions=forests.version_numbers(db, f), **ctx)


def _values_ctx(db, v) -> dict:
    rep = values.version_values(db, v, jobs.enqueue)  # 409 (a page saying what to wait for) until there are values
    who = values.contributors(db, v)
    cell = {(x["elm"], d["name"]): x for d in rep["domains"] for x in d["elms"]}
    plot = svg.signed_bars([(e["name"], e["shapley_mean"], _mean_se(rep, e["name"])) for e in rep["elms"]],
                           title="mean Shapley value of each ELM over the domains (nats per token)")
    return {"rep": rep, "who": who, "cell": cell, "plot": plot}


def _mean_se(rep: dict, elm: str) -> float | None:
    """The standard error of an ELM's mean Shapley value over the domains (independent estimates)."""
    ses = [x["shapley_se"] for d in rep["domains"] for x in d["elms"] if x["elm"] == elm]
    if not ses or any(s is None for s in ses):
        return None
    return sum(s * s for s in ses) ** 0.5 / len(ses)


@router.get("/users/{username}", response_class=HTMLResponse)
def user_page(request: Request, username: str, db: DB, user: WebUser):
    """A contributor's page: what their ELMs add to each forest's current version."""
    u = db.scalar(select(User).where(User.username == username))
    if u is None:
        raise NotFound(f"no user {username!r}")
    return render(request, "user.html", user, title=f"{u.username}", person=u, worth=values.user_values(db, u.username))


@router.get("/contributions/{cid}", response_class=HTMLResponse)
def contribution_page(request: Request, cid: Id, db: DB, user: WebUser):
    c = contributions.get(db, user, cid)
    return render(request, "contribution.html", user, title=f"Contribution {c.id} · {c.name}", c=c)


@router.get("/review", response_class=HTMLResponse)
def review_page(request: Request, db: DB, user: WebUser):
    require_maintainer(request, user)
    pending = contributions.list_(db, user, "evaluated")
    approved = contributions.list_(db, user, "approved")
    return render(request, "review.html", user, title="Review queue", pending=pending, approved=approved,
                  forests=forests.list_(db), failed=jobs.failed(db, 50))


@router.post("/review/{cid}/{decision}")
def review_decide(request: Request, cid: Id, decision: str, db: DB, user: WebUser, storage: StorageDep,
                  settings: SettingsDep, csrf: Annotated[str, Form()] = "",
                  reason: Annotated[str, Form(max_length=10_000)] = ""):
    require_maintainer(request, user)
    check_csrf(request, csrf)
    if decision not in ("approve", "decline"):
        raise NotFound("no such decision")
    try:
        c = contributions.decide(db, storage, settings, user, cid, decision, reason)
        flash(request, f"contribution {c.id} ({c.name}) {c.state.value}")
    except ServiceError as e:
        flash(request, f"not done: {e.message}")
    return RedirectResponse("/review", status_code=303)


@router.post("/forests/{name}/publish")
def publish(request: Request, name: str, db: DB, user: WebUser, csrf: Annotated[str, Form()] = "",
            note: Annotated[str, Form(max_length=10_000)] = ""):
    require_maintainer(request, user)
    check_csrf(request, csrf)
    f = forests.get(db, name)
    approved = [c for c in contributions.list_(db, user, "approved", forest=name)]
    if not approved:
        flash(request, "nothing to publish: approve a contribution first")
        return RedirectResponse("/review", status_code=303)
    job = jobs.request_publish(db, f, user, note=note or "published from the review queue", owner=user)
    flash(request, f"publishing {len(approved)} ELM(s) into {f.name} v{f.current_version + 1} (job {job.id})")
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.get("/forests/{name}/rounds", response_class=HTMLResponse)
def rounds_page(request: Request, name: str, db: DB, user: WebUser):
    """Federated rounds of a forest and each node's status (maintainers)."""
    require_maintainer(request, user)
    from coordinator.services import rounds

    f = forests.get(db, name)
    live = [r for r in rounds.list_with_nodes(db, name) if r["status"] in ("pending", "running")]
    return render(request, "rounds.html", user, title=f"Federated rounds · {f.name}", forest=f,
                  rounds=rounds.list_with_nodes(db, name), live=bool(live))


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: Id, db: DB, user: WebUser):
    if user is None:
        raise _LoginRequired(request.url.path)
    j = jobs.get(db, job_id, user)
    forest = j.payload.get("forest")
    return render(request, "job.html", user, title=f"Job {j.id}", job=j, forest=forest)


@router.post("/jobs/{job_id}/retry")
def job_retry(request: Request, job_id: Id, db: DB, user: WebUser, csrf: Annotated[str, Form()] = ""):
    require_maintainer(request, user)
    check_csrf(request, csrf)
    try:
        jobs.retry(db, job_id, user)
        flash(request, f"job {job_id} queued again")
    except ServiceError as e:
        flash(request, f"not done: {e.message}")
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.get("/forests/{name}/download", response_class=HTMLResponse)
def download_page(request: Request, name: str, db: DB, user: WebUser, storage: StorageDep,
                  version: int | None = Query(default=None, ge=1, le=2**31 - 1)):
    f = forests.get(db, name)
    v = forests.version(db, f, version)
    built = db.scalars(select(AveragedModel).where(AveragedModel.version_id == v.id)).all()
    moes = moe.of_version(db, v)
    # weak: its download links are signed afresh (see coordinator.caching.url_epoch)
    published_page(request, user, v.id, caching.url_epoch(request.app.state.settings), f.current_version,
                   domains.stamp(db), [(a.id, a.status.value) for a in built], [(m.id, m.status.value) for m in moes],
                   weak=True)
    d = forests.version_download(db, storage, v)
    return render(request, "download.html", user, title=f"Download · {f.name} v{v.number}", forest=f, version=v,
                  versions=forests.versions(db, f), files=d["files"], domains=domains.list_(db), averages=built,
                  base=str(request.base_url).rstrip("/"), moes=moes, moe_why=moe.unavailable(db, v),
                  n_elms=len(forests.manifest_of(db, v)["elms"]),
                  moe_urls={m.id: forests.file_urls(storage, m.files) for m in moes if m.files})


@router.post("/forests/{name}/averages")
def request_average(request: Request, name: str, db: DB, user: WebUser, csrf: Annotated[str, Form()] = "",
                    method: Annotated[str, Form()] = "posterior", domain: Annotated[str, Form()] = "",
                    version: Annotated[int | None, Form()] = None):
    if user is None:
        raise _LoginRequired(f"/forests/{name}/download")
    check_csrf(request, csrf)
    f = forests.get(db, name)
    v = forests.version(db, f, version)
    try:
        a, needs_job = averages.request(db, v, method, domain or None)
    except ServiceError as e:
        flash(request, f"not done: {e.message}")
        return RedirectResponse(f"/forests/{name}/download?version={v.number}", status_code=303)
    if needs_job:
        jobs.enqueue(db, "average", f"average:{a.id}", {"average_id": a.id}, owner=user)
    return RedirectResponse(f"/forests/{name}/averages/{a.id}", status_code=303)


@router.get("/forests/{name}/averages/{average_id}", response_class=HTMLResponse)
def average_page(request: Request, name: str, average_id: Id, db: DB, user: WebUser, storage: StorageDep):
    a = db.get(AveragedModel, average_id)
    if a is None or a.version.forest.name != name:
        raise NotFound(f"no averaged model {average_id} of forest {name!r}")
    urls = forests.file_urls(storage, a.files) if a.files else {}
    ctx = dict(forest=a.version.forest, a=a, urls=urls, base=str(request.base_url).rstrip("/"))
    if request.headers.get("hx-request"):
        return templates.TemplateResponse(request, "_average.html", ctx)
    return render(request, "average.html", user, title=f"Averaged model · {name}", **ctx)


@router.post("/forests/{name}/moe")
def request_moe(request: Request, name: str, db: DB, user: WebUser, csrf: Annotated[str, Form()] = "",
                experts_per_token: Annotated[int | None, Form(ge=1, le=1024)] = None,
                backbone: Annotated[str, Form(max_length=16)] = "uniform", domain: Annotated[str, Form()] = "",
                version: Annotated[int | None, Form()] = None):
    if user is None:
        raise _LoginRequired(f"/forests/{name}/download")
    check_csrf(request, csrf)
    v = forests.version(db, forests.get(db, name), version)
    try:  # the form always sends a domain; it counts for the posterior backbone only
        m, needs_job = moe.request(db, v, experts_per_token, backbone, domain if backbone == "posterior" else None)
    except ServiceError as e:
        flash(request, f"not done: {e.message}")
        return RedirectResponse(f"/forests/{name}/download?version={v.number}#moe", status_code=303)
    if needs_job:
        jobs.enqueue(db, "moe_export", f"moe:{m.id}", {"moe_id": m.id}, owner=user)
    return RedirectResponse(f"/forests/{name}/moe/{m.id}", status_code=303)


@router.get("/forests/{name}/moe/{moe_id}", response_class=HTMLResponse)
def moe_page(request: Request, name: str, moe_id: Id, db: DB, user: WebUser, storage: StorageDep,
             settings: SettingsDep):
    m = moe.get(db, name, moe_id)
    ctx = dict(forest=m.version.forest, m=m, urls=forests.file_urls(storage, m.files) if m.files else {},
               samples=moe.describe_samples(m), max_steps=settings.moe_tune_max_steps)
    if request.headers.get("hx-request"):
        return templates.TemplateResponse(request, "_moe.html", ctx)
    return render(request, "moe.html", user, title=f"MoE model · {name}", **ctx)


@router.post("/forests/{name}/moe/{moe_id}/tune")
def tune_moe(request: Request, name: str, moe_id: Id, db: DB, user: WebUser, settings: SettingsDep,
             csrf: Annotated[str, Form()] = "", steps: Annotated[int, Form(ge=1, le=2**31 - 1)] = 100,
             whole: Annotated[bool, Form()] = False):
    require_maintainer(request, user)
    check_csrf(request, csrf)
    try:
        m, needs_job = moe.request_tuning(db, settings, moe.get(db, name, moe_id), steps, whole)
    except ServiceError as e:
        flash(request, f"not done: {e.message}")
        return RedirectResponse(f"/forests/{name}/moe/{moe_id}", status_code=303)
    if needs_job:
        jobs.enqueue(db, "moe_tune", f"moe:{m.id}", {"moe_id": m.id}, owner=user)
    return RedirectResponse(f"/forests/{name}/moe/{m.id}", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, user: WebUser, next: str = "/"):
    return render(request, "login.html", user, title="Log in", next=next if next.startswith("/") else "/")


@router.post("/login")
def login(request: Request, db: DB, settings: SettingsDep, username: Annotated[str, Form(max_length=64)] = "",
          password: Annotated[str, Form(max_length=256)] = "", csrf: Annotated[str, Form()] = "",
          next: Annotated[str, Form()] = "/"):
    check_csrf(request, csrf)
    try:
        u = users.authenticate(db, username, password, request.client.host if request.client else "unknown",
                               settings.failed_logins_per_hour)
    except ServiceError as e:
        return render(request, "login.html", None, status_code=401, title="Log in", error=e.message, next=next,
                      username=username)
    request.session.clear()
    request.session["uid"] = u.id
    flash(request, f"logged in as {u.username}")
    return RedirectResponse(next if next.startswith("/") and not next.startswith("//") else "/", status_code=303)


@router.post("/logout")
def logout(request: Request, csrf: Annotated[str, Form()] = ""):
    check_csrf(request, csrf)
    request.session.clear()
    return RedirectResponse("/", status_code=303)


# ----------------------------------------------------------------------------- mounting


def mount(app: FastAPI) -> None:
    settings = app.state.settings
    app.add_middleware(SessionMiddleware, secret_key=settings.signing_key(), session_cookie="elmforest_session",
                       same_site="lax", https_only=settings.public_url.startswith("https://"), max_age=14 * 24 * 3600)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(router)
    templates.env.globals["State"] = State
    templates.env.globals["imported_from"] = describe
    templates.env.globals["Role"] = Role

    @app.exception_handler(_LoginRequired)
    async def login_required(request: Request, exc: _LoginRequired):
        return RedirectResponse("/login?" + urlencode({"next": exc.next}), status_code=303)

    api_handler = app.exception_handlers.get(ServiceError)

    async def service_error(request: Request, exc: ServiceError):
        # pages get a page; the API keeps its JSON errors
        if request.url.path.startswith("/api/") or api_handler is None:
            return await api_handler(request, exc)
        user = None
        return render(request, "error.html", user, status_code=exc.status, title="Something is not right",
                      message=public(exc.message), status=exc.status)

    app.add_exception_handler(ServiceError, service_error)
