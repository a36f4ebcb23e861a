"""Registration is open, so any contributor may be an attacker. Each test tries one hole the
way an attacker would, black-box through the HTTP API of a live coordinator, on the embedded
default (SQLite, local files) and on PostgreSQL + S3, and checks the refusal, its message, and
that nothing was stored, changed or leaked."""

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta

import httpx
import pytest
import torch
from helpers import CORPUS
from live import (
    Coordinator,
    MotoS3,
    add_domain,
    contribute,
    fresh_pg_database,
    holds,
    stored_bytes,
    wait_state,
)

from btm.safetensors_io import save_state_dict
from contributor_client import api, commands
from contributor_client.http import Client, ClientError, sha256_file

QUOTA = 8 * 1024 * 1024
ENV = {"ELMFOREST_UPLOAD_QUOTA_BYTES": str(QUOTA), "ELMFOREST_REGISTRATIONS_PER_HOUR": "3",
       "ELMFOREST_SWEEP_SECONDS": "1", "ELMFOREST_UPLOAD_TTL_HOURS": "0.01"}  # uploads expire after 36 s


@pytest.fixture(scope="module", params=["embedded", "postgres+s3"])
def backend(request):
    with _backend(request.param) as env:
        yield request.param, env


@pytest.fixture(scope="module")
def world(backend, tmp_path_factory, seed_dir, tok, cache_dir):
    """A forest with alice's merged ELM; mallory, an ordinary contributor, attacks it."""
    name, env = backend
    tmp = tmp_path_factory.mktemp(name.replace("+", "-"))
    if True:
        c = Coordinator(tmp / "coord", {**ENV, **env})
        try:
            admin, alice, mallory = c.user("admin", "admin"), c.user("alice"), c.user("mallory")
            admin.create_forest("ww", seed_dir)
            add_domain(alice, "python", CORPUS)
            elm = contribute(c, alice, "ww", "python", tok, cache_dir, tmp)
            admin.post(f"/contributions/{elm['id']}/approve", {"reason": "ok"})
            admin.finish(admin.post("/forests/ww/publish", {"note": "python"}), "publish")
            sample = tmp / "alice-sample.jsonl"
            shutil.copy(CORPUS / "python" / "valid.jsonl", sample)
            alice_sample = alice.upload(sample, "sample")["sha256"]
            add_domain(mallory, "mal", CORPUS, "kjv_bible")
            b = commands.request_branch(mallory, "ww", "mal", method="seed")
            yield {"c": c, "backend": name, "admin": admin, "alice": alice, "mallory": mallory,
                   "elm": elm, "public": commands.download_forest(mallory, "ww", tmp / "public"),
                   "branch": b, "init": commands.download_init(mallory, b, tmp / "init"), "tmp": tmp,
                   "alice_sample": alice_sample, "alice_eval": alice.domain("python")["eval_data_sha256"]}
        finally:
            c.stop()


class _backend:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        if self.name == "embedded":
            return {}
        self.pg = fresh_pg_database()
        url = self.pg.__enter__()
        self.moto = MotoS3()
        return {"ELMFOREST_DATABASE_URL": url, **self.moto.env("attacks")}

    def __exit__(self, *exc):
        if self.name != "embedded":
            self.moto.stop()
            self.pg.__exit__(*exc)


def rows(c: Coordinator, *tables: str) -> dict[str, int]:
    from sqlalchemy import func, select

    from coordinator.models import Base

    with c.db() as db:
        return {t: db.scalar(select(func.count()).select_from(Base.metadata.tables[t])) for t in tables}


def message(r: httpx.Response) -> str:
    return r.json()["error"]["message"]


def declare(w, sha: str, size: int, name: str) -> dict:
    cfg = json.loads((w["init"] / "config.json").read_text())
    from btm.tokenizer import load_tokenizer, tokenizer_sha256

    return w["mallory"].post("/contributions", {"forest": "ww", "branch_init_id": w["branch"]["id"], "name": name,
                                                "sha256": sha, "size": size, "config": cfg,
                                                "tokenizer_sha256": tokenizer_sha256(load_tokenizer(w["init"]))})


# ----------------------------------------------------------------------------- 1. possession


def test_declaring_a_known_hash_attaches_nothing_and_tells_nothing(world):
    w, m, c = world, world["mallory"], world["c"]
    weights = w["public"] / "elms" / "python" / "model.safetensors"  # public, as on the leaderboard
    sha, size = sha256_file(weights), weights.stat().st_size
    before, stored = rows(c, "artifacts", "forest_versions"), stored_bytes(c)

    # no oracle: a stored hash and a random one get the same kind of answer
    known = m.http.post("/uploads", json={"purpose": "weights", "filename": "m", "sha256": sha, "size": size})
    unknown = m.http.post("/uploads", json={"purpose": "weights", "filename": "m",
                                            "sha256": hashlib.sha256(b"x").hexdigest(), "size": size})
    assert known.status_code == unknown.status_code == 201
    assert set(known.json()) == set(unknown.json()) and "exists" not in known.json()
    assert known.json()["status"] == "open" and len(known.json()["parts"]) == len(unknown.json()["parts"])
    for r in (known, unknown):
        m.request("DELETE", f"/uploads/{r.json()['upload_id']}")

    # claiming the merged ELM by its hash: the contribution waits for bytes that never come
    r = declare(w, sha, size, "claim")
    cid = r["contribution"]["id"]
    resp = m.http.post(f"/contributions/{cid}/complete", json={})
    assert resp.status_code == 400 and "have not arrived" in message(resp)
    time.sleep(2)
    assert m.get(f"/contributions/{cid}")["state"] == "uploading"

    # uploading the very bytes: refused, naming what they duplicate, and deleted again
    m.put_parts(weights, m.get(f"/contributions/{cid}/upload"))
    m.complete(f"/contributions/{cid}/complete")
    x = wait_state(m, cid, {"rejected", "evaluated"})
    assert x["state"] == "rejected"
    assert f"the same file as ELM python (contribution {w['elm']['id']}, merged)" in x["history"][-1]["reason"]
    assert rows(c, "artifacts", "forest_versions") == before and stored_bytes(c) == stored

    # others' files are not referable by hash, and the refusal reads the same as for no file at all
    m.request("POST", f"/contributions/{cid}/abandon") if x["state"] != "rejected" else None
    refusals = []
    for theirs in (w["alice_eval"], w["alice_sample"], hashlib.sha256(b"nothing").hexdigest()):
        r1 = m.http.put("/domains/mal/eval-data", json={"sha256": theirs})
        r2 = m.http.post("/branch-inits", json={"forest": "ww", "domain": "mal", "sample_sha256": theirs})
        assert r1.status_code == r2.status_code == 400
        refusals.append((message(r1).replace(theirs, "H"), message(r2).replace(theirs, "H")))
    assert len(set(refusals)) == 1, refusals
    assert "you have no finished" in refusals[0][0]


# ----------------------------------------------------------------------------- 2. bounded bytes


def test_a_part_is_at_most_its_length(world, tmp_path):
    w, m, c = world, world["mallory"], world["c"]
    stored = stored_bytes(c)
    f = tmp_path / "s.jsonl"
    f.write_text('{"text": "0123456"}\n')  # 20 bytes
    up = m.post("/uploads", {"purpose": "sample", "filename": "s.jsonl", "sha256": sha256_file(f), "size": 20})
    url = up["parts"][0]["url"]
    big = os.urandom(3 << 20)
    r = httpx.put(url, content=big)
    if w["backend"] == "embedded":  # refused as it streams: nothing lands
        assert r.status_code == 400 and "exactly 20" in message(r)
        assert stored_bytes(c) == stored
        m.request("DELETE", f"/uploads/{up['upload_id']}")
    else:  # the length is signed into the URL (S3 and MinIO refuse another; the test store does not check),
        assert "content-length" in re.search(r"X-Amz-SignedHeaders=([^&]+)", url).group(1)
        # and completing refuses a part of the wrong size and deletes the whole upload
        resp = m.http.post(f"/uploads/{up['upload_id']}/complete", json={})
        assert resp.status_code == 400 and "it must have exactly 20" in message(resp)
        assert m.http.get(f"/uploads/{up['upload_id']}").status_code == 404
    assert stored_bytes(c) == stored


def test_a_part_list_names_each_part_once(world, tmp_path):
    m, c = world["mallory"], world["c"]
    f = tmp_path / "s.jsonl"
    f.write_text('{"text": "hello world"}\n')
    stored = stored_bytes(c)
    up = m.post("/uploads", {"purpose": "sample", "filename": "s.jsonl", "sha256": sha256_file(f),
                             "size": f.stat().st_size})
    m.put_parts(f, up)
    r = m.http.post(f"/uploads/{up['upload_id']}/complete", json={"parts": [{"part_number": 1}] * 400})
    assert r.status_code == 422 and "each part may be named once" in message(r)
    r = m.http.post(f"/uploads/{up['upload_id']}/complete", json={"parts": [{"part_number": 1}] * 10_001})
    assert r.status_code == 422
    assert stored_bytes(c) == stored + f.stat().st_size  # the one part, once
    done = m.post(f"/uploads/{up['upload_id']}/complete", {"parts": [{"part_number": 1}]})
    assert done["status"] == "complete" and stored_bytes(c) == stored + f.stat().st_size


def test_bytes_in_flight_are_limited_per_user(world, tmp_path):
    m = world["mallory"]
    ids = []
    sha = hashlib.sha256(b"q").hexdigest()
    for _ in range(QUOTA // (3 << 20) + 1):
        r = m.http.post("/uploads", json={"purpose": "weights", "filename": "w", "sha256": sha, "size": 3 << 20})
        if r.status_code != 201:
            break
        ids.append(r.json()["upload_id"])
    assert len(ids) == QUOTA // (3 << 20)
    assert r.status_code == 413 and f"{QUOTA}-byte limit" in message(r) and "abandon" in message(r)
    for i in ids:
        m.request("DELETE", f"/uploads/{i}")
    r = m.http.post("/uploads", json={"purpose": "weights", "filename": "w", "sha256": sha, "size": 3 << 20})
    assert r.status_code == 201
    m.request("DELETE", f"/uploads/{r.json()['upload_id']}")


def test_unfinished_uploads_expire_and_their_bytes_go(world, tmp_path):
    w, m, c = world, world["mallory"], world["c"]
    stored = stored_bytes(c)
    data = os.urandom(6 << 20)
    f = tmp_path / "w.bin"
    f.write_bytes(data)
    up = m.post("/uploads", {"purpose": "weights", "filename": "w", "sha256": sha256_file(f), "size": len(data)})
    m.put_parts(f, up)  # every part, never completed
    # a contribution left uploading expires with it, and is abandoned
    cid = declare(w, hashlib.sha256(b"never").hexdigest(), 1 << 20, "never")["contribution"]["id"]
    assert stored_bytes(c) >= stored + len(data)
    deadline = time.monotonic() + 120
    while stored_bytes(c) != stored and time.monotonic() < deadline:  # the sweeper, not a request, deletes
        time.sleep(1)
    assert stored_bytes(c) == stored
    assert m.http.get(f"/uploads/{up['upload_id']}").status_code == 404
    assert wait_state(m, cid, {"abandoned"}, timeout=120)["history"][-1]["reason"].startswith("its upload was not")
    assert stored_bytes(c) == stored


def test_an_owner_abandons_and_the_bytes_go(world, tmp_path):
    w, m, c = world, world["mallory"], world["c"]
    stored = stored_bytes(c)
    state = {"w": torch.randn(300_000)}
    save_state_dict(state, tmp_path / "junk")
    f = tmp_path / "junk" / "model.safetensors"
    r = declare(w, sha256_file(f), f.stat().st_size, "gone")
    m.put_parts(f, r["upload"])
    assert stored_bytes(c) > stored
    x = m.post(f"/contributions/{r['contribution']['id']}/abandon", {"reason": "changed my mind"})
    assert x["state"] == "abandoned" and stored_bytes(c) == stored and not holds(c, f)
    other = w["alice"].http.post(f"/contributions/{w['elm']['id']}/abandon", json={})
    assert other.status_code == 409  # merged: only a maintainer can remove it


@pytest.mark.parametrize("content, words", [
    (b"\x80\x04\x95" + os.urandom(200), "not UTF-8 text"),
    (b'{"text": "fine"}\n[1, 2, 3]\n', ":2: expected a JSON object"),
    (b"plain text\x00with a NUL", "NUL byte"),
])
def test_evaluation_data_is_checked_for_kind(world, tmp_path, content, words):
    m, c = world["mallory"], world["c"]
    stored = stored_bytes(c)
    f = tmp_path / "eval.jsonl"
    f.write_bytes(content)
    up = m.post("/uploads", {"purpose": "eval-data", "filename": "eval.jsonl", "sha256": sha256_file(f),
                             "size": f.stat().st_size})
    m.put_parts(f, up)
    r = m.http.post(f"/uploads/{up['upload_id']}/complete", json={})
    assert r.status_code == 422 and words in message(r) and "nothing was kept" in message(r)
    assert stored_bytes(c) == stored and not holds(c, f)
    r = m.http.put("/domains/mal/eval-data", json={"sha256": sha256_file(f)})
    assert r.status_code == 400


# ----------------------------------------------------------------------------- 3. rejected means gone


def test_a_rejected_file_is_gone_for_every_use(world, tmp_path):
    w, m, c = world, world["mallory"], world["c"]
    stored = stored_bytes(c)
    p = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(1000)}, p)
    r = declare(w, sha256_file(p), p.stat().st_size, "pickled")
    m.put_parts(p, r["upload"])
    m.complete(f"/contributions/{r['contribution']['id']}/complete")
    x = wait_state(m, r["contribution"]["id"], {"rejected"})
    assert "pickle" in x["history"][-1]["reason"]
    assert stored_bytes(c) == stored and not holds(c, p)
    assert m.http.get(f"/contributions/{x['id']}/download").status_code == 404
    for attempt in (m.http.put("/domains/mal/eval-data", json={"sha256": sha256_file(p)}),
                    m.http.post("/branch-inits", json={"forest": "ww", "domain": "mal", "sample_sha256": sha256_file(p)})):
        assert attempt.status_code == 400 and "you have no finished" in message(attempt)


# ----------------------------------------------------------------------------- 4. tokens


def test_a_token_mints_only_what_it_holds(world):
    w, c = world, world["c"]
    read = w["mallory"].post("/tokens", {"name": "ro", "scopes": ["read"]})
    ro = Client(c.url, read["token"])
    r = ro.http.post("/tokens", json={"name": "wider", "scopes": ["read", "contribute"]})
    assert r.status_code == 403 and "holds only ['read']" in message(r)
    assert ro.post("/tokens", {"name": "same"})["info"]["scopes"] == ["read"]  # default: no wider than itself
    assert ro.http.post("/uploads", json={"purpose": "sample", "filename": "x", "sha256": "a" * 64,
                                          "size": 10}).status_code == 403
    mine = w["mallory"].get("/tokens")
    assert {"ro", "same"} <= {t["name"] for t in mine} and all("token" not in t for t in mine)
    assert w["mallory"].http.get("/tokens", params={"username": "alice"}).status_code == 403
    theirs = w["admin"].get("/tokens", username="mallory")
    assert [t["id"] for t in theirs] == [t["id"] for t in mine]
    ro_id = read["info"]["id"]
    assert w["admin"].request("DELETE", f"/tokens/{ro_id}")["revoked_at"]
    assert ro.http.get("/me").status_code == 401


# ----------------------------------------------------------------------------- 5. limits


def test_request_bodies_are_capped(world):
    m = world["mallory"]
    body = json.dumps({"name": "big", "description": "x" * (2 << 20)}).encode()
    r = m.http.post("/domains", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "1048576-byte limit" in message(r)

    def chunks():  # no content-length: counted as it streams
        for _ in range(40):
            yield b" " * 65536

    r = m.http.post("/domains", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_registration_is_bounded_and_rate_limited(world):
    anon = world["c"].anonymous()
    assert anon.http.post("/auth/register", json={"username": "u" * 65, "password": "longenough"}).status_code == 422
    assert anon.http.post("/auth/register", json={"username": "ok1", "password": "longenough",
                                                  "email": "not an email"}).status_code == 422
    codes = [anon.http.post("/auth/register", json={"username": f"bot{i}", "password": "longenough"})
             for i in range(4)]
    assert [r.status_code for r in codes] == [201, 201, 201, 429]
    assert "at most 3 per hour" in message(codes[-1]) and int(codes[-1].headers["retry-after"]) > 0


def test_jobs_are_readable_by_their_owner_and_maintainers(world):
    w = world
    job = w["alice"].get("/jobs")[0]
    assert w["mallory"].http.get(f"/jobs/{job['id']}").status_code == 404
    assert w["admin"].get(f"/jobs/{job['id']}")["id"] == job["id"]
    assert all(j["id"] != job["id"] for j in w["mallory"].get("/jobs"))


def test_errors_never_show_server_paths(world, tmp_path):
    w, c = world, world["c"]
    seen = []
    for x in w["mallory"].get("/contributions", mine=True):
        seen.append(json.dumps(w["mallory"].get(f"/contributions/{x['id']}")))
    # a maintainer registering files that are no model: the loader's error names a server file
    admin = w["admin"]
    files = {}
    for name, data in (("config.json", b'{"model_type": "gpt2", "n_layer": "many"}'), ("tokenizer.json", b"{}")):
        p = tmp_path / name
        p.write_bytes(data)
        files[name] = admin.upload(p, "model-file")["sha256"]
    save_state_dict({"w": torch.zeros(4)}, tmp_path / "m")
    files["model.safetensors"] = admin.upload(tmp_path / "m" / "model.safetensors", "weights")["sha256"]
    r = admin.http.post("/forests", json={"name": "broken", "files": files})
    assert r.status_code == 422
    seen.append(r.text)
    for text in seen:
        assert str(c.data_dir) not in text and "/tmp/" not in text, text


def test_timestamps_carry_their_offset_and_405_says_what_is_allowed(world):
    m = world["mallory"]
    for stamp in (m.me()["created_at"], m.get("/tokens")[0]["created_at"], m.get("/jobs")[0]["created_at"]):
        assert re.search(r"(\+00:00|Z)$", stamp), stamp
    for method, path, allowed in (("PUT", "/tokens", {"GET", "POST"}),
                                  ("DELETE", "/forests/ww", {"GET"}),
                                  ("PATCH", "/uploads", {"POST"}),
                                  ("PUT", "/domains/mal", {"GET", "PATCH"}),
                                  ("GET", "/contributions/1/complete", {"POST"})):
        r = m.http.request(method, path)
        assert r.status_code == 405
        assert set(r.headers["allow"].split(", ")) == allowed, (path, r.headers["allow"])


def test_the_embedded_data_is_private(world):
    if world["backend"] != "embedded":
        pytest.skip("a file-system check of the embedded default")
    c = world["c"]
    assert (c.data_dir.stat().st_mode & 0o777) == 0o700
    assert ((c.data_dir / "coordinator.db").stat().st_mode & 0o777) == 0o600
    for f in c.data_dir.rglob("*"):
        assert not (f.stat().st_mode & 0o077), f"{f} is readable by others"


# ----------------------------------------------------------------------------- 6. crash-safe completion

PART = 5 << 20  # S3's smallest part: a file of a few parts stays small
# Every point of complete where a crash leaves a state of its own (crash_point in the
# coordinator), on each backend, in the order complete reaches them: weights kept for
# validation, and a file that becomes a blob at once (here a sample of one part).
HOLD_POINTS = {
    "embedded": ["complete:begin", "complete:assembling", "complete:replaced", "complete:assembled",
                 "complete:hashed", "complete:recorded"],
    "postgres+s3": ["complete:begin", "complete:assembled", "complete:hashed", "complete:recorded"],
}
KEEP_POINTS = {
    "embedded": ["complete:replaced", "complete:verified", "complete:promoted"],
    "postgres+s3": ["complete:verified", "move:copied", "complete:promoted"],
}


def _cases(points: dict[str, list[str]]) -> list:
    return [pytest.param(b, p, id=f"{b}-{p.replace(':', '-')}") for b, ps in points.items() for p in ps]


@pytest.fixture(scope="module")
def crashy_sites(tmp_path_factory, seed_dir):
    """sites(backend): a coordinator of its own on that backend, started when first asked
    for and kept for every crash test of the module (restarting is what costs)."""
    with contextlib.ExitStack() as stack:
        sites: dict[str, dict] = {}

        def site(name: str) -> dict:
            if name not in sites:
                sites[name] = stack.enter_context(_crashy(name, tmp_path_factory.mktemp("crashy"), seed_dir))
            return sites[name]

        yield site


@contextlib.contextmanager
def _crashy(name: str, tmp, seed_dir):
    """A coordinator (parts of 5 MiB; crash points armed by writing a point's name to the
    file `arm`) with a forest and a branch init."""
    arm = tmp / "crash-at"
    arm.write_text("")
    env = {"ELMFOREST_PART_SIZE": str(PART), "ELMFOREST_CRASH_AT": f"@{arm}", "ELMFOREST_SWEEP_SECONDS": "1"}
    with _backend(name) as store:  # a database and a store of its own
        c = Coordinator(tmp / "coord", {**env, **store})
        try:
            admin, carol = c.user("admin", "admin"), c.user("carol")
            admin.create_forest("cc", seed_dir)
            add_domain(carol, "bible", CORPUS, "kjv_bible")
            b = commands.request_branch(carol, "cc", "bible", method="seed")
            yield {"c": c, "backend": name, "carol": carol, "arm": arm,
                   "init": commands.download_init(carol, b, tmp / "init")}
        finally:
            c.stop()


class _OneTry(api.Coordinator):
    """A client that sends a complete once: the test, not the client, waits for the server."""

    def complete(self, path: str, attempts: int = 1):
        return super().complete(path, 1)


def _crash(w, point: str, run) -> str:
    """Arm `point` and run `run` (a client's call that the crash interrupts): the server must
    kill itself there. Then start it again, unarmed; returns what the client said."""
    c = w["c"]
    w["arm"].write_text(point)
    try:
        try:
            run()
        except ClientError as e:
            said = str(e)
        else:
            raise AssertionError(f"the coordinator never reached {point}")
        assert c.server.wait(30) == -signal.SIGKILL, f"the coordinator did not die at {point}"
    finally:
        w["arm"].write_text("")
        c.kill()  # the rest of its process group
        c.start()
    return said


def _leftovers(c) -> list:
    """Temporary files: an assembly's, a copy's, and local copies of files being checked."""
    scratch = c.data_dir / "work" / "uploads"
    return [f for f in c.data_dir.rglob("*")
            if f.name.endswith((".assembling", ".tmp", ".lock")) or f.parent == scratch]


@pytest.mark.parametrize("store, point", _cases(HOLD_POINTS))
def test_a_crash_inside_complete_is_finished_by_a_retry(crashy_sites, store, point, tmp_path):
    """The coordinator is killed (SIGKILL) at a step of completing a contribution's upload;
    started again, the contributor runs `elmforest submit` again and it finishes the same
    contribution without sending a part again, with no traceback and no orphaned bytes."""
    w = crashy_sites(store)
    c = w["c"]
    stored = stored_bytes(c)
    elm = tmp_path / "elm"
    shutil.copytree(w["init"], elm)
    (elm / "model.safetensors").unlink()
    save_state_dict({"big": torch.randn((2 * PART + PART // 2) // 4)}, elm)  # 3 parts, and no ELM: validation refuses it
    said = _crash(w, point, lambda: commands.submit(_OneTry(c.url, w["carol"].token), elm))
    assert "run the same command again" in said, said
    cid = json.loads((elm / ".elmforest-submit.json").read_text())["contribution_id"]
    env = {**os.environ, "ELMFOREST_URL": c.url, "ELMFOREST_TOKEN": w["carol"].token, "XDG_CONFIG_HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "elmforest_cli", "submit", str(elm)], env=env, capture_output=True,
                       text=True, timeout=300)
    err = p.stderr + p.stdout
    assert p.returncode == 0 and "Traceback" not in err, err
    assert f"resuming the upload of contribution {cid} (3 parts already sent)" in err, err
    assert int(re.search(r"contribution (\d+) \(", err).group(1)) == cid, err
    x = wait_state(w["carol"], cid, {"rejected"})
    assert "tensor names differ" in x["history"][-1]["reason"]
    assert stored_bytes(c) == stored, "orphaned bytes after the crash"
    assert not _leftovers(c)


@pytest.mark.parametrize("store, point", _cases(KEEP_POINTS))
def test_a_crash_inside_completing_a_file_is_finished_by_a_retry(crashy_sites, store, point, tmp_path):
    """The same for a file that becomes a content-addressed blob at once: the resumed upload
    finishes, its blob recorded as an artifact, nothing left under the upload's own key."""
    w = crashy_sites(store)
    c = w["c"]
    stored = stored_bytes(c)
    sample, state = _sample(tmp_path, point), tmp_path / "upload.json"
    said = _crash(w, point, lambda: _OneTry(c.url, w["carol"].token).upload(sample, "sample", state_file=state))
    assert "run the same command again" in said, said
    upload_id = json.loads(state.read_text())["upload_id"]
    done = w["carol"].upload(sample, "sample", state_file=state)
    assert (done["upload_id"], done["status"], done["sha256"]) == (upload_id, "complete", sha256_file(sample))
    _check_kept(c, done, stored)


def _sample(tmp_path, point: str):
    sample = tmp_path / "sample.jsonl"
    text = (CORPUS / "kjv_bible" / "valid.jsonl").read_text()
    sample.write_text(text + json.dumps({"text": f"A line of its own, for {point} at {time.time()}."}) + "\n")
    return sample


def _check_kept(c, done: dict, stored: int) -> None:
    from coordinator.models import Artifact

    assert stored_bytes(c) == stored + done["size"], "bytes left under the upload's own key"
    with c.db() as db:
        assert db.get(Artifact, done["sha256"]).size == done["size"]
    assert not _leftovers(c)


@pytest.mark.parametrize("store", ["embedded", "postgres+s3"])
def test_the_sweeper_finishes_a_checked_file_that_a_crash_cut_short(crashy_sites, store, tmp_path):
    """Killed after the file became its blob but before its artifact was recorded, with no
    retry from its owner: the sweeper finishes the job (a blob is never left unrecorded)."""
    from coordinator.models import Upload

    w = crashy_sites(store)
    c = w["c"]
    stored = stored_bytes(c)
    sample, state = _sample(tmp_path, "the sweeper"), tmp_path / "upload.json"
    _crash(w, "complete:promoted", lambda: _OneTry(c.url, w["carol"].token).upload(sample, "sample", state_file=state))
    upload_id = json.loads(state.read_text())["upload_id"]
    with c.db() as db:  # as if it had waited long enough: a complete still running is not the sweeper's
        up = db.get(Upload, upload_id)
        assert up.status == "verified"
        up.completed_at -= timedelta(hours=1)
    end, status = time.monotonic() + 30, "verified"
    while status != "complete" and time.monotonic() < end:
        time.sleep(0.3)
        with c.db() as db:
            status = db.get(Upload, upload_id).status
    assert status == "complete", "the sweeper left it"
    _check_kept(c, {"sha256": sha256_file(sample), "size": sample.stat().st_size}, stored)


def test_the_client_checks_what_it_downloads(world, tmp_path):
    m = world["mallory"]
    d = m.get(f"/contributions/{world['elm']['id']}/download")
    assert d["files"]["model.safetensors"] == world["elm"]["weights_sha256"]
    with pytest.raises(ClientError, match="sha256 mismatch"):
        m.download(d["urls"]["config.json"], tmp_path / "config.json", "0" * 64)
    assert not (tmp_path / "config.json").exists()


def test_registration_can_be_invite_only_or_closed(tmp_path_factory):
    c = Coordinator(tmp_path_factory.mktemp("invite"), {"ELMFOREST_REGISTRATION": "invite"})
    try:
        anon = c.anonymous()
        r = anon.http.post("/auth/register", json={"username": "dana", "password": "longenough"})
        assert r.status_code == 403 and "invitation" in message(r)
        maint = c.user("maint", "maintainer")
        assert c.user("eve").http.post("/invites", json={}).status_code == 403
        code = maint.post("/invites", {"note": "for dana"})["code"]
        bad = anon.http.post("/auth/register", json={"username": "dana", "password": "longenough", "invite": "inv_x"})
        assert bad.status_code == 403
        ok = anon.http.post("/auth/register", json={"username": "dana", "password": "longenough", "invite": code})
        assert ok.status_code == 201 and ok.json()["user"]["role"] == "contributor"
        again = anon.http.post("/auth/register", json={"username": "dan2", "password": "longenough", "invite": code})
        assert again.status_code == 403 and "used" in message(again)
    finally:
        c.stop()
    c = Coordinator(tmp_path_factory.mktemp("closed"), {"ELMFOREST_REGISTRATION": "closed"})
    try:
        r = c.anonymous().http.post("/auth/register", json={"username": "dana", "password": "longenough"})
        assert r.status_code == 403 and "closed" in message(r)
    finally:
        c.stop()


def test_wrong_passwords_are_limited_per_address(world):
    anon = world["c"].anonymous()
    codes = [anon.http.post("/auth/login", json={"username": "mallory", "password": f"guess-{i}"}).status_code
             for i in range(31)]
    assert codes[:30] == [401] * 30 and codes[30] == 429
    # the right password too, for a while: guessing is not worth it
    assert anon.http.post("/auth/login", json={"username": "mallory", "password": "password123"}).status_code == 429
