"""Bad input gets a 4xx with a clear JSON error and leaves nothing behind in the database
or the store."""

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from helpers import CORPUS
from live import Coordinator, add_domain


@pytest.fixture(scope="module")
def small(tmp_path_factory, seed_dir):
    c = Coordinator(tmp_path_factory.mktemp("bad"), {"ELMFOREST_MAX_UPLOAD_BYTES": "3000000"})
    admin = c.user("admin", "admin")
    admin.create_forest("one", seed_dir)
    admin.create_forest("two", seed_dir)
    yield c
    c.stop()


def snapshot(c: Coordinator) -> dict:
    from sqlalchemy import func, select

    from coordinator.models import Base

    with c.db() as db:
        counts = {t.name: db.scalar(select(func.count()).select_from(t)) for t in Base.metadata.sorted_tables}
    counts.pop("api_tokens")  # each test user gets a token
    counts.pop("users")
    counts.pop("rate_events")  # counts of requests made, not anything stored
    keys = sorted(p.relative_to(c.data_dir).as_posix() for p in (c.data_dir / "artifacts").rglob("*") if p.is_file())
    return {"rows": counts, "keys": keys}


def expect_error(client, method, path, body, status, words):
    r = client.http.request(method, path, json=body)
    assert r.status_code == status, r.text
    msg = r.json()["error"]["message"]
    for w in words:
        assert w in msg, msg
    return msg


def test_bad_requests_leave_nothing_behind(small, seed_dir, tmp_path):
    c = small
    alice, bob = c.user("alice"), c.user("bob")
    add_domain(alice, "python", CORPUS)
    b = alice.post("/branch-inits", {"forest": "one", "domain": "python", "method": "seed"})
    alice.wait(lambda: alice.get(f"/branch-inits/{b['id']}"), lambda x: x["status"] == "ready")
    cfg = json.loads((seed_dir / "config.json").read_text())
    from btm.tokenizer import load_tokenizer, tokenizer_sha256

    tok_sha = tokenizer_sha256(load_tokenizer(seed_dir))
    before = snapshot(c)

    # too large
    expect_error(alice, "POST", "/uploads", {"purpose": "weights", "filename": "m", "sha256": "a" * 64,
                                            "size": 10**9}, 413, ["at most 3000000 bytes"])
    expect_error(alice, "POST", "/contributions", {"forest": "one", "branch_init_id": b["id"], "sha256": "a" * 64,
                 "size": 10**9, "config": cfg, "tokenizer_sha256": tok_sha}, 413, ["at most"])
    # unknown domain
    expect_error(alice, "POST", "/branch-inits", {"forest": "one", "domain": "klingon"}, 404,
                 ["unknown domain 'klingon'", "register it"])
    # duplicate name
    expect_error(bob, "POST", "/domains", {"name": "python"}, 409, ["already exists"])
    # a contribution for a branch init of another forest
    expect_error(alice, "POST", "/contributions", {"forest": "two", "branch_init_id": b["id"], "sha256": "a" * 64,
                 "size": 100, "config": cfg, "tokenizer_sha256": tok_sha}, 400, ["belongs to forest 'one'"])
    # ... or from a version other than the one declared
    expect_error(alice, "POST", "/contributions", {"forest": "one", "branch_init_id": b["id"], "forest_version": 7,
                 "sha256": "a" * 64, "size": 100, "config": cfg, "tokenizer_sha256": tok_sha}, 400, ["not v7"])
    # a config of another family, a foreign tokenizer
    other = {**cfg, "hidden_size": 128}
    expect_error(alice, "POST", "/contributions", {"forest": "one", "branch_init_id": b["id"], "sha256": "a" * 64,
                 "size": 100, "config": other, "tokenizer_sha256": tok_sha}, 422, ["not of the forest's family", "hidden_size"])
    expect_error(alice, "POST", "/contributions", {"forest": "one", "branch_init_id": b["id"], "sha256": "a" * 64,
                 "size": 100, "config": cfg, "tokenizer_sha256": "b" * 64}, 422, ["tokenizer"])
    # malformed body
    expect_error(alice, "POST", "/domains", {"name": 5}, 422, ["name"])
    assert snapshot(c) == before

    # wrong hash: the bytes arrive but are not what was declared
    f = tmp_path / "sample.jsonl"
    f.write_text('{"text": "hello"}\n')
    up = alice.post("/uploads", {"purpose": "sample", "filename": "s", "sha256": hashlib.sha256(b"other").hexdigest(),
                                 "size": f.stat().st_size})
    alice.put_parts(f, up)
    expect_error(alice, "POST", f"/uploads/{up['upload_id']}/complete", {}, 400, ["does not match", "nothing was kept"])
    assert snapshot(c) == before


def test_revoked_and_expired_tokens_are_refused(small):
    from coordinator.models import ApiToken
    from coordinator.services import users

    alice = small.user("carol")
    me = alice.me()
    tokens = alice.get("/tokens")
    alice.request("DELETE", f"/tokens/{tokens[-1]['id']}")
    expect_error(alice, "GET", "/me", None, 401, ["revoked", "log in again"])
    with small.db() as db:
        u = db.get(type(db.get(ApiToken, tokens[-1]["id"]).user), me["id"])
        t, secret = users.create_token(db, u, "old")
        t.expires_at = datetime.now(UTC) - timedelta(days=1)
    from contributor_client.http import Client

    expect_error(Client(small.url, secret), "GET", "/me", None, 401, ["expired"])
    expect_error(Client(small.url, "elf_not-a-token"), "GET", "/me", None, 401, ["unknown API token"])
    expect_error(small.anonymous(), "POST", "/domains", {"name": "xyz"}, 401, ["log in"])


def test_the_state_filter_takes_every_state_and_names_them_for_a_made_up_one(small):
    from coordinator.models import State

    admin = small.user("admin", "admin")
    for s in State:  # every state of the lifecycle is a filter, abandoned included
        r = admin.http.get("/contributions", params={"state": s.value})
        assert r.status_code == 200, (s, r.text)
    msg = expect_error(admin, "GET", "/contributions?state=lost", None, 422, ["state"])
    assert all(s.value in msg for s in State), msg  # the error lists what is accepted
