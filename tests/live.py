"""A live coordinator for tests: `elmforest serve` in a subprocess on a free loopback port,
against a real SQLite file or a fresh PostgreSQL database, with its embedded job worker (or
a Redis broker and a separate `elmforest worker`)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from helpers import CORPUS, tiny_train_config

from contributor_client import api, commands
from contributor_client.http import Client

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


def redis_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def fresh_pg_database():
    """A new, empty PostgreSQL database (its URL), dropped afterwards."""
    if not pg_available():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    from sqlalchemy import create_engine, text

    name = f"elmforest_test_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_database():
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    with fresh_pg_database() as url:
        yield url


class Coordinator:
    """A running coordinator and the means to drive it."""

    def __init__(self, data_dir: Path, env: dict[str, str], worker: bool = True, serve_args: tuple[str, ...] = ()):
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "ELMFOREST_DATA_DIR": str(data_dir), "ELMFOREST_PUBLIC_URL": self.url,
                    "ELMFOREST_EVAL_SCORED_BLOCKS": "8", "ELMFOREST_POSTERIOR_PRIOR_BLOCKS": "4", "ELMFOREST_EVAL_BLOCK_SIZE": "64",
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    # every test's requests come from one address: counted, never limited, unless a test says
                    "ELMFOREST_REQUESTS_PER_MINUTE": "1000000", **env}
        self.procs: list[subprocess.Popen] = []
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(data_dir.parent / f"{data_dir.name}-server.log", "ab")
        self.embedded_worker = worker
        self.serve_args = list(serve_args)
        self.start()

    def start(self, wait: bool = True) -> None:
        """Start (or start again) the server on its port, with its data and settings."""
        args = ["serve", "--port", str(self.port), *self.serve_args] + ([] if self.embedded_worker else ["--no-worker"])
        self.server = self.spawn(args)
        if wait:
            self.wait_healthy()

    def kill(self, proc: subprocess.Popen | None = None) -> None:
        """SIGKILL the server (or another of its processes) and everything it started: a
        crash, not a stop."""
        import signal

        proc = proc or self.server
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


    def spawn(self, args: list[str]) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "elmforest_cli", *args], env=self.env, stdout=self.log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def wait_healthy(self, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.server.poll() is not None:
                raise RuntimeError(f"coordinator exited:\n{Path(self.log.name).read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("coordinator did not become healthy")

    @property
    def settings(self):
        from coordinator.settings import Settings

        keys = {k[len("ELMFOREST_"):].lower(): v for k, v in self.env.items() if k.startswith("ELMFOREST_")}
        return Settings(**keys)

    def db(self):
        from coordinator.db import session_scope

        return session_scope(self.settings.db_url)

    def user(self, username: str, role: str = "contributor", scopes=None, password: str = "password123"
             ) -> api.Coordinator:
        from coordinator.models import Role
        from coordinator.services import users

        with self.db() as db:
            from sqlalchemy import select

            from coordinator.models import User

            u = db.scalar(select(User).where(User.username == username))
            if u is None:
                u = users.create_user(db, username, password, Role(role))
            _, secret = users.create_token(db, u, "test", scopes)
        return api.Coordinator(self.url, secret)

    def anonymous(self) -> api.Coordinator:
        return api.Coordinator(self.url)

    def stop(self) -> None:
        stop_groups(self.procs)
        self.log.close()


class Stutter:
    """Slow a process group down (SIGSTOP/SIGCONT, running `duty` of the time), so that a
    short job can be caught in the middle."""

    def __init__(self, pid: int, duty: float = 0.1, period: float = 0.05):
        import signal

        self.pid, self._stop = pid, threading.Event()

        def loop():
            while not self._stop.is_set():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGCONT)
                time.sleep(period * duty)
                if self._stop.is_set():
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGSTOP)
                time.sleep(period * (1 - duty))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGCONT)

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()

    def stop(self) -> None:
        self._stop.set()
        self._t.join()

def _s3(coord):
    import boto3

    url = coord.env["ELMFOREST_STORAGE_URL"]
    s3 = boto3.client("s3", endpoint_url=coord.env["ELMFOREST_S3_ENDPOINT_URL"], aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    return s3, url[5:].split("/", 1)[0]


def holds(coord, path: Path) -> bool:
    """Whether a file with exactly these bytes is anywhere in the coordinator's data directory
    or artifact store (under any name)."""
    import hashlib

    data = Path(path).read_bytes()
    sha, n = hashlib.sha256(data).hexdigest(), len(data)
    for f in coord.data_dir.rglob("*"):
        if f.is_file() and f.stat().st_size == n and hashlib.sha256(f.read_bytes()).hexdigest() == sha:
            return True
    if coord.env.get("ELMFOREST_STORAGE_URL", "").startswith("s3://"):
        s3, bucket = _s3(coord)
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                if o["Size"] == n and hashlib.sha256(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                                                     ).hexdigest() == sha:
                    return True
    return False


def stored_bytes(coord) -> int:
    """Every byte the coordinator's artifact store holds, finished or not (objects, parts of
    unfinished uploads, temporary files): what an attacker would try to grow. (Not counted: the
    40-byte note of an open upload's object key, which the upload's own row bounds.)"""
    url = coord.env.get("ELMFOREST_STORAGE_URL", "")
    if url.startswith("s3://"):
        s3, bucket = _s3(coord)
        total = sum(o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                    for o in page.get("Contents", []))
        for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            total += sum(p["Size"] for p in s3.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
                         .get("Parts", []))
        return total
    root = coord.data_dir / "artifacts"
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and f.name != "key") if root.exists() else 0


def stop_groups(procs: list[subprocess.Popen], grace: float = 10) -> None:
    """SIGTERM the process group of each process (started with start_new_session), the last
    started first; SIGKILL the groups still alive after `grace` seconds."""
    import signal

    for p in reversed(procs):
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)


def wait_state(client: Client, cid: int, states: set[str], timeout: float = 180) -> dict:
    return client.wait(lambda: client.get(f"/contributions/{cid}"), lambda x: x["state"] in states, timeout=timeout,
                       interval=0.3)


def make_forest(admin: api.Coordinator, seed_dir: Path, name: str = "demo") -> dict:
    return admin.create_forest(name, seed_dir)


def add_domain(client: api.Coordinator, name: str, corpus_dir: Path, source: str | None = None, role: str = "train") -> dict:
    d = client.create_domain(name, description=f"{name} text", role=role)
    client.set_eval_data(name, corpus_dir / (source or name) / "test.jsonl")
    return d


def train_elm(init: Path, out: Path, tok, domain: str, cache_dir, steps: int = 12) -> Path:
    import torch

    from btm.data import BlockSampler, Corpus, tokenize_file
    from btm.family import Card, load_model, read_card
    from btm.train import train

    torch.set_num_threads(1)
    stream = tokenize_file(Corpus(CORPUS)[domain].split_path("train"), tok, cache_dir)
    train(load_model(init), tok, BlockSampler([stream], 64), tiny_train_config(steps), out,
          Card(name=domain, domain=domain, origin=read_card(init).origin))
    return out


def run_contribution_flow(coord, seed_dir: Path, tok, cache_dir, tmp: Path, forest: str = "demo") -> dict:
    admin = coord.user("admin", "admin")
    alice = coord.user("alice")
    admin.create_forest(forest, seed_dir)
    add_domain(alice, "python", CORPUS)
    b = commands.request_branch(alice, forest, "python", CORPUS / "python")
    assert b["status"] == "ready" and b["parents"][0]["name"] == "seed"
    init = commands.download_init(alice, b, tmp / "init")
    elm = train_elm(init, tmp / "elm", tok, "python", cache_dir)
    c = commands.submit(alice, elm)
    assert c["state"] == "uploaded"
    c = wait_state(alice, c["id"], {"evaluated", "rejected"})
    assert c["state"] == "evaluated", c["history"]
    assert [h["to_state"] for h in c["history"]] == ["uploading", "uploaded", "validating", "validated", "evaluated"]
    assert c["evaluation"]["ppl"] < c["evaluation"]["init_ppl"]
    admin.post(f"/contributions/{c['id']}/approve", {"reason": "beats its init"})
    job = admin.post(f"/forests/{forest}/publish", {"note": "python ELM"})
    job = admin.wait(lambda: admin.job(job["id"]), lambda x: x["status"] in ("succeeded", "failed"))
    assert job["status"] == "succeeded" and job["result"]["version"] == 2
    assert alice.get(f"/contributions/{c['id']}")["state"] == "merged"
    return {"admin": admin, "alice": alice, "contribution": c}


class MotoS3:
    """moto's S3 server on a loopback port (the real HTTP protocol, no AWS)."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                httpx.get(self.url, timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("moto server did not start")

    def env(self, bucket: str) -> dict[str, str]:
        return {"ELMFOREST_STORAGE_URL": f"s3://{bucket}/artifacts", "ELMFOREST_S3_ENDPOINT_URL": self.url,
                "ELMFOREST_S3_ACCESS_KEY_ID": "testing", "ELMFOREST_S3_SECRET_ACCESS_KEY": "testing"}

    def stop(self) -> None:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)


def contribute(coord, client: Client, forest: str, domain: str, tok, cache_dir, tmp: Path, steps: int = 12) -> dict:
    """Branch, train, submit and wait until evaluated; returns the contribution."""
    b = commands.request_branch(client, forest, domain, CORPUS / domain)
    init = commands.download_init(client, b, tmp / f"init-{domain}")
    elm = train_elm(init, tmp / f"elm-{domain}", tok, domain, cache_dir, steps)
    c = commands.submit(client, elm)
    c = wait_state(client, c["id"], {"evaluated", "rejected"})
    assert c["state"] == "evaluated", c["history"]
    return c


def populate(coord, seed_dir: Path, tok, cache_dir, tmp: Path, forest: str = "web") -> dict:
    """A forest with two merged ELMs (v2, evaluated) and a third one waiting for review."""
    admin, alice, bob = coord.user("admin", "admin"), coord.user("alice"), coord.user("bob")
    admin.create_forest(forest, seed_dir, "A forest for the web tests")
    add_domain(alice, "python", CORPUS)
    add_domain(bob, "kjv_bible", CORPUS)
    add_domain(alice, "postgres_docs", CORPUS)
    add_domain(admin, "go", CORPUS, role="eval")
    merged = [contribute(coord, alice, forest, "python", tok, cache_dir, tmp),
              contribute(coord, bob, forest, "kjv_bible", tok, cache_dir, tmp)]
    for c in merged:
        admin.post(f"/contributions/{c['id']}/approve", {"reason": "ok"})
    job = admin.post(f"/forests/{forest}/publish", {"note": "first two"})
    admin.wait(lambda: admin.job(job["id"]), lambda x: x["status"] == "succeeded")
    pending = contribute(coord, alice, forest, "postgres_docs", tok, cache_dir, tmp, steps=80)
    admin.wait(lambda: admin.get(f"/forests/{forest}/leaderboard"), lambda x: len(x["domains"]) == 4, timeout=300)
    return {"admin": admin, "alice": alice, "bob": bob, "pending": pending, "merged": merged}


# ----------------------------------------------------------------------------- what crossed the wire


PLAIN = re.compile(r"[A-Za-z0-9 ,.;:()\-]{48}")


def snippets(domain_dir: Path, per_doc: int = 3, limit: int = 400) -> list[str]:
    """Pieces of the node's documents (48 plain characters: no quotes, backslashes or line
    breaks, so they read the same raw, in JSON and in protobuf) that occur nowhere in the
    domain's held-out test split, which the coordinator legitimately holds."""
    from btm.data import read_documents

    held_out = "\n".join(read_documents(CORPUS / domain_dir.name / "test.jsonl"))
    out: list[str] = []
    for split in ("train.jsonl", "valid.jsonl"):
        p = domain_dir / split
        try:
            docs = list(read_documents(p))
        except Exception:  # the broken node's train split
            continue
        for doc in docs:
            found = [m.group(0) for m in PLAIN.finditer(doc)]
            for s in found[:: max(1, len(found) // per_doc)][:per_doc]:
                if s.strip() and len(set(s)) > 8 and s not in held_out:
                    out.append(s)
    assert out, f"no snippets from {domain_dir}"
    return out[:limit]


def leaks(blobs: list[bytes], texts: list[str]) -> list[str]:
    """The texts that occur in any of the byte strings."""
    hay = b"\n".join(blobs)
    return [t for t in texts if t.encode() in hay]


class RecordingProxy:
    """A TCP proxy on loopback that keeps every byte each way (client->server, server->client).
    The target can be set after the proxy listens (the coordinator picks its port itself)."""

    def __init__(self, target_port: int | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.target_port = target_port
        self.up = bytearray()  # what clients sent
        self.down = bytearray()
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(64)
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        end = time.monotonic() + 30
        while self.target_port is None and time.monotonic() < end:
            time.sleep(0.05)
        try:
            s = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            c.close()
            return

        def pump(a: socket.socket, b: socket.socket, buf: bytearray) -> None:
            try:
                while True:
                    data = a.recv(65536)
                    if not data:
                        break
                    with self._lock:
                        buf += data
                    b.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    b.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=pump, args=(s, c, self.down), daemon=True)
        t.start()
        pump(c, s, self.up)
        t.join(timeout=600)
        c.close()
        s.close()

    def sent(self) -> bytes:
        with self._lock:
            return bytes(self.up)

    def close(self) -> None:
        self._stop = True
        self._sock.close()


def wait_port(port: int, timeout: float = 60, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited:\n{log.read_text()[-3000:] if log else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")
