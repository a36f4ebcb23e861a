"""What each contribution is worth, against a live coordinator: every ELM's leave-one-out and
Shapley value per domain (API, CLI, web), per contributor with the wanted domains, the merge
preview of a pending contribution, values for a version evaluated before they existed (a
job), 409 for a version not evaluated, and the score cache: a re-evaluation or a new version
scores only what it has not seen, and a broken cache entry is scored again, never trusted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import httpx
import pytest
from live import Coordinator, populate

from contributor_client import commands
from contributor_client.http import ClientError

FOREST = "web"


@pytest.fixture(scope="module")
def site(tmp_path_factory, seed_dir, tok, cache_dir):
    c = Coordinator(tmp_path_factory.mktemp("values"), {"ELMFOREST_VALUE_PERMUTATIONS": "60"})
    data = populate(c, seed_dir, tok, cache_dir, tmp_path_factory.mktemp("values-work"), forest=FOREST)
    data["seed_dir"] = seed_dir
    yield c, data
    c.stop()


def _ppl(lb: dict) -> dict[tuple[str, str], float]:
    return {(r["subject"], d): p for r in lb["rows"] for d, p in r["ppl"].items()}


def test_values_per_elm_and_domain_agree_with_the_leaderboard(site):
    c, data = site
    admin = data["admin"]
    rep = admin.get(f"/forests/{FOREST}/versions/2/values")
    lb = _ppl(admin.get(f"/forests/{FOREST}/leaderboard", version=2, per_page=100))
    doms = {d["name"]: d for d in rep["domains"]}
    assert set(doms) == {"python", "kjv_bible", "postgres_docs", "go"} and doms["go"]["role"] == "eval"
    assert rep["permutations"] == 60 and {e["name"] for e in rep["elms"]} == {"python", "kjv_bible"}
    for dn, d in doms.items():
        assert d["forest_ppl"] == pytest.approx(lb[("ensemble", dn)], rel=1e-6)
        assert d["improvement"] == pytest.approx(math.log(d["seed_ppl"] / d["forest_ppl"]))
        assert sum(x["shapley"] for x in d["elms"]) == pytest.approx(d["improvement"], abs=1e-9)
        by = {x["elm"]: x for x in d["elms"]}
        assert by["python"]["owner"] == "alice" and by["kjv_bible"]["owner"] == "bob"
        for elm, other in (("python", "kjv_bible"), ("kjv_bible", "python")):
            x = by[elm]
            # without it, the forest is the other ELM alone
            assert x["without_ppl"] == pytest.approx(lb[(other, dn)], rel=1e-5)
            assert x["loo"] == pytest.approx(x["without_ppl"] / d["forest_ppl"] - 1, rel=1e-9)
            # two ELMs: the exact Shapley value, within the sampling error reported
            alone = math.log(d["seed_ppl"] / lb[(elm, dn)])
            exact = 0.5 * alone + 0.5 * (d["improvement"] - math.log(d["seed_ppl"] / lb[(other, dn)]))
            assert abs(x["shapley"] - exact) <= 4 * (x["shapley_se"] or 0) + 1e-9
    # an ELM is worth most on its own domain
    own = {x["elm"]: x["loo"] for x in doms["python"]["elms"]}
    assert own["python"] > own["kjv_bible"]


def test_a_version_not_evaluated_answers_409_with_what_to_wait_for(site):
    c, data = site
    with pytest.raises(ClientError) as e:
        data["alice"].get(f"/forests/{FOREST}/versions/1/values")
    assert e.value.status == 409 and "not evaluated yet" in str(e.value)
    assert e.value.body["error"]["wait_for"]["kind"] == "evaluate_version"
    with pytest.raises(ClientError) as e:
        data["alice"].get(f"/forests/{FOREST}/versions/99/values")
    assert e.value.status == 404


def test_a_version_evaluated_before_values_existed_gets_them_from_a_job(site):
    from sqlalchemy import delete, select

    from coordinator.models import DomainValue, ElmValue, ForestVersion

    c, data = site
    admin = data["admin"]
    before = admin.get(f"/forests/{FOREST}/versions/2/values")
    with c.db() as db:  # as a database migrated from before values: evaluated, no values
        v = db.scalar(select(ForestVersion).where(ForestVersion.number == 2))
        db.execute(delete(ElmValue).where(ElmValue.version_id == v.id))
        db.execute(delete(DomainValue).where(DomainValue.version_id == v.id))
        v.valued_at = None
    e = _first_refusal(lambda: admin.get(f"/forests/{FOREST}/versions/2/values"))
    wait = e.body["error"]["wait_for"]
    assert e.status == 409 and wait["kind"] == "values"
    job = admin.wait(lambda: admin.job(wait["job_id"]), lambda x: x["status"] in ("succeeded", "failed"))
    assert job["status"] == "succeeded", job
    assert job["result"]["scored"] == 0  # every ELM's and the seed's scores came from the cache
    after = admin.get(f"/forests/{FOREST}/versions/2/values")
    assert after == before  # the same scores and the same orderings


def _first_refusal(read, within: float = 10.0) -> ClientError:
    """The error `read` raises once the server sees a change made behind its back (here, in its
    database): each API process answers a published read from its own copy for up to
    ELMFOREST_RESPONSE_CACHE_SECONDS (1 s) after the change."""
    end = time.monotonic() + within
    while True:
        try:
            read()
        except ClientError as e:
            return e
        assert time.monotonic() < end, "the read still answers as before the change"
        time.sleep(0.2)


def _entries(c) -> list:
    return sorted((c.data_dir / "artifacts" / "scores").iterdir())


def _entry_of(c, admin, tok, elm: str, domain: str):
    """The cache file of an ELM of v2 on a domain's held-out blocks (as the coordinator makes them)."""
    from sqlalchemy import select

    from btm.score_cache import entry_key, files_fingerprint
    from coordinator.models import Domain
    from coordinator.services.domains import held_out_blocks

    m = admin.get(f"/forests/{FOREST}/versions/2")
    files = next(e["files"] for e in m["elms"] if e["name"] == elm)
    with c.db() as db:
        blocks = held_out_blocks(None, c.settings, db.scalar(select(Domain).where(Domain.name == domain)), tok)
    return c.data_dir / "artifacts" / entry_key(files_fingerprint(files), blocks.fingerprint)


def test_a_broken_cache_entry_is_scored_again_and_reevaluation_scores_nothing_else(site, tok):
    import numpy as np
    import torch

    from btm.score_cache import decode, encode

    c, data = site
    admin = data["admin"]
    truncated, wrong = _entry_of(c, admin, tok, "python", "go"), _entry_of(c, admin, tok, "kjv_bible", "python")
    assert truncated.exists() and wrong.exists() and len(_entries(c)) > 2
    truncated.write_bytes(truncated.read_bytes()[:-5])
    key = "scores/" + wrong.name
    head = json.loads(wrong.read_bytes().split(b"\n", 1)[0])
    wrong.write_bytes(encode(key, torch.zeros(2, 2), np.zeros(head["dev_shape"][0])))  # a whole entry, wrong shape
    # a dense baseline (the seed's files: scores it already has) and a re-evaluation
    commands.register_baseline(admin, FOREST, "dense", data["seed_dir"])
    job = admin.post(f"/forests/{FOREST}/evaluate", version=2)
    job = admin.wait(lambda: admin.job(job["id"]), lambda x: x["status"] in ("succeeded", "failed") and x["result"])
    assert job["status"] == "succeeded", job
    assert job["result"]["scored"] == 2  # the two broken entries, nothing else
    for f in (truncated, wrong):
        h = json.loads(f.read_bytes().split(b"\n", 1)[0])
        assert h["test_shape"] != [2, 2]
        assert decode(f.read_bytes(), "scores/" + f.name, tuple(h["test_shape"]), h["dev_shape"][0]) is not None


def test_contributors_and_wanted_domains(site):
    c, data = site
    rep = data["bob"].get(f"/forests/{FOREST}/versions/2/values/contributors")
    who = {x["name"]: x for x in rep["contributors"]}
    assert set(who) == {"alice", "bob"} and who["alice"]["elms"] == ["python"]
    values = data["bob"].get(f"/forests/{FOREST}/versions/2/values")
    for d in values["domains"]:
        assert sum(w["shapley"][d["name"]] for w in who.values()) == pytest.approx(d["improvement"], abs=1e-9)
    wanted = rep["wanted"]
    assert len(wanted) == 3 and wanted[0]["baseline"] == "dense"
    assert [w["ratio"] for w in wanted] == sorted((w["ratio"] for w in wanted), reverse=True)
    assert all(w["ratio"] == pytest.approx(w["forest_ppl"] / w["baseline_ppl"]) for w in wanted)


def cli(*args, env):
    return subprocess.run([sys.executable, "-m", "elmforest_cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_the_cli_prints_tables_and_json(site, tmp_path):
    c, data = site
    env = {"XDG_CONFIG_HOME": str(tmp_path), "ELMFOREST_URL": c.url, "ELMFOREST_TOKEN": ""}
    r = cli("values", FOREST, "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == data["admin"].get(f"/forests/{FOREST}/versions/2/values")
    r = cli("values", FOREST, env=env)
    assert r.returncode == 0 and "forest ppl" in r.stdout and "kjv_bible" in r.stdout and "Shapley" in r.stdout
    r = cli("values", FOREST, "--contributors", env=env)
    assert r.returncode == 0 and "alice" in r.stdout and "wanted domains" in r.stdout
    r = cli("values", FOREST, "--version", "1", env=env)
    assert r.returncode == 1 and "not evaluated yet" in r.stderr
    pid = data["pending"]["id"]
    r = cli("review", "preview", pid, env={**env, "ELMFOREST_TOKEN": data["admin"].token})
    assert r.returncode == 0 and "postgres_docs (own" not in r.stdout and "postgres_docs" in r.stdout, r.stderr


def test_the_web_pages_show_the_values(site):
    c, data = site
    page = httpx.get(c.url + f"/forests/{FOREST}/values")
    assert page.status_code == 200
    html = page.text
    assert 'class="bars signed"' in html and 'table class="values"' in html and "Wanted domains" in html
    assert ">alice</a>" in html and ">bob</a>" in html
    user = httpx.get(c.url + "/users/alice")
    assert user.status_code == 200 and f"{FOREST} v2" in user.text and "python" in user.text
    old = httpx.get(c.url + f"/forests/{FOREST}/values?version=1")
    assert old.status_code == 409 and "not evaluated yet" in old.text


def test_merge_preview_then_merge_scores_only_the_averages(site):
    c, data = site
    admin, bob = data["admin"], data["bob"]
    pid = data["pending"]["id"]
    p = admin.get(f"/contributions/{pid}/merge-preview")
    now = {d["name"]: d for d in admin.get(f"/forests/{FOREST}/versions/2/values")["domains"]}
    assert p["own_domain"] == "postgres_docs" and p["forest_version"] == 2 and set(p["domains"]) == set(now)
    for dn, x in p["domains"].items():
        assert x["before_ppl"] == pytest.approx(now[dn]["forest_ppl"], rel=1e-9)
        assert x["change"] == pytest.approx(x["after_ppl"] / x["before_ppl"] - 1)
    assert p["domains"]["postgres_docs"]["change"] < 0  # the candidate helps on its own domain
    with pytest.raises(ClientError) as e:
        bob.get(f"/contributions/{pid}/merge-preview")
    assert e.value.status == 404
    # the review queue shows it before the decision
    web = _web_login(c, "admin")
    review = web.get("/review")
    web.close()
    assert review.status_code == 200 and "If merged" in review.text and "postgres_docs (own)" in review.text
    assert f'{p["domains"]["postgres_docs"]["change"] * 100:+.2f}%' in review.text
    # merge it: the new version's forest is what the preview said, and its ELMs' scores were all cached
    admin.post(f"/contributions/{pid}/approve", {"reason": "ok"})
    job = admin.post(f"/forests/{FOREST}/publish", {"note": "third"})
    admin.wait(lambda: admin.job(job["id"]), lambda x: x["status"] == "succeeded")
    v3 = admin.wait(lambda: _try(admin, f"/forests/{FOREST}/versions/3/values"), lambda x: x is not None, timeout=300)
    for d in v3["domains"]:
        assert d["forest_ppl"] == pytest.approx(p["domains"][d["name"]]["after_ppl"], rel=1e-9)
    assert "merge_preview" not in admin.get(f"/forests/{FOREST}/versions/3")["elms"][-1]["metrics"]
    jobs = [j for j in admin.get("/jobs") if j["kind"] == "evaluate_version" and j["status"] == "succeeded"]
    last = max(jobs, key=lambda j: j["id"])
    # 3 ELMs, the seed and the dense baseline were cached; only the new averages ran
    # (the uniform one on 4 domains, a posterior one per domain)
    assert last["result"]["scored"] == 4 + 4 and last["result"]["reused"] >= 3 * 4 + 4 + 4


def _web_login(c, username: str, password: str = "password123") -> httpx.Client:
    import re

    web = httpx.Client(base_url=c.url, follow_redirects=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', web.get("/login").text).group(1)
    r = web.post("/login", data={"username": username, "password": password, "csrf": csrf, "next": "/"})
    assert r.status_code == 200, r.text[:500]
    return web


def _try(client, path):
    try:
        return client.get(path)
    except ClientError as e:
        if e.status == 409:
            return None
        raise


def test_scores_kept_on_s3_are_reused_and_a_truncated_one_is_scored_again(seed_dir, tok, corpus_dir, cache_dir):
    """The production stack keeps scores in S3 (here moto's server) through the same interface."""
    import torch
    from live import MotoS3

    from btm.data import Corpus
    from btm.evaluate import Scores, domain_blocks
    from btm.score_cache import decode, dir_fingerprint, entry_key
    from coordinator.services.values import ArtifactScores
    from coordinator.storage import S3Storage

    moto = MotoS3()
    try:
        s3 = S3Storage("scores", "pre/fix", moto.url, "us-east-1", "testing", "testing", ttl=600)
        s3.ensure_bucket()
        store = ArtifactScores(s3)
        doms = domain_blocks(Corpus(corpus_dir), ["python"], tok, 32, 4, 4, cache_dir)
        a = Scores(store=store)
        a.add_model("seed", seed_dir, doms)
        b = Scores(store=store)
        b.add_model("seed", seed_dir, doms)
        assert (a.scored, b.scored, b.reused) == (1, 0, 1)
        assert torch.equal(a.test[("seed", "python")], b.test[("seed", "python")])
        key = entry_key(dir_fingerprint(seed_dir), doms[0].fingerprint)
        s3.put_bytes(key, store.read(key)[:-4])  # truncated
        c = Scores(store=store)
        c.add_model("seed", seed_dir, doms)
        assert c.scored == 1 and torch.equal(a.test[("seed", "python")], c.test[("seed", "python")])
        shape = tuple(a.test[("seed", "python")].shape)
        assert decode(store.read(key), key, shape, doms[0].dev.shape[0]) is not None  # whole again
        assert store.read("scores/nothing-here") is None
    finally:
        moto.stop()
