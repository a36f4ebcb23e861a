"""Routing vectors (btm.routing) through the coordinator: a private contributor's is computed
on their machine and travels with the upload; the coordinator computes the others' when it
evaluates (from the branch init's sample, else the domain's held-out data); every published
version carries each ELM's vector, a version made by a removal lacks the removed ELM's, and
a downloaded version routes with the centroid router. A bad vector is refused at upload."""

import json
import warnings

import pytest
from helpers import CORPUS
from live import Coordinator, add_domain, contribute, train_elm, wait_state

from btm.routing import forest_vectors
from contributor_client import commands


def samples(c) -> int:
    from sqlalchemy import func, select

    from coordinator.models import Artifact

    with c.db() as db:
        return db.scalar(select(func.count()).select_from(Artifact).where(Artifact.kind == "sample"))


@pytest.fixture(scope="module")
def site(tmp_path_factory, seed_dir, tok, cache_dir):
    """Forest rv, v2 with three ELMs: python (alice, with a sample), kjv_bible (bob, private)
    and postgres_docs (alice, a seed init: no text sent at all)."""
    c = Coordinator(tmp_path_factory.mktemp("rv"), {})
    admin, alice, bob = c.user("admin", "admin"), c.user("alice"), c.user("bob")
    admin.create_forest("rv", seed_dir)
    for d in ("python", "kjv_bible", "postgres_docs"):
        add_domain(alice, d, CORPUS)
    work = tmp_path_factory.mktemp("rv-work")
    elms = {"python": contribute(c, alice, "rv", "python", tok, cache_dir, work)}
    n_samples = samples(c)
    b = commands.request_branch(bob, "rv", "kjv_bible", CORPUS / "kjv_bible", private=True)
    private = {"vector": b["routing_vector"], "samples_sent": samples(c) - n_samples}
    init = commands.download_init(bob, b, work / "init-kjv")
    elm = train_elm(init, work / "elm-kjv", tok, "kjv_bible", cache_dir)
    elms["kjv_bible"] = wait_state(bob, commands.submit(bob, elm)["id"], {"evaluated", "rejected"})
    b = commands.request_branch(alice, "rv", "postgres_docs", method="seed")
    elm = train_elm(commands.download_init(alice, b, work / "init-pg"), work / "elm-pg", tok, "postgres_docs",
                    cache_dir, steps=60)
    elms["postgres_docs"] = wait_state(alice, commands.submit(alice, elm)["id"], {"evaluated", "rejected"})
    for x in elms.values():
        assert x["state"] == "evaluated", x["history"]
        admin.post(f"/contributions/{x['id']}/approve", {})
    admin.finish(admin.post("/forests/rv/publish", {"note": "three ELMs"}), "publish")
    yield {"c": c, "admin": admin, "alice": alice, "bob": bob, "elms": elms, "private": private, "work": work,
           "kjv_elm": work / "elm-kjv"}
    c.stop()


def vector_note(x: dict) -> str:
    """Where the contribution's routing vector came from, as its evaluation recorded it."""
    return next(e for e in x["history"] if e["to_state"] == "evaluated")["details"]["routing_vector"]


def centroid_model(path):
    from btm.forest_model import ForestForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "some ELMs have no routing vector" fallback
        m = ForestForCausalLM.from_forest(path, top_k=1, router="centroid")
    assert m.router == "centroid" and m.centroids is not None and m.k == 1
    return m


def first_text(domain: str) -> str:
    """The start of the domain's validation split, the text its routing vector was computed
    from: the tests' seed is too small to tell unseen texts of close domains apart (python and
    postgres_docs)."""
    return json.loads((CORPUS / domain / "valid.jsonl").read_text().splitlines()[0])["text"]


def test_a_private_contributors_vector_is_computed_locally_uploaded_and_published(site, tmp_path, tok, seed_dir):
    from btm.family import load_config, read_card

    bob, elms, private = site["bob"], site["elms"], site["private"]
    vec = private["vector"]
    assert len(vec) == load_config(seed_dir).get_text_config().hidden_size
    assert private["samples_sent"] == 0  # the private request sent no text
    # the vector went into the init's card, through training into the ELM's, and up with it
    assert read_card(site["kjv_elm"]).origin["routing_vector"] == vec
    kjv = bob.get(f"/contributions/{elms['kjv_bible']['id']}")
    assert kjv["routing_vector"] == vec
    assert vector_note(kjv) == "sent by its contributor"
    # the published version carries it, and the other ELMs' vectors, which the coordinator computed
    m = bob.get("/forests/rv/versions/2")
    by_name = {e["name"]: e for e in m["elms"]}
    assert by_name["kjv_bible"]["routing_vector"] == vec
    vectors = forest_vectors(m)
    assert vectors is not None and len(vectors) == 3 and all(len(v) == len(vec) for v in vectors)
    # the downloaded forest routes with the centroid router: a text of each domain (as long as
    # the blocks behind the vectors) to its own ELM, with one seed pass
    f = commands.download_forest(bob, "rv", tmp_path / "forest")
    model = centroid_model(f)
    for domain in ("kjv_bible", "python"):
        ids = tok(first_text(domain), return_tensors="pt").input_ids[:, :255]
        model.route(ids)
        assert model.routes[0].experts == [domain], (domain, str(model.routes[0]))
    out = model.generate(ids[:, :32], max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 32 + 3


def test_the_coordinator_computes_the_others_vectors_when_it_evaluates(site):
    from coordinator.models import Contribution
    from coordinator.services.contributions import ensure_routing_vector
    from coordinator.storage import make_storage

    c, alice, elms = site["c"], site["alice"], site["elms"]
    py = alice.get(f"/contributions/{elms['python']['id']}")
    pg = alice.get(f"/contributions/{elms['postgres_docs']['id']}")
    assert vector_note(py) == "computed from its branch init's sample"
    assert vector_note(pg) == "computed from the held-out data of postgres_docs"
    m = alice.get("/forests/rv/versions/2")
    by_name = {e["name"]: e for e in m["elms"]}
    assert by_name["python"]["routing_vector"] == py["routing_vector"] and len(py["routing_vector"]) > 0
    assert by_name["postgres_docs"]["routing_vector"] == pg["routing_vector"]
    assert all(x["routing_vector"] is None for x in alice.get("/contributions", mine=True))  # not in lists
    # a retried evaluation computes the same vector again, and keeps one it was sent
    storage = make_storage(c.settings)
    with c.db() as db:
        x = db.get(Contribution, py["id"])
        x.routing_vector = None
        assert ensure_routing_vector(storage, c.settings, x) == "computed from its branch init's sample"
        assert x.routing_vector == pytest.approx(py["routing_vector"], abs=1e-6)
        x.routing_vector = py["routing_vector"]
        kjv = db.get(Contribution, elms["kjv_bible"]["id"])
        before = list(kjv.routing_vector)
        assert ensure_routing_vector(storage, c.settings, kjv) == "sent by its contributor"
        assert kjv.routing_vector == before


def test_a_version_made_by_a_removal_routes_without_the_removed_elm(site, tmp_path):
    admin, elms = site["admin"], site["elms"]
    v2 = admin.get("/forests/rv/versions/2")
    job = admin.post(f"/contributions/{elms['postgres_docs']['id']}/remove", {"reason": "off-topic"})
    assert admin.finish(job, "remove")["result"]["version"] == 3
    v3 = admin.get("/forests/rv/versions/3")
    assert [e["name"] for e in v3["elms"]] == ["python", "kjv_bible"]
    keep = {e["name"]: e["routing_vector"] for e in v2["elms"] if e["name"] != "postgres_docs"}
    assert forest_vectors(v3) == [keep["python"], keep["kjv_bible"]]
    model = centroid_model(commands.download_forest(admin, "rv", tmp_path / "v3"))
    assert model.config.names == ["python", "kjv_bible"] and len(model.centroids.centres) == 2


def expect_refused(client, path, body, status, words):
    r = client.http.post(path, content=body if isinstance(body, bytes) else json.dumps(body).encode(),
                         headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    msg = r.json()["error"]["message"]
    for w in words:
        assert w in msg, msg
    return msg


def test_a_bad_routing_vector_is_refused_at_upload(site, seed_dir):
    from sqlalchemy import func, select

    from btm.tokenizer import load_tokenizer, tokenizer_sha256
    from coordinator.models import Contribution, Upload

    c, admin, alice = site["c"], site["admin"], site["alice"]
    from btm.family import load_config

    size = load_config(seed_dir).get_text_config().hidden_size
    b = commands.request_branch(alice, "rv", "python", method="seed")
    body = {"forest": "rv", "branch_init_id": b["id"], "sha256": "a" * 64, "size": 100,
            "config": json.loads((seed_dir / "config.json").read_text()),
            "tokenizer_sha256": tokenizer_sha256(load_tokenizer(seed_dir)), "name": "bad-vector"}

    def rows():
        with c.db() as db:
            return [db.scalar(select(func.count()).select_from(t)) for t in (Contribution, Upload)]

    before = rows()
    expect_refused(alice, "/contributions", {**body, "routing_vector": [0.5] * (size - 1)}, 422,
                   [f"{size - 1} numbers for a seed of hidden size {size}", "compute it with this forest's seed"])
    # JSON has no NaN or infinity; 1e999 reads as infinity, "nan" as NaN, and a raw NaN token as NaN
    for bad in (1e999, "nan", "-inf"):
        vec = [0.5] * (size - 1) + [bad]
        raw = json.dumps({**body, "routing_vector": vec}).replace("Infinity", "1e999").encode()
        expect_refused(alice, "/contributions", raw, 422, ["routing_vector", "NaN or infinite", "compute it again"])
    raw = json.dumps({**body, "routing_vector": [0.5] * size}).replace('"routing_vector": [0.5', '"routing_vector": [NaN')
    expect_refused(alice, "/contributions", raw.encode(), 422, ["NaN or infinite"])
    expect_refused(alice, "/contributions", {**body, "routing_vector": ["a lot"] * size}, 422,
                   ["routing_vector", "valid number"])
    expect_refused(alice, "/contributions", {**body, "routing_vector": [0.0] * 70_000}, 422,
                   ["70000 numbers", "the forest seed's hidden size", "compute it with the forest's seed"])
    # a maintainer's import is checked the same way
    imp = {k: body[k] for k in ("sha256", "size", "config", "tokenizer_sha256")}
    expect_refused(admin, "/forests/rv/imports", {**imp, "domain": "python", "name": "imp", "source": {"path": "/x"},
                                                  "routing_vector": [1.0, 2.0]}, 422, ["2 numbers for a seed"])
    assert rows() == before  # nothing was created
    # the right size is accepted
    ok = alice.post("/contributions", {**body, "routing_vector": [0.25] * size})
    assert ok["contribution"]["routing_vector"] == [0.25] * size
    alice.post(f"/contributions/{ok['contribution']['id']}/abandon", {})
