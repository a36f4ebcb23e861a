"""The ServerApp and the ClientApp in one process (no SuperLink, no Ray): LocalGrid calls the
ClientApp of each node directly, through Flower's own message serialisation, against a live
coordinator. Round 1: three nodes, three domains; one node's data is broken, so it fails and
the other two ELMs are kept. A maintainer approves and publishes them. Round 2: the failed
domain is retried (and succeeds) and branches from round 1's ELMs by a posterior computed on
its node; the done domains are skipped; a silent node times out. In the end: three
contributions, each its node owner's, for the node's domain; no document text in any Flower
message nor in anything the nodes sent the coordinator (a recording proxy sits in front of it)."""

from __future__ import annotations

import pytest
from fedlive import (
    TINY_ROUND,
    RecordingProxy,
    leaks,
    node_data,
    setup_federation,
    snippets,
    token_file,
)
from live import Coordinator, wait_state

from coordinator.federated.local import LocalGrid

MEMBERS = {"alice": "python", "bob": "kjv_bible", "carol": "postgres_docs", "dave": "webster_dictionary"}


@pytest.fixture(scope="module")
def fed(tmp_path_factory, seed_dir, cache_dir):
    proxy = RecordingProxy()  # the nodes reach the coordinator (API and download URLs) through it
    coord = Coordinator(tmp_path_factory.mktemp("fed-coord"), {"ELMFOREST_PUBLIC_URL": proxy.url})
    proxy.target_port = coord.port
    try:
        w = setup_federation(coord, seed_dir, MEMBERS)
        root = tmp_path_factory.mktemp("nodes")
        w["coord"] = coord
        w["proxy"] = proxy
        w["root"] = root
        w["tokens"] = {u: token_file(root, u, c.token) for u, c in w["clients"].items()}
        yield w
    finally:
        coord.stop()
        proxy.close()


def node(w, user: str, broken: bool = False) -> dict:
    domain = MEMBERS[user]
    data = node_data(w["root"] / ("broken" if broken else "data"), domain, broken=broken)
    return {"domain": domain, "data-dir": str(data), "coordinator-url": w["proxy"].url,
            "token-file": str(w["tokens"][user]), "work-dir": str(w["root"] / "work" / user),
            "cache-dir": str(w["root"] / "cache")}


def run(w, grid: LocalGrid, round_id: int, monkeypatch) -> dict:
    """The real ServerApp object over the grid, with the coordinator's settings."""
    from flwr.app import Context, RecordDict

    from coordinator.federated.server import app as server_app
    from coordinator.settings import get_settings

    for k, v in w["coord"].env.items():
        if k.startswith("ELMFOREST_"):
            monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    try:
        server_app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(),
                                 run_config={"round-id": round_id}))
    finally:
        grid.close()
        get_settings.cache_clear()
    return w["maint"].get(f"/rounds/{round_id}")


def by_domain(r: dict) -> dict[str, dict]:
    return {n["domain"]: n for n in r["nodes"]}


def test_rounds_in_process(fed, monkeypatch):
    from contributor_client.flower import app as client_app

    maint, forest = fed["maint"], fed["forest"]
    cfg = {"forest": forest, **TINY_ROUND, "min_nodes": 3, "node_wait_s": 10, "query_timeout_s": 120,
           "branch_timeout_s": 120, "init_timeout_s": 120, "train_timeout_s": 300}

    # round 1: carol's training data is broken
    r1 = maint.post("/rounds", cfg)
    assert r1["status"] == "pending"
    nodes1 = [node(fed, "alice"), node(fed, "bob"), node(fed, "carol", broken=True)]
    grid = LocalGrid(client_app, nodes1, {"round-id": r1["id"]})
    r = run(fed, grid, r1["id"], monkeypatch)
    assert r["status"] == "partial", r
    n = by_domain(r)
    assert n["python"]["status"] == n["kjv_bible"]["status"] == "submitted"
    assert n["postgres_docs"]["status"] == "failed" and "DataError" in n["postgres_docs"]["reason"]
    assert n["postgres_docs"]["owner"] == "carol" and n["postgres_docs"]["contribution_id"] is None
    assert {n["python"]["owner"], n["kjv_bible"]["owner"]} == {"alice", "bob"}
    assert n["python"]["metrics"]["steps"] == TINY_ROUND["steps"]
    wire1 = [b for _, _, _, b in grid.wire]

    # their ELMs go through the ordinary pipeline; a maintainer merges them into version 2
    for d in ("python", "kjv_bible"):
        c = wait_state(maint, n[d]["contribution_id"], {"evaluated", "rejected"}, timeout=300)
        assert c["state"] == "evaluated", c["history"]
        # its routing vector was computed on the node (from its own text) and came with the ELM
        evaluated = next(e for e in c["history"] if e["to_state"] == "evaluated")
        assert c["routing_vector"] and evaluated["details"]["routing_vector"] == "sent by its contributor"
        maint.post(f"/contributions/{c['id']}/approve", {"reason": "round 1"})
    job = maint.post(f"/forests/{forest}/publish", {"note": "round 1"})
    job = maint.wait(lambda: maint.job(job["id"]), lambda x: x["status"] in ("succeeded", "failed"))
    assert job["status"] == "succeeded" and job["result"]["version"] == 2

    # a second round cannot run the same round again
    from coordinator.errors import Conflict

    grid = LocalGrid(client_app, nodes1, {"round-id": r1["id"]})
    with pytest.raises(Conflict):
        run(fed, grid, r1["id"], monkeypatch)

    # round 2: carol fixed her data; dave's node never answers the branch request
    # (more, gentler updates: her init is already a trained average, harder to beat than the seed)
    r2 = maint.post("/rounds", {**cfg, "min_nodes": 4, "branch_timeout_s": 20, "steps": 40, "lr": 1e-3})
    nodes2 = [node(fed, "alice"), node(fed, "bob"), node(fed, "carol"), node(fed, "dave")]
    grid = LocalGrid(client_app, nodes2, {"round-id": r2["id"]}, drop={1004: {"query.branch"}})
    r = run(fed, grid, r2["id"], monkeypatch)
    assert r["status"] == "partial", r
    n = by_domain(r)
    assert n["python"]["status"] == n["kjv_bible"]["status"] == "skipped"  # their ELMs exist
    assert "needs no new ELM" in n["python"]["reason"]
    assert n["postgres_docs"]["status"] == "submitted" and n["postgres_docs"]["attempt"] == 2  # the retry
    assert n["webster_dictionary"]["status"] == "timed_out" and n["webster_dictionary"]["attempt"] == 1
    wire2 = [b for _, _, _, b in grid.wire]
    # carol's init branched from round 1's ELMs, weighted by the posterior her node computed
    assert r["version"] == 2
    init = maint.get(f"/branch-inits/{n['postgres_docs']['branch_init_id']}")
    assert init["version"] == 2 and init["method"] == "posterior"
    assert {p["name"] for p in init["parents"]} <= {"python", "kjv_bible"} and init["posterior"]
    assert set(init["posterior"]) == {"python", "kjv_bible"}

    # carol's ELM goes through evaluation like any upload and beats its init
    c3 = wait_state(maint, n["postgres_docs"]["contribution_id"], {"evaluated", "rejected"}, timeout=300)
    assert c3["state"] == "evaluated", c3["history"]

    # the timed-out domain is retried by the next round
    from coordinator.db import session_scope
    from coordinator.models import Contribution, Round
    from coordinator.services import rounds

    with session_scope(fed["coord"].settings.db_url) as db:
        nxt = Round(forest_id=db.get(Round, r2["id"]).forest_id, config={})
        db.add(nxt)
        db.flush()
        hist = rounds.domain_history(db, nxt)
        assert hist["webster_dictionary"].failures == 1 and hist["webster_dictionary"].done is None
        assert hist["postgres_docs"].failures == 0 and hist["postgres_docs"].done  # its live ELM
        db.delete(nxt)
        # three contributions, each of its node's owner and domain, tied to its round
        got = {(c.owner.username, c.domain.name, c.round_id) for c in db.query(Contribution)}
    assert got == {("alice", "python", r1["id"]), ("bob", "kjv_bible", r1["id"]), ("carol", "postgres_docs", r2["id"])}

    # no document text crossed Flower, either way, nor reached the coordinator
    texts = [s for u in ("alice", "bob", "carol", "dave") for s in snippets(fed["root"] / "data" / MEMBERS[u])]
    assert leaks(wire1 + wire2, texts) == []
    sent = fed["proxy"].sent()
    assert b'"posterior"' in sent  # carol's node sent its posterior weights (and no sample)
    assert leaks([sent], texts) == []
    assert sum(len(b) for b in wire1 + wire2) < 64_000  # control only: no weights in messages


def test_round_api_and_cancel(fed):
    maint, alice = fed["maint"], fed["clients"]["alice"]
    from contributor_client.http import ClientError

    with pytest.raises(ClientError) as e:
        alice.post("/rounds", {"forest": fed["forest"]})
    assert e.value.status == 403
    r = maint.post("/rounds", {"forest": fed["forest"], "steps": 5})
    with pytest.raises(ClientError) as e:  # one active round per forest
        maint.post("/rounds", {"forest": fed["forest"]})
    assert e.value.status == 409 and f"round {r['id']}" in str(e.value)
    c = maint.post(f"/rounds/{r['id']}/cancel")
    assert c["status"] == "cancelled" and c["finished_at"]
    assert [x["id"] for x in maint.get("/rounds", forest=fed["forest"])][0] == r["id"]
    # the web's listing: rounds with their per-node status
    from coordinator.db import session_scope
    from coordinator.services import rounds

    with session_scope(fed["coord"].settings.db_url) as db:
        listed = rounds.list_with_nodes(db, fed["forest"])
    assert listed[0]["id"] == r["id"] and all("nodes" in x and "counts" in x for x in listed)


def test_rounds_page_shows_each_node(fed):
    """Maintainers follow rounds in the web pages too."""
    import re

    import httpx

    s = httpx.Client(base_url=fed["coord"].url)
    assert s.get(f"/forests/{fed['forest']}/rounds").status_code == 303  # log in first
    token = re.search(r'name="csrf" value="([^"]+)"', s.get("/login").text).group(1)
    s.post("/login", data={"username": "maint", "password": "password123", "csrf": token})
    page = s.get(f"/forests/{fed['forest']}/rounds").text
    assert "Federated rounds" in page
    for word in ("python", "kjv_bible", "postgres_docs", "timed_out", "failed"):
        assert word in page, word


def test_round_start_simulates_its_nodes_from_the_command_line(fed, tmp_path):
    """`elmforest round start --node ...`: a maintainer runs a round with in-process nodes; the
    command creates the round over HTTP and the simulation runs it to the end."""
    import subprocess
    import sys

    maint = fed["maint"]
    n = node(fed, "dave")
    cfg = " ".join(f"{k}='{v}'" for k, v in n.items())
    env = {**fed["coord"].env, "ELMFOREST_URL": fed["coord"].url, "ELMFOREST_TOKEN": maint.token,
           "XDG_CONFIG_HOME": str(tmp_path), "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "elmforest_cli", "round", "start", fed["forest"], "--node", cfg,
                        "--steps", "12", "--batch-size", "8", "--block-size", "64", "--lr", "3e-3",
                        "--node-wait", "5", "--note", "from the command line"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "simulating 1 nodes" in r.stderr and "webster_dictionary" in r.stdout
    last = maint.get("/rounds", forest=fed["forest"])[0]
    assert last["note"] == "from the command line" and last["status"] == "succeeded", last
    assert [(x["domain"], x["owner"], x["status"]) for x in last["nodes"]] == [("webster_dictionary", "dave", "submitted")]
