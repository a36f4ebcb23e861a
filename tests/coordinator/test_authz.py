"""Authorization matrix: every API route x (anonymous, the owner, another contributor, a
maintainer) -> the status each must get. A route missing from the table fails the test, so
new routes declare who may call them."""

import hashlib

import pytest
from helpers import CORPUS
from live import add_domain

ROLES = ("anon", "owner", "other", "maint")


@pytest.fixture(scope="module")
def world(coordinator, seed_dir):
    c = coordinator
    admin = c.user("root", "admin")
    admin.create_forest("authz", seed_dir)
    owner, other, maint = c.user("owner"), c.user("other"), c.user("maint", "maintainer")
    add_domain(owner, "owned", CORPUS, "python")
    b = owner.post("/branch-inits", {"forest": "authz", "domain": "owned", "method": "seed"})
    owner.wait(lambda: owner.get(f"/branch-inits/{b['id']}"), lambda x: x["status"] == "ready")
    import json

    from btm.tokenizer import load_tokenizer, tokenizer_sha256

    cfg = json.loads((seed_dir / "config.json").read_text())
    tok_sha = tokenizer_sha256(load_tokenizer(seed_dir))
    contrib = owner.post("/contributions", {"forest": "authz", "branch_init_id": b["id"], "sha256": "a" * 64,
                                             "size": 1000, "config": cfg, "tokenizer_sha256": tok_sha})
    token_id = owner.get("/tokens")[0]["id"]
    return {
        "clients": {"anon": c.anonymous(), "owner": owner, "other": other, "maint": maint},
        "branch": b["id"], "contribution": contrib["contribution"]["id"], "upload": contrib["upload"]["upload_id"],
        "token": token_id, "cfg": cfg, "tok_sha": tok_sha,
    }


def upload_body(i):
    return {"purpose": "sample", "filename": "s.jsonl", "sha256": hashlib.sha256(str(i).encode()).hexdigest(), "size": 10}


# (method, path, body, {role: status}); order matters where a call changes state
def cases(w):
    n = iter(range(10_000))
    return [
        ("GET", "/me", None, dict(anon=401, owner=200, other=200, maint=200)),
        ("GET", "/tokens", None, dict(anon=401, owner=200, other=200, maint=200)),
        ("POST", "/tokens", lambda: {"name": "t"}, dict(anon=401, owner=201, other=201, maint=201)),
        ("POST", "/tokens", lambda: {"name": "t", "scopes": ["maintain"]}, dict(anon=401, owner=403, other=403, maint=201)),
        ("GET", "/domains", None, dict(anon=200, owner=200, other=200, maint=200)),
        ("GET", "/domains/owned", None, dict(anon=200, owner=200, other=200, maint=200)),
        ("POST", "/domains", lambda: {"name": f"d{next(n)}"}, dict(anon=401, owner=201, other=201, maint=201)),
        ("POST", "/domains", lambda: {"name": f"e{next(n)}", "role": "eval"}, dict(anon=401, owner=403, other=403, maint=201)),
        ("PATCH", "/domains/owned", lambda: {"description": "x"}, dict(anon=401, owner=403, other=403, maint=200)),
        ("PUT", "/domains/owned/eval-data", lambda: {"sha256": "0" * 64}, dict(anon=401, owner=400, other=403, maint=400)),
        ("POST", "/uploads", lambda: upload_body(next(n)), dict(anon=401, owner=201, other=201, maint=201)),
        ("GET", f"/uploads/{w['upload']}", None, dict(anon=401, other=404, maint=404, owner=200)),
        ("POST", f"/uploads/{w['upload']}/complete", lambda: {}, dict(anon=401, other=404, maint=404, owner=400)),
        ("GET", "/forests", None, dict(anon=200, owner=200, other=200, maint=200)),
        ("POST", "/forests", lambda: {"name": "xx", "files": {}}, dict(anon=401, owner=403, other=403, maint=400)),
        ("GET", "/forests/authz", None, dict(anon=200, owner=200, other=200, maint=200)),
        ("GET", "/forests/authz/versions", None, dict(anon=200, owner=200, other=200, maint=200)),
        ("GET", "/forests/authz/baselines", None, dict(anon=200, owner=200, other=200, maint=200)),
        ("POST", "/forests/authz/baselines", lambda: {"name": "dense", "files": {"config.json": "0" * 64}},
         dict(anon=401, owner=403, other=403, maint=400)),
        ("GET", "/forests/authz/versions/1", None, dict(anon=200, owner=200, other=200, maint=200)),
        ("GET", "/forests/authz/download", None, dict(anon=200, owner=200, other=200, maint=200)),
        ("GET", "/forests/authz/leaderboard", None, dict(anon=200, owner=200, other=200, maint=200)),
        ("GET", "/forests/authz/posteriors", None, dict(anon=200, owner=200, other=200, maint=200)),
        ("GET", "/forests/authz/versions/1/values", None, dict(anon=409, owner=409, other=409, maint=409)),
        ("GET", "/forests/authz/versions/1/values/contributors", None, dict(anon=409, owner=409, other=409, maint=409)),
        ("POST", "/forests/authz/averages", lambda: {"method": "uniform"}, dict(anon=401, owner=400, other=400, maint=400)),
        ("GET", "/forests/authz/averages/999", None, dict(anon=404, owner=404, other=404, maint=404)),
        ("GET", "/forests/authz/moe", None, dict(anon=200, owner=200, other=200, maint=200)),
        # a Llama forest, but v1 has no ELMs to make experts of
        ("POST", "/forests/authz/moe", lambda: {}, dict(anon=401, owner=400, other=400, maint=400)),
        ("GET", "/forests/authz/moe/999", None, dict(anon=404, owner=404, other=404, maint=404)),
        ("POST", "/forests/authz/moe/999/tune", lambda: {"steps": 5}, dict(anon=401, owner=403, other=403, maint=404)),
        ("POST", "/forests/authz/evaluate", lambda: {}, dict(anon=401, owner=403, other=403, maint=202)),
        ("POST", "/branch-inits", lambda: {"forest": "authz", "domain": "owned", "method": "seed"},
         dict(anon=401, owner=202, other=202, maint=202)),
        ("GET", f"/branch-inits/{w['branch']}", None, dict(anon=401, owner=200, other=404, maint=200)),
        ("POST", "/contributions", lambda: {"forest": "authz", "branch_init_id": w["branch"], "sha256": hashlib.sha256(
            str(next(n)).encode()).hexdigest(), "size": 10, "config": w["cfg"], "tokenizer_sha256": w["tok_sha"],
            "name": f"c{next(n)}"}, dict(anon=401, other=404, owner=201, maint=201)),
        ("GET", "/contributions", None, dict(anon=200, owner=200, other=200, maint=200)),
        ("GET", f"/contributions/{w['contribution']}", None, dict(anon=404, owner=200, other=404, maint=200)),
        ("GET", f"/contributions/{w['contribution']}/merge-preview", None, dict(anon=404, owner=409, other=404, maint=409)),
        ("GET", f"/contributions/{w['contribution']}/upload", None, dict(anon=401, owner=200, other=404, maint=403)),
        ("GET", f"/contributions/{w['contribution']}/download", None, dict(anon=404, owner=404, other=404, maint=404)),
        ("POST", f"/contributions/{w['contribution']}/complete", lambda: {}, dict(anon=401, other=404, maint=403, owner=400)),
        ("POST", f"/contributions/{w['contribution']}/approve", lambda: {}, dict(anon=401, owner=403, other=403, maint=409)),
        ("POST", f"/contributions/{w['contribution']}/decline", lambda: {"reason": "no"}, dict(anon=401, owner=403, other=403, maint=409)),
        ("POST", "/forests/authz/publish", lambda: {}, dict(anon=401, owner=403, other=403, maint=202)),
        ("POST", "/forests/authz/imports", lambda: {"domain": "owned", "name": f"i{next(n)}", "sha256": hashlib.sha256(
            str(next(n)).encode()).hexdigest(), "size": 10, "config": w["cfg"], "tokenizer_sha256": w["tok_sha"],
            "source": {"hub": "org/model", "revision": "main"}}, dict(anon=401, owner=403, other=403, maint=201)),
        ("POST", f"/contributions/{w['contribution']}/remove", lambda: {"reason": "x"}, dict(anon=401, owner=403, other=403, maint=202)),
        ("GET", "/jobs/1", None, dict(anon=401, owner=200, other=404, maint=200)),
        ("GET", "/jobs", None, dict(anon=401, owner=200, other=200, maint=200)),
        ("POST", "/jobs/1/retry", lambda: {}, dict(anon=401, owner=403, other=403, maint=409)),
        ("POST", "/invites", lambda: {}, dict(anon=401, owner=403, other=403, maint=201)),
        ("POST", "/rounds", lambda: {"forest": "authz", "steps": 5}, dict(anon=401, owner=403, other=403, maint=201)),
        ("GET", "/rounds", None, dict(anon=401, owner=403, other=403, maint=200)),
        ("GET", "/rounds/1", None, dict(anon=401, owner=403, other=403, maint=200)),
        ("POST", "/rounds/1/cancel", lambda: {}, dict(anon=401, owner=403, other=403, maint=200)),
        ("DELETE", f"/uploads/{w['upload']}", None, dict(anon=401, other=404, maint=404, owner=204)),
        ("POST", f"/contributions/{w['contribution']}/abandon", lambda: {}, dict(anon=401, other=404, maint=403, owner=200)),
        ("DELETE", f"/tokens/{w['token']}", None, dict(anon=401, other=404, maint=404, owner=200)),
    ]


def test_every_route_against_every_role(world, coordinator):
    from coordinator.app import api_routes, create_app
    from coordinator.settings import Settings

    table = cases(world)
    app = create_app(Settings(data_dir=coordinator.data_dir / "introspect"))
    routes = {(m, r.path.removeprefix("/api/v1")) for r in api_routes(app)
              if r.path.startswith("/api/v1") and "/storage/" not in r.path for m in r.methods if m != "HEAD"}
    assert len(routes) > 40  # the table below must cover every one of them
    covered = set()
    import re

    for method, path, _, _ in table:
        for m, p in routes:
            if m == method and re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", p), path):
                covered.add((m, p))
    public = {("POST", "/auth/register"), ("POST", "/auth/login")}
    assert routes - covered - public == set(), "routes with no row in the authorization table"

    failures = []
    for method, path, body, expect in table:
        for role in expect:  # dict order: the owner acts last where its call changes state
            client = world["clients"][role]
            try:
                r = client.http.request(method, path, json=body() if body else None)
                got = r.status_code
            except Exception as e:  # pragma: no cover
                got = repr(e)
            if got != expect[role]:
                failures.append(f"{method} {path} as {role}: got {got}, want {expect[role]} ({r.text[:150]})")
    assert not failures, "\n".join(failures)


def test_anonymous_register_and_login(coordinator):
    anon = coordinator.anonymous()
    r = anon.http.post("/auth/register", json={"username": "newbie", "password": "longenough"})
    assert r.status_code == 201 and r.json()["token"].startswith("elf_")
    assert anon.http.post("/auth/register", json={"username": "newbie", "password": "longenough"}).status_code == 409
    assert anon.http.post("/auth/login", json={"username": "newbie", "password": "wrong-password"}).status_code == 401
    assert anon.http.post("/auth/login", json={"username": "newbie", "password": "longenough"}).status_code == 200
