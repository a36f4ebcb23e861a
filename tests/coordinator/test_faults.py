"""Faults an operator meets: the process running a job is killed (SIGKILL) in the middle of
it, a job fails, a process is told to stop. Every job finishes exactly once, every state has
a way out, and a stop leaves no process behind. On the embedded default (the job runs in the
worker process `elmforest serve` starts, and starts again when it dies) and with a real
Celery worker on Redis."""

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import psutil
import pytest
from helpers import CORPUS
from live import Coordinator, Stutter, add_domain, contribute, redis_available, wait_state
from sqlalchemy import func, select

from contributor_client import commands
from contributor_client.http import Client, ClientError
from coordinator.models import (
    AveragedModel,
    BranchInit,
    ContributionEvent,
    Evaluation,
    ForestVersion,
    Job,
)

FAST = {"ELMFOREST_JOB_LEASE_SECONDS": "4", "ELMFOREST_SWEEP_SECONDS": "1"}


@pytest.fixture(scope="module", params=["embedded", "celery"])
def site(request, tmp_path_factory, seed_dir, tok, cache_dir):
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "celery":
        if not redis_available():
            pytest.skip("Redis is not running on 127.0.0.1:6379")
        env = {**FAST, "ELMFOREST_BROKER_URL": "redis://127.0.0.1:6379/0",
               "ELMFOREST_QUEUE": f"elmforest-faults-{uuid.uuid4().hex[:8]}", "ELMFOREST_VISIBILITY_TIMEOUT": "5"}
        c = Coordinator(tmp / "coord", env, worker=False)
        c.worker = c.spawn(["worker", "--loglevel", "WARNING"])
    else:
        c = Coordinator(tmp / "coord", FAST)
        c.worker = None
    c.killed = set()
    try:
        admin, alice, bob = c.user("admin", "admin"), c.user("alice"), c.user("bob")
        admin.create_forest("kf", seed_dir)
        add_domain(alice, "python", CORPUS)
        add_domain(bob, "kjv_bible", CORPUS)
        add_domain(admin, "go", CORPUS, role="eval")
        elm = contribute(c, alice, "kf", "python", tok, cache_dir, tmp)
        admin.post(f"/contributions/{elm['id']}/approve", {"reason": "ok"})
        admin.finish(admin.post("/forests/kf/publish", {"note": "python"}), "publish")
        yield {"c": c, "kind": request.param, "admin": admin, "alice": alice, "bob": bob, "tmp": tmp}
    finally:
        c.stop()


def embedded_worker(c, timeout: float = 60) -> int:
    """The pid of the job worker `elmforest serve` runs as its child, once it runs (a new one
    after one was killed: the server starts it again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.NoSuchProcess):
            kids = [p for p in psutil.Process(c.server.pid).children()
                    if "coordinator.jobs" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE
                    and p.pid not in c.killed]
            if kids:
                return kids[0].pid
        time.sleep(0.05)
    raise AssertionError("the server runs no job worker")


def runner(site) -> int:
    """The pid of the process that runs jobs (the leader of its own process group): the
    worker `elmforest serve` started (embedded) or the Celery worker."""
    c = site["c"]
    return c.worker.pid if site["kind"] == "celery" else embedded_worker(c)


def start_runner(site, wait: bool = True) -> None:
    """A runner again: a new Celery worker; on the embedded default the server starts its own."""
    c = site["c"]
    if site["kind"] == "celery":
        c.worker = c.spawn(["worker", "--loglevel", "WARNING"])
    elif wait:
        embedded_worker(c)


def kill_mid_job(site, kind: str, timeout: float = 120, restart: bool = True, duty: float = 0.1) -> int:
    """Slow the job runner down (running `duty` of the time), wait until it runs a job of
    `kind`, SIGKILL the runner (and all it started), start it again unless told not to.
    Returns the job's id."""
    c = site["c"]
    pid = runner(site)
    slow = Stutter(pid, duty=duty)
    try:
        deadline = time.monotonic() + timeout
        job = None
        while time.monotonic() < deadline and job is None:
            with c.db() as db:  # running in this very process (not a dead one's leftover)
                job = db.scalar(select(Job).where(Job.kind == kind, Job.status == "running",
                                                  Job.runner.like(f"%:{pid}:%")).order_by(Job.id.desc()))
                jid = job.id if job else None
            time.sleep(0.01)
        assert job is not None, f"no {kind} job ever ran"
        c.killed.add(pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if site["kind"] == "celery":
            c.worker.wait(10)
    finally:
        slow.stop()
    with c.db() as db:  # killed mid-job: nothing recorded (a sweeper may already have queued it again)
        assert db.get(Job, jid).status.value in ("running", "queued")
    if restart:
        start_runner(site)
    return jid


def finished(site, jid: int, timeout: float = 180) -> Job:
    c = site["c"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with c.db() as db:
            j = db.get(Job, jid)
            if j.status.value in ("succeeded", "failed"):
                db.expunge(j)
                return j
        time.sleep(0.2)
    raise AssertionError(f"job {jid} never finished")


def events(site, cid: int) -> list[str]:
    with site["c"].db() as db:
        return list(db.scalars(select(ContributionEvent.to_state).where(ContributionEvent.contribution_id == cid)
                               .order_by(ContributionEvent.id)))


def test_every_job_kind_killed_mid_job_finishes_once(site, tok, cache_dir):
    c, admin, bob, tmp = site["c"], site["admin"], site["bob"], site["tmp"]

    # branch init: posterior over the forest, then the average
    b = bob.post("/branch-inits", {"forest": "kf", "domain": "kjv_bible", "method": "posterior",
                                   "sample_sha256": bob.upload(CORPUS / "kjv_bible" / "valid.jsonl", "sample")["sha256"]})
    jid = kill_mid_job(site, "branch_init")
    j = finished(site, jid)
    assert j.status.value == "succeeded" and j.attempts >= 2
    b = bob.get(f"/branch-inits/{b['id']}")
    assert b["status"] == "ready" and b["parents"][0]["name"] == "python"

    # validate, then evaluate, each killed once
    from live import train_elm

    init = commands.download_init(bob, b, tmp / "init-kjv")
    elm = train_elm(init, tmp / "elm-kjv", tok, "kjv_bible", cache_dir, steps=12)
    cid = commands.submit(bob, elm)["id"]
    jv = kill_mid_job(site, "validate")
    assert finished(site, jv).status.value == "succeeded"
    je = kill_mid_job(site, "evaluate")
    assert finished(site, je).status.value == "succeeded"
    x = wait_state(bob, cid, {"evaluated", "rejected"})
    assert x["state"] == "evaluated", x["history"]
    ev = events(site, cid)
    assert ev.count("validated") == 1 and ev.count("evaluated") == 1, ev
    with c.db() as db:
        rows = db.scalar(select(func.count()).select_from(Evaluation).where(Evaluation.contribution_id == cid))
        assert rows == 3  # the ELM, its init, the forest's ensemble: each once

    # publish, then the version's evaluation
    admin.post(f"/contributions/{cid}/approve", {"reason": "ok"})
    with c.db() as db:
        versions = db.scalar(select(func.count()).select_from(ForestVersion))
    pj = admin.post("/forests/kf/publish", {"note": "kjv"})
    kill_mid_job(site, "publish")
    assert finished(site, pj["id"]).status.value == "succeeded"
    with c.db() as db:
        assert db.scalar(select(func.count()).select_from(ForestVersion)) == versions + 1
    assert admin.forest("kf")["current_version"] == 3 and events(site, cid).count("merged") == 1
    jv = kill_mid_job(site, "evaluate_version")
    assert finished(site, jv).status.value == "succeeded"
    lb = admin.get("/forests/kf/leaderboard")
    assert {"python", "kjv_bible", "ensemble"} <= {r["subject"] for r in lb["rows"]}

    # an averaged model for a target domain
    a = admin.post("/forests/kf/averages", {"method": "posterior", "domain": "go"})
    ja = kill_mid_job(site, "average")
    assert finished(site, ja).status.value == "succeeded"
    with c.db() as db:
        avg = db.get(AveragedModel, a["id"])
        assert avg.status.value == "ready" and avg.files
        assert db.scalar(select(func.count()).select_from(BranchInit).where(BranchInit.status == "requested")) == 0


def test_a_job_whose_runner_keeps_dying_fails_with_a_reason_and_can_be_retried(site):
    """Out of memory looks like this: the runner dies every time. After job_retries deaths
    the job fails, saying so, instead of killing runners for ever; a maintainer retries it."""
    admin = site["admin"]
    a = admin.post("/forests/kf/averages", {"method": "uniform"})
    for death in range(3):  # ELMFOREST_JOB_RETRIES (3)
        # A restarted runner takes the job up again at once, maybe before it answers
        # /healthz: it is slowed down from its first instruction so the job is caught.
        kill_mid_job(site, "average", restart=False, duty=0.1 if death == 0 else 0.5)
        start_runner(site, wait=death == 2)
    j = finished(site, a["job_id"])
    assert j.status.value == "failed" and "its runner died 3 times" in j.error
    avg = admin.get(f"/forests/kf/averages/{a['id']}")
    assert avg["status"] == "failed" and "died" in avg["error"]
    assert any(f["id"] == j.id for f in admin.get("/jobs", status="failed"))
    r = admin.post(f"/jobs/{j.id}/retry")
    assert r["status"] == "queued"
    assert finished(site, j.id).status.value == "succeeded"
    assert admin.get(f"/forests/kf/averages/{a['id']}")["status"] == "ready"


def test_a_failed_evaluation_is_a_state_with_ways_out(site, tok, cache_dir, tmp_path):
    """An exception in a job (here: held-out data too short to evaluate on) fails the job with
    a reason the owner reads; the contribution does not wait for ever: the client stops
    following it and says what can be done; a maintainer retries once the data is fixed."""
    if site["kind"] != "embedded":
        pytest.skip("one backend is enough for the logic; the kill tests cover both")
    c, admin = site["c"], site["admin"]
    dave = c.user("dave")
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "tiny"}\n')
    dave.create_domain("tiny")
    dave.set_eval_data("tiny", short)
    b = commands.request_branch(dave, "kf", "tiny", method="seed")
    from live import train_elm

    elm = train_elm(commands.download_init(dave, b, tmp_path / "init"), tmp_path / "elm", tok, "python", cache_dir)
    cid = commands.submit(dave, elm)["id"]
    x = commands.follow(dave, cid)
    assert x["state"] == "validated" and x["job"]["status"] == "failed"
    assert "too little held-out text" in x["job"]["error"]
    assert "job failed" in x["history"][-1]["reason"] and "retry" in x["history"][-1]["reason"]
    # the owner sees it, the maintainer fixes the data and retries
    dave.set_eval_data("tiny", CORPUS / "python" / "test.jsonl")
    admin.post(f"/jobs/{x['job']['id']}/retry")
    assert wait_state(dave, cid, {"evaluated", "rejected"})["state"] in ("evaluated", "rejected")
    # and an owner can always walk away before the merge
    other = commands.submit(dave, elm, name="tiny2")
    assert dave.post(f"/contributions/{other['id']}/abandon")["state"] == "abandoned"


def tree(pid: int) -> list[int]:
    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pids: list[int]) -> list[int]:
    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigterm_stops_serve_and_worker_and_hands_back_the_job(site):
    """SIGTERM to the process running a job: it stops within 10 s, leaves no process, and the
    job it was running is handed back and finished after a restart."""
    c, admin = site["c"], site["admin"]
    a = admin.post("/forests/kf/averages", {"method": "uniform", "domain": None}, version=2)
    told = c.worker if site["kind"] == "celery" else c.server  # embedded: the server stops its worker
    slow = Stutter(runner(site), duty=0.2)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with c.db() as db:
                if db.get(Job, a["job_id"]).status.value == "running":
                    break
            time.sleep(0.01)
        pids = tree(told.pid)
        os.kill(told.pid, signal.SIGTERM)
    finally:
        slow.stop()
    deadline = time.monotonic() + 10
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pids), f"still running 10 s after SIGTERM: {alive(pids)}"
    with c.db() as db:
        j = db.get(Job, a["job_id"])
        assert j.status.value in ("queued", "succeeded"), j.status  # handed back, or it had just finished
    if site["kind"] == "celery":
        c.worker = c.spawn(["worker", "--loglevel", "WARNING"])
    else:
        c.start()
    assert finished(site, a["job_id"]).status.value == "succeeded"


def test_sigterm_stops_the_demo_and_its_coordinator(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "elmforest_cli", "demo", "--dir", str(tmp_path / "demo"),
                          "--port", str(_port()), "--seed-steps", "10", "--elm-steps", "400", "--no-serve"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until it has started its coordinator
        if len(tree(p.pid)) > 1 and (tmp_path / "demo" / "coordinator").exists():
            break
        time.sleep(0.2)
    time.sleep(2)
    pids = tree(p.pid)
    assert len(pids) > 1, "the demo started no coordinator"
    p.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(15)
    deadline = time.monotonic() + 10
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive(pids)
    for q in left:
        os.kill(q, signal.SIGKILL)
    assert not left, "processes left after SIGTERM to the demo"
    assert "Traceback" not in p.stderr.read()


def _port() -> int:
    from live import free_port

    return free_port()


def test_overload_is_answered_with_retry_after_and_the_client_waits(tmp_path_factory):
    c = Coordinator(tmp_path_factory.mktemp("busy"), {"ELMFOREST_MAX_CONCURRENT_REQUESTS": "1",
                                                      "ELMFOREST_OVERLOAD_WAIT_SECONDS": "0.2"})
    try:
        import threading

        import httpx

        def slow_body():  # a request that holds the only place for 3 s while its body trickles in
            yield b'{"name": '
            time.sleep(3)
            yield b'"slowpoke"}'

        hold = threading.Thread(target=lambda: httpx.post(c.url + "/api/v1/domains", content=slow_body(),
                                                          headers={"content-type": "application/json"}, timeout=30))
        hold.start()
        time.sleep(0.5)
        r = httpx.get(c.url + "/api/v1/domains", timeout=30)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert "try again" in r.json()["error"]["message"]
        assert httpx.get(c.url + "/healthz").status_code == 200  # answered outside the queue
        # the client honours Retry-After: it waits, then succeeds...
        t = time.monotonic()
        assert isinstance(Client(c.url).get("/domains"), list)
        assert time.monotonic() - t >= 1.0
        hold.join()
        # ...and one that may not wait says so clearly
        hold = threading.Thread(target=lambda: httpx.post(c.url + "/api/v1/domains", content=slow_body(),
                                                          headers={"content-type": "application/json"}, timeout=30))
        hold.start()
        time.sleep(0.5)
        impatient = Client(c.url)
        impatient.BUSY_RETRIES = 0
        with pytest.raises(ClientError, match="busy.*try again later"):
            impatient.get("/domains")
        hold.join()
    finally:
        c.stop()


def test_the_embedded_worker_is_a_child_process_started_again_when_it_dies(tmp_path_factory):
    """`elmforest serve` on the embedded default answers requests in one process and runs jobs
    in another, its child (the code of `elmforest worker`): killed, the child is started again;
    the server's SIGTERM stops it too; `--no-worker` starts none."""
    c = Coordinator(tmp_path_factory.mktemp("child"), FAST)
    c.killed = set()
    try:
        first = embedded_worker(c)
        assert first != c.server.pid and os.getpgid(first) == first  # its own process group
        assert "--quiet" in psutil.Process(first).cmdline()
        os.kill(first, signal.SIGKILL)
        c.killed.add(first)
        second = embedded_worker(c, timeout=30)
        assert second != first and psutil.Process(second).ppid() == c.server.pid
        assert httpx.get(c.url + "/healthz").status_code == 200  # the server never stopped
        pids = tree(c.server.pid)
        os.kill(c.server.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pids), f"still running 10 s after SIGTERM: {alive(pids)}"
        # and a SIGKILLed server's worker follows it
        c.start()
        orphan = embedded_worker(c)
        os.kill(c.server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive([orphan]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive([orphan]), "the worker outlived its server"
    finally:
        c.stop()
    bare = Coordinator(tmp_path_factory.mktemp("no-worker"), FAST, worker=False)
    try:
        time.sleep(3)
        assert psutil.Process(bare.server.pid).children(recursive=True) == []
    finally:
        bare.stop()
