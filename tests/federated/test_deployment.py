"""A real deployment on loopback: `flower-superlink` and two `flower-supernode` processes
(insecure, runtime dependency installation disabled), a live coordinator, and a maintainer
who starts the round with `elmforest round start`, which submits it with `flwr run`.

Both ELMs go through the ordinary pipeline and end validated and evaluated, waiting for a
maintainer. Everything the nodes sent is recorded by proxies in front of the SuperLink and
the coordinator: no document text in it, and no node's API token reached the SuperLink."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from fedlive import (
    TINY_ROUND,
    Flower,
    RecordingProxy,
    leaks,
    node_data,
    setup_federation,
    snippets,
    token_file,
)
from live import Coordinator, wait_state

MEMBERS = {"alice": "python", "bob": "kjv_bible"}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, seed_dir, cache_dir):
    root = tmp_path_factory.mktemp("deploy")
    (root / "coord").mkdir()
    coord_proxy = RecordingProxy()  # the nodes reach the coordinator (API and download URLs) through it
    coord = Coordinator(root / "coord", {"ELMFOREST_PUBLIC_URL": coord_proxy.url})
    coord_proxy.target_port = coord.port
    flower = Flower(root, {})
    link_proxy = None
    try:
        w = setup_federation(coord, seed_dir, MEMBERS)
        # the SuperLink runs the ServerApp in a subprocess with the coordinator's settings
        server_env = {k: v for k, v in coord.env.items() if k.startswith("ELMFOREST_")}
        flower.superlink(server_env)
        link_proxy = RecordingProxy(flower.port)  # the SuperNodes reach the SuperLink through it
        for user, domain in MEMBERS.items():
            data = node_data(root / "institutions" / user, domain)
            flower.supernode(user, link_proxy.port, {
                "domain": domain, "data-dir": str(data), "coordinator-url": coord_proxy.url,
                "token-file": str(token_file(root, user, w["clients"][user].token)),
                "work-dir": str(root / "work" / user), "cache-dir": str(root / "cache")})
        yield {**w, "coord": coord, "flower": flower, "root": root, "coord_proxy": coord_proxy,
               "link_proxy": link_proxy}
    finally:
        flower.stop()
        coord.stop()
        coord_proxy.close()
        if link_proxy:
            link_proxy.close()


def test_round_over_superlink_and_supernodes(deployment):
    d = deployment
    maint, flower = d["maint"], d["flower"]
    env = {**os.environ, **flower.env, "ELMFOREST_URL": d["coord"].url, "ELMFOREST_TOKEN": maint.token}
    args = [sys.executable, "-m", "elmforest_cli", "round", "start", d["forest"], "--superlink", "test", "--no-wait",
            "--min-nodes", "2", "--node-wait", "120", "--query-timeout", "300", "--branch-timeout", "300",
            "--init-timeout", "300", "--train-timeout", "400", "--steps", str(TINY_ROUND["steps"]),
            "--batch-size", str(TINY_ROUND["batch_size"]), "--block-size", str(TINY_ROUND["block_size"]),
            "--lr", str(TINY_ROUND["lr"])]
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180, cwd=d["root"])
    assert p.returncode == 0, p.stdout + p.stderr
    round_id = int(p.stdout.strip().splitlines()[-1])

    end = time.monotonic() + 600
    r = maint.get(f"/rounds/{round_id}")
    while r["status"] in ("pending", "running") and time.monotonic() < end:
        time.sleep(2)
        r = maint.get(f"/rounds/{round_id}")
    logs = "\n".join(f"--- {n}\n{flower.log(n)[-3000:]}" for n in ("superlink", *MEMBERS))
    assert r["status"] == "succeeded", (r, logs)
    assert r["flower_run_id"] and r["version"] == 1
    nodes = {n["domain"]: n for n in r["nodes"]}
    assert set(nodes) == set(MEMBERS.values())
    for user, domain in MEMBERS.items():
        n = nodes[domain]
        assert n["status"] == "submitted" and n["owner"] == user and n["contribution_id"], n
        # the ELM enters the same pipeline as any upload: validated, evaluated, awaiting approval
        c = wait_state(maint, n["contribution_id"], {"evaluated", "rejected"}, timeout=300)
        assert c["state"] == "evaluated", c["history"]
        assert c["owner"] == user and c["domain"] == domain
        assert [h["to_state"] for h in c["history"]] == ["uploading", "uploaded", "validating", "validated",
                                                          "evaluated"]
    waiting = maint.get("/contributions", state="evaluated", forest=d["forest"])
    assert {c["id"] for c in waiting} == {n["contribution_id"] for n in nodes.values()}

    # `elmforest round status` shows it
    s = subprocess.run([sys.executable, "-m", "elmforest_cli", "round", "status", str(round_id), "--json"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert s.returncode == 0 and '"succeeded"' in s.stdout

    # what the coordinator and the SuperLink received from the nodes: no document text
    texts = [t for dom in MEMBERS.values() for t in snippets(d["root"] / "institutions" / _user(dom) / dom)]
    to_coordinator, to_superlink = d["coord_proxy"].sent(), d["link_proxy"].sent()
    assert len(to_coordinator) > 100_000 and len(to_superlink) > 1000  # they did talk (weights went up)
    assert leaks([to_coordinator], texts) == []
    assert leaks([to_superlink], texts) == []
    # the SuperLink never saw the owners' API tokens (node config stays on the node)
    assert all(d["clients"][u].token.encode() not in to_superlink for u in MEMBERS)
    # and no sample of any domain was uploaded to the coordinator
    from sqlalchemy import select

    from coordinator.models import Artifact

    with d["coord"].db() as db:
        assert db.scalars(select(Artifact).where(Artifact.kind == "sample")).all() == []


def _user(domain: str) -> str:
    return next(u for u, dm in MEMBERS.items() if dm == domain)
