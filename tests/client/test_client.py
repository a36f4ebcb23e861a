"""The contributor's side against a live coordinator: --private sends no document text,
an interrupted submit resumes from the last part that arrived, and the errors a contributor
meets read as instructions."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import CORPUS, ROOT
from live import (
    Coordinator,
    RecordingProxy,
    add_domain,
    contribute,
    leaks,
    snippets,
    train_elm,
    wait_state,
)

from contributor_client import commands
from contributor_client.http import Client, ClientError


@pytest.fixture(scope="module")
def site(tmp_path_factory, seed_dir, tok, cache_dir):
    """A forest with two ELMs (so a posterior means something), small upload parts, and a
    recording proxy in front of the coordinator for the contributor's traffic."""
    proxy = RecordingProxy()
    c = Coordinator(tmp_path_factory.mktemp("client"), {"ELMFOREST_PART_SIZE": "65536",
                                                       "ELMFOREST_PUBLIC_URL": proxy.url})
    proxy.target_port = c.port
    admin, alice = c.user("admin", "admin"), c.user("alice")
    admin.create_forest("ff", seed_dir)
    work = tmp_path_factory.mktemp("client-work")
    for d in ("python", "kjv_bible"):
        add_domain(alice, d, CORPUS)
        x = contribute(c, alice, "ff", d, tok, cache_dir, work)
        admin.post(f"/contributions/{x['id']}/approve", {})
    job = admin.post("/forests/ff/publish", {})
    admin.wait(lambda: admin.job(job["id"]), lambda j: j["status"] == "succeeded")
    add_domain(alice, "postgres_docs", CORPUS)
    yield {"c": c, "proxy": proxy, "admin": admin, "alice": alice}
    c.stop()
    proxy.close()


def test_private_branch_request_sends_no_document_text(site, tmp_path):
    c, proxy = site["c"], site["proxy"]
    bob = Client(proxy.url, c.user("bob").token)
    data = CORPUS / "postgres_docs"
    def samples() -> int:
        from sqlalchemy import func, select

        from coordinator.models import Artifact

        with c.db() as db:
            return db.scalar(select(func.count()).select_from(Artifact).where(Artifact.kind == "sample"))

    n_samples, before = samples(), len(proxy.sent())
    b = commands.request_branch(bob, "ff", "postgres_docs", data, private=True)
    sent = proxy.sent()[before:]
    assert b["status"] == "ready" and set(b["posterior"]) == {"python", "kjv_bible"}
    assert b'"posterior"' in sent and b"sample_sha256" not in sent
    assert leaks([sent], snippets(data)) == []  # no piece of the contributor's text reached the server
    assert samples() == n_samples  # and no sample was stored
    # the same request with a sample does upload text: the check above can see it
    before = len(proxy.sent())
    commands.request_branch(bob, "ff", "postgres_docs", data, private=False)
    assert leaks([proxy.sent()[before:]], snippets(data))


KILLER = """
import os, signal, sys
sys.path[:0] = {paths!r}
from pathlib import Path
from contributor_client import commands
from contributor_client.http import Client
parts = []
def progress(sent, total):
    parts.append(sent)
    if len(parts) == 4:  # the initial call, then three finished parts
        os.kill(os.getpid(), signal.SIGKILL)
commands.submit(Client({url!r}, {token!r}), Path({elm!r}), progress=progress)
"""


def test_submit_killed_mid_upload_resumes_from_the_last_part(site, tok, cache_dir, tmp_path):
    c, alice = site["c"], site["alice"]
    b = commands.request_branch(alice, "ff", "postgres_docs", method="seed")
    init = commands.download_init(alice, b, tmp_path / "init")
    elm = train_elm(init, tmp_path / "elm", tok, "postgres_docs", cache_dir, steps=30)
    size = (elm / "model.safetensors").stat().st_size
    n_parts = -(-size // 65536)
    assert n_parts > 6
    code = KILLER.format(paths=[str(ROOT), str(ROOT / "tests")], url=c.url, token=alice.token, elm=str(elm))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]  # killed mid-upload
    state = json.loads((elm / ".elmforest-submit.json").read_text())
    up = alice.get(f"/contributions/{state['contribution_id']}/upload")
    assert up["parts_done"] == [1, 2, 3]
    calls = []
    x = commands.submit(alice, elm, progress=lambda sent, total: calls.append(sent))
    assert calls[0] == 3 * 65536  # resumed after the three parts that had arrived
    assert len(calls) == 1 + n_parts - 3  # and sent only the others
    assert x["id"] == state["contribution_id"] and x["state"] == "uploaded"  # the server checked the sha256
    assert wait_state(alice, x["id"], {"evaluated", "rejected", "validated"})["validation"]["ok"]


def cli(*args, env=None, cwd=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "elmforest_cli", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=cwd, timeout=300)


def test_errors_a_contributor_meets_read_as_instructions(site, tmp_path):
    c, alice = site["c"], site["alice"]
    cfg = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "ELMFOREST_TOKEN": "", "ELMFOREST_URL": c.url}
    r = cli("status", env=cfg)
    assert r.returncode == 1 and "not logged in: run `elmforest login`" in r.stderr
    r = cli("status", env={**cfg, "ELMFOREST_TOKEN": alice.token, "ELMFOREST_URL": "http://127.0.0.1:1"})
    assert r.returncode == 1 and "cannot reach the coordinator at http://127.0.0.1:1" in r.stderr
    r = cli("branch", "request", "--forest", "ff", "--domain", "klingon", "--out", tmp_path / "x", "--method", "seed",
            env={**cfg, "ELMFOREST_TOKEN": alice.token})
    assert r.returncode == 1 and "unknown domain 'klingon'; register it first" in r.stderr
    b = commands.request_branch(alice, "ff", "postgres_docs", method="seed")
    with pytest.raises(ClientError, match=r"was made from ff v2, not v1; submit the ELM trained from the init"):
        alice.post("/contributions", {"forest": "ff", "branch_init_id": b["id"], "forest_version": 1, "sha256": "a" * 64,
                                      "size": 10, "config": {"model_type": "gpt2"}, "tokenizer_sha256": "b" * 64})
    # a full disk, for real: the download's temporary file is /dev/full
    dest = tmp_path / "dl" / "config.json"
    dest.parent.mkdir()
    (dest.parent / "config.json.part").symlink_to("/dev/full")
    with pytest.raises(ClientError, match="the disk is full while writing .*config.json: free some space"):
        alice.download(b["urls"]["config.json"], dest, b["files"]["config.json"])


def test_a_full_disk_while_saving_an_elm_says_so(tmp_path, tok, cache_dir, seed_dir):
    from helpers import streams, tiny_train_config

    from btm.data import BlockSampler
    from btm.errors import BTMError
    from btm.family import Card, load_model
    from btm.train import train

    out = tmp_path / "elm"
    out.mkdir()
    (out / "config.json.tmp").symlink_to("/dev/full")  # writing the ELM's config hits ENOSPC
    with pytest.raises(BTMError, match="the disk is full while writing to .*elm: free some space") as e:
        train(load_model(seed_dir), tok, BlockSampler(streams(tok, cache_dir, ["python"]), 64), tiny_train_config(2),
              out, Card(name="x"))
    assert e.value.__cause__ is None and errno.ENOSPC
    assert (out / "checkpoint" / "state.json").exists()  # the finished state is safe: a rerun just saves


def test_running_out_of_gpu_memory_says_what_to_lower(tmp_path, tok, cache_dir, seed_dir):
    """No GPU here: the model's forward raises the error CUDA raises (torch.cuda.OutOfMemoryError)
    on the third update; the loop turns it into an instruction and a resumable checkpoint stays."""
    from helpers import streams, tiny_train_config

    from btm.data import BlockSampler
    from btm.errors import BTMError
    from btm.family import Card, load_model
    from btm.train import train

    model = load_model(seed_dir)
    forward, calls = model.forward, []

    def forward_until_oom(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*a, **kw)

    model.forward = forward_until_oom
    out = tmp_path / "elm"
    with pytest.raises(BTMError, match=r"ran out of memory with 8 sequences of 64 tokens.*lower --micro-batch-size"):
        train(model, tok, BlockSampler(streams(tok, cache_dir, ["python"]), 64), tiny_train_config(5, checkpoint_every=2),
              out, Card(name="x"))
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2  # resumes from here
    assert not (out / "model.safetensors").exists()  # no half-trained ELM


def test_a_request_on_a_connection_the_server_just_closed_is_sent_again_when_safe():
    """HTTP/1.1 keep-alive: a server may close an idle connection just as the client reuses
    it, and the request gets no answer. A GET is sent again on a new connection; a POST
    (which may have changed something) is not, and says what to do."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    seen: list[str] = []

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                request_line = conn.recv(65536).split(b"\r\n", 1)[0].decode()
                seen.append(request_line)
                if len(seen) == 1 or request_line.startswith("POST"):
                    continue  # closed without an answer, as a keep-alive timeout does
                body = b'{"ok": true}'
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)

    threading.Thread(target=serve, daemon=True).start()
    try:
        c = Client(f"http://127.0.0.1:{srv.getsockname()[1]}")
        assert c.request("GET", "/me") == {"ok": True}
        assert seen == ["GET /api/v1/me HTTP/1.1"] * 2
        with pytest.raises(ClientError, match="connection to the coordinator .* broke.*run the command again"):
            c.request("POST", "/contributions", json={})
        assert seen[2:] == ["POST /api/v1/contributions HTTP/1.1"]
    finally:
        srv.close()
