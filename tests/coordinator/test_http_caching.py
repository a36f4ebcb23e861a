"""HTTP caching of published data against a live coordinator, over real HTTP: a public read
carries a strong ETag and `public, max-age, must-revalidate`; If-None-Match gets 304 with no
body; the tag changes when the version is evaluated again or a new version is published; it
does not depend on who asks; whatever depends on the caller is `private, no-store` and
varies on Authorization and Cookie; and answering reads, 304s included, writes nothing."""

import re
import sqlite3
import time

import httpx
import pytest
from helpers import CORPUS
from live import Coordinator, add_domain, contribute

FOREST = "cachef"


@pytest.fixture(scope="module")
def site(tmp_path_factory, seed_dir, tok, cache_dir):
    tmp = tmp_path_factory.mktemp("caching")
    c = Coordinator(tmp / "coord", {"ELMFOREST_CACHE_MAX_AGE_SECONDS": "30"})
    try:
        admin, alice, bob = c.user("admin", "admin"), c.user("alice"), c.user("bob")
        admin.create_forest(FOREST, seed_dir, "caching")
        add_domain(alice, "python", CORPUS)
        admin.finish(admin.post(f"/forests/{FOREST}/evaluate"), "evaluate")
        yield {"c": c, "admin": admin, "alice": alice, "bob": bob, "tmp": tmp, "tok": tok, "cache_dir": cache_dir}
    finally:
        c.stop()


def get(c: Coordinator, path: str, token: str | None = None, **headers) -> httpx.Response:
    if token:
        headers["authorization"] = f"Bearer {token}"
    return httpx.get(c.url + path, headers=headers, timeout=30)


PUBLIC_API = [f"/api/v1/forests/{FOREST}", f"/api/v1/forests/{FOREST}/versions", f"/api/v1/forests/{FOREST}/versions/1",
              f"/api/v1/forests/{FOREST}/leaderboard", f"/api/v1/forests/{FOREST}/leaderboard?sort=python&per_page=5",
              f"/api/v1/forests/{FOREST}/posteriors", f"/api/v1/forests/{FOREST}/download", "/api/v1/forests",
              f"/api/v1/forests/{FOREST}/versions/1/values", f"/api/v1/forests/{FOREST}/versions/1/values/contributors"]
PUBLIC_PAGES = [f"/forests/{FOREST}", f"/forests/{FOREST}/leaderboard", f"/forests/{FOREST}/posterior",
                f"/forests/{FOREST}/download", f"/forests/{FOREST}/values"]


@pytest.mark.parametrize("path", PUBLIC_API + PUBLIC_PAGES)
def test_a_public_read_is_tagged_and_a_matching_if_none_match_gets_304(site, path):
    c = site["c"]
    r = get(c, path)
    assert r.status_code == 200, r.text
    tag = r.headers["etag"]
    assert re.fullmatch(r'(W/)?"[0-9a-f]{32}"', tag)
    assert tag.startswith("W/") == path.split("?")[0].endswith("/download")  # only signed URLs are weak
    cc = r.headers["cache-control"]
    assert cc.startswith("public") and "max-age=30" in cc and "must-revalidate" in cc
    assert "set-cookie" not in r.headers
    again = get(c, path, **{"if-none-match": tag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == tag and again.headers["cache-control"] == cc
    # another tag, or a list holding it
    assert get(c, path, **{"if-none-match": '"0000"'}).status_code == 200
    assert get(c, path, **{"if-none-match": f'"0000", {tag}'}).status_code == 304


def test_the_tag_of_a_public_read_does_not_depend_on_the_caller(site):
    c, alice, bob = site["c"], site["alice"], site["bob"]
    for path in PUBLIC_API:
        tags = {get(c, path, tok).headers["etag"] for tok in (None, alice.token, bob.token)}
        assert len(tags) == 1, path
        # an API read is the same for everyone: no Vary on the caller
        assert "authorization" not in get(c, path, alice.token).headers.get("vary", "").lower()
    for path in PUBLIC_PAGES:
        a, b = get(c, path), get(c, path, **{"user-agent": "another browser", "accept-language": "de"})
        assert a.headers["etag"] == b.headers["etag"] and a.text == b.text, path
        assert {"authorization", "cookie"} <= {v.strip().lower() for v in a.headers["vary"].split(",")}
        # a visitor's 304 comes from another visitor's tag
        assert get(c, path, **{"if-none-match": a.headers["etag"]}).status_code == 304


def test_what_depends_on_the_caller_is_private_and_differs_between_users(site):
    c, alice, bob = site["c"], site["alice"], site["bob"]
    ra, rb = get(c, "/api/v1/me", alice.token), get(c, "/api/v1/me", bob.token)
    assert ra.json()["username"] == "alice" and rb.json()["username"] == "bob"
    for r in (ra, rb):
        assert r.headers["cache-control"] == "private, no-store" and "etag" not in r.headers
        assert {"authorization", "cookie"} <= {v.strip().lower() for v in r.headers["vary"].split(",")}
    assert get(c, "/api/v1/me").headers["cache-control"] == "private, no-store"  # a 401 too
    # a signed-in user's page names them: private, untagged, never a 304
    pages = {}
    for who in ("alice", "bob"):
        web = httpx.Client(base_url=c.url, timeout=30)
        csrf = re.search(r'name="csrf" value="([^"]+)"', web.get("/login").text).group(1)
        assert web.post("/login", data={"username": who, "password": "password123", "csrf": csrf,
                                         "next": "/"}).status_code in (200, 303)
        web.get(f"/forests/{FOREST}")  # the page that shows the login's flash message
        r = web.get(f"/forests/{FOREST}/leaderboard")
        assert r.status_code == 200 and who in r.text
        assert r.headers["cache-control"] == "private, no-store" and "etag" not in r.headers
        anon_tag = get(c, f"/forests/{FOREST}/leaderboard").headers["etag"]
        assert web.get(f"/forests/{FOREST}/leaderboard", headers={"if-none-match": anon_tag}).status_code == 200
        pages[who] = r.text
    assert pages["alice"] != pages["bob"]
    # a contribution's owner sees it; the answer is never for a shared cache
    cs = get(c, "/api/v1/contributions", alice.token)
    assert cs.headers["cache-control"] == "private, no-store"


def test_answering_reads_and_304s_writes_nothing(site):
    c, alice = site["c"], site["alice"]
    tags = {p: get(c, p).headers["etag"] for p in PUBLIC_API + PUBLIC_PAGES}
    time.sleep(6)  # past the batched token-use writer's round (tokens are sent below)
    db = sqlite3.connect(c.data_dir / "coordinator.db")
    before = db.execute("pragma data_version").fetchone()[0]
    for _ in range(3):
        for p, tag in tags.items():
            assert get(c, p, alice.token).status_code == 200
            assert get(c, p, alice.token, **{"if-none-match": tag}).status_code == 304
    time.sleep(6)
    assert db.execute("pragma data_version").fetchone()[0] == before, "a read wrote to the database"


def test_the_tag_changes_with_a_new_evaluation_and_a_new_version(site):
    c, admin, alice = site["c"], site["admin"], site["alice"]
    paths = [f"/api/v1/forests/{FOREST}/leaderboard", f"/api/v1/forests/{FOREST}/posteriors",
             f"/forests/{FOREST}/leaderboard", f"/forests/{FOREST}"]
    old = {p: get(c, p).headers["etag"] for p in paths}
    manifest = get(c, f"/api/v1/forests/{FOREST}/versions/1").headers["etag"]
    # evaluated again: the version's reads get new tags, and the old tag is a 200
    admin.finish(admin.post(f"/forests/{FOREST}/evaluate"), "evaluate")
    new = {p: get(c, p).headers["etag"] for p in paths}
    for p in paths:
        assert new[p] != old[p], p
        assert get(c, p, **{"if-none-match": old[p]}).status_code == 200
    assert get(c, f"/api/v1/forests/{FOREST}/versions/1").headers["etag"] == manifest  # immutable
    # a new version: what names the current version changes; version 1's manifest does not
    versions = get(c, f"/api/v1/forests/{FOREST}/versions").headers["etag"]
    elm = contribute(c, alice, FOREST, "python", site["tok"], site["cache_dir"], site["tmp"])
    admin.post(f"/contributions/{elm['id']}/approve", {"reason": "ok"})
    admin.finish(admin.post(f"/forests/{FOREST}/publish", {"note": "python"}), "publish")
    assert get(c, f"/api/v1/forests/{FOREST}/versions").headers["etag"] != versions
    for p in paths:
        r = get(c, p, **{"if-none-match": new[p]})
        assert r.status_code == 200 and r.headers["etag"] != new[p], p
    assert get(c, f"/api/v1/forests/{FOREST}/versions/1", **{"if-none-match": manifest}).status_code == 304


def test_each_process_answers_a_public_read_from_its_copy_and_a_write_through_it_shows_at_once(site):
    """ELMFOREST_RESPONSE_CACHE_SECONDS (1 s): the same public read again within it is answered
    from the process's copy (no route, no database; the 304 too), as the route answered it; a
    write through the process shows in the next read; a caller's own page is never the copy."""
    c, admin, alice = site["c"], site["admin"], site["alice"]
    for path in (f"/api/v1/forests/{FOREST}/leaderboard", f"/forests/{FOREST}"):
        first = get(c, path)
        again = get(c, path, alice.token)  # an API read is the same for every caller; a page for visitors
        kept = again if path.startswith("/api/") else get(c, path)
        assert "kept;" in kept.headers.get("server-timing", ""), path
        assert kept.status_code == 200 and kept.content == first.content, path
        for h in ("etag", "cache-control", "vary", "content-type"):
            assert kept.headers.get(h) == first.headers.get(h), (path, h)
        r = get(c, path, **{"if-none-match": first.headers["etag"]})
        assert r.status_code == 304 and r.headers["etag"] == first.headers["etag"], path
    # a write through this process: the next read is the route's, with the change
    page = get(c, f"/forests/{FOREST}")
    admin.request("PATCH", "/domains/python", json={"description": "python, described again"})
    after = get(c, f"/forests/{FOREST}")
    assert "kept;" not in after.headers.get("server-timing", "")
    assert after.headers["etag"] != page.headers["etag"]
    # a page with a session cookie is never the visitors' copy
    web = httpx.Client(base_url=c.url, timeout=30)
    csrf = re.search(r'name="csrf" value="([^"]+)"', web.get("/login").text).group(1)
    web.post("/login", data={"username": "alice", "password": "password123", "csrf": csrf, "next": "/"})
    web.get(f"/forests/{FOREST}")  # the flash message
    get(c, f"/forests/{FOREST}/leaderboard")
    mine = web.get(f"/forests/{FOREST}/leaderboard")
    assert "kept;" not in mine.headers.get("server-timing", "") and "alice" in mine.text
    assert mine.headers["cache-control"] == "private, no-store"
