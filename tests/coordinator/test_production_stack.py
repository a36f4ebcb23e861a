"""The production stack as separate native processes (what docker-compose.yml runs):
PostgreSQL, Redis as the broker, moto's S3 server for the bucket, the API under uvicorn, a
Celery worker process and a Flower SuperLink. One contribution goes from branch to published
version; a worker killed with SIGKILL mid-validation validates once; and a restore drill:
dump the database and copy the bucket, wipe both, restore, download the same forest."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from helpers import CORPUS
from live import (
    Coordinator,
    MotoS3,
    add_domain,
    free_port,
    redis_available,
    run_contribution_flow,
    wait_state,
)

from btm.safetensors_io import iter_tensors, open_weights, save_state_dict
from contributor_client.http import sha256_file


@pytest.fixture(scope="module")
def moto():
    m = MotoS3()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pg_database, moto):
    if not redis_available():
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    env = {
        **moto.env("stack"),
        "ELMFOREST_DATABASE_URL": pg_database,
        "ELMFOREST_BROKER_URL": "redis://127.0.0.1:6379/0",
        "ELMFOREST_QUEUE": f"elmforest-test-{uuid.uuid4().hex[:8]}",
        "ELMFOREST_JOB_LEASE_SECONDS": "4",
        "ELMFOREST_VISIBILITY_TIMEOUT": "5",
    }
    c = Coordinator(tmp_path_factory.mktemp("stack"), env, worker=False)
    c.worker = c.spawn(["worker", "--loglevel", "WARNING"])
    port = free_port()
    bin_dir = Path(sys.executable).parent  # the SuperLink starts `flower-superexec` from PATH
    c.superlink = subprocess.Popen(
        [str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
         "--database", str(c.data_dir / "superlink.db")],
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=c.log, stderr=subprocess.STDOUT, start_new_session=True)
    c.procs.append(c.superlink)
    c.fleet_port = port
    yield c
    c.stop()


def test_contribution_flow_with_redis_and_a_worker_process(stack, seed_dir, tok, cache_dir, tmp_path):
    wait_port(stack.fleet_port)  # the SuperLink runs beside the rest of the stack
    assert stack.superlink.poll() is None
    r = run_contribution_flow(stack, seed_dir, tok, cache_dir, tmp_path, forest="prod")
    admin = r["admin"]
    lb = admin.wait(lambda: admin.get("/forests/prod/leaderboard"), lambda x: len(x["rows"]) > 0, timeout=120)
    assert {row["subject"] for row in lb["rows"]} >= {"python", "ensemble", "average/uniform"}
    assert lb["rows"][0]["ppl"]["python"] > 1


def big_seed(tmp_path, tok):
    """A seed large enough that validating an upload of it takes a moment (~160 MB)."""
    from transformers import GPT2Config

    from btm.family import Card, new_model, save_elm

    cfg = GPT2Config(vocab_size=50_000, n_layer=4, n_embd=512, n_head=8, n_positions=128,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.bos_token_id)
    return save_elm(new_model(cfg), tok, tmp_path / "big-seed", Card(name="seed", kind="seed"))


def test_worker_killed_during_validation_validates_exactly_once(stack, tok, tmp_path):
    admin, alice = stack.user("admin2", "admin"), stack.user("alice2")
    seed = big_seed(tmp_path, tok)
    admin.create_forest("big", seed)
    add_domain(alice, "kjv", CORPUS, "kjv_bible")
    b = alice.post("/branch-inits", {"forest": "big", "domain": "kjv", "method": "seed"})
    b = alice.wait(lambda: alice.get(f"/branch-inits/{b['id']}"), lambda x: x["status"] == "ready", timeout=120)
    g = torch.Generator().manual_seed(0)
    state = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in iter_tensors(open_weights(seed))}
    save_state_dict(state, tmp_path / "elm")
    w = tmp_path / "elm" / "model.safetensors"
    import json

    from btm.tokenizer import tokenizer_sha256

    r = alice.post("/contributions", {"forest": "big", "branch_init_id": b["id"], "sha256": sha256_file(w),
                                      "size": w.stat().st_size, "config": json.loads((seed / "config.json").read_text()),
                                      "tokenizer_sha256": tokenizer_sha256(tok)})
    alice.put_parts(w, r["upload"])
    cid = r["contribution"]["id"]
    alice.post(f"/contributions/{cid}/complete", {})

    from sqlalchemy import select

    from coordinator.models import Contribution, ContributionEvent, Job

    # wait until the worker is inside the validation, then kill it outright
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with stack.db() as db:
            c = db.get(Contribution, cid)
            if c.state.value == "validating":
                break
        time.sleep(0.02)
    assert c.state.value == "validating", "validation never started"
    os.killpg(stack.worker.pid, signal.SIGKILL)
    stack.worker.wait()
    with stack.db() as db:
        assert db.get(Contribution, cid).state.value == "validating"  # killed mid-way
    stack.worker = stack.spawn(["worker", "--loglevel", "WARNING"])
    c = wait_state(alice, cid, {"evaluated", "rejected"}, timeout=180)
    assert c["state"] == "evaluated", c["history"]
    with stack.db() as db:
        events = list(db.scalars(select(ContributionEvent.to_state).where(ContributionEvent.contribution_id == cid)))
        job = db.scalar(select(Job).where(Job.kind == "validate", Job.key == f"contribution:{cid}"))
        assert events.count("validated") == 1 and events.count("validating") == 1, events
        assert job.status.value == "succeeded" and job.attempts == 2


def wait_port(port: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"nothing listens on port {port}")


def test_restore_drill(stack, moto, tmp_path):
    """Back up the database (pg_dump) and the bucket, wipe both, restore, and the published
    forest downloads with the same hashes (runs last: it stops and restarts the stack)."""
    import boto3
    from sqlalchemy import create_engine, text

    from btm.forest import Forest
    from contributor_client import commands

    admin = stack.user("admin", "admin")
    before = admin.get("/forests/prod/versions/2")
    url = stack.env["ELMFOREST_DATABASE_URL"]
    dbname = url.rsplit("/", 1)[1]
    libpq = f"postgresql://postgres@127.0.0.1:5432/{dbname}"
    s3 = boto3.client("s3", endpoint_url=moto.url, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    # back up
    subprocess.run(["pg_dump", "-Fc", "-f", str(tmp_path / "db.dump"), libpq], check=True)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="stack") for o in page.get("Contents", [])]
    assert keys
    for k in keys:
        (tmp_path / "bucket" / k).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("stack", k, str(tmp_path / "bucket" / k))
    # disaster: the services stop, the database and the bucket are wiped
    stack.stop()
    from coordinator.db import get_engine

    get_engine(url).dispose()
    admin_engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test", isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as c:
        c.execute(text(f'DROP DATABASE "{dbname}" WITH (FORCE)'))
        c.execute(text(f'CREATE DATABASE "{dbname}"'))
    for k in keys:
        s3.delete_object(Bucket="stack", Key=k)
    assert s3.list_objects_v2(Bucket="stack").get("KeyCount", 0) == 0
    # restore
    subprocess.run(["pg_restore", "--no-owner", "-d", libpq, str(tmp_path / "db.dump")], check=True)
    for k in keys:
        s3.upload_file(str(tmp_path / "bucket" / k), "stack", k)
    c2 = Coordinator(stack.data_dir / "restored", stack.env, worker=False)
    try:
        admin2 = c2.user("admin", "admin")
        assert admin2.get("/forests/prod/versions/2") == before
        f = Forest.load(commands.download_forest(admin2, "prod", tmp_path / "forest", version=2))
        assert f.verify() == [] and f.names() == ["python"]
    finally:
        c2.stop()
