"""A published version as one native mixture-of-experts model, through the coordinator: a
Llama forest's MoE export requested over the API and with `elmforest download moe`, its files'
sha256 as declared, loaded by plain transformers; a GPT-2 forest refused naming the families
that have an MoE form; router tuning by a maintainer (a contributor is refused); bad options
answered with what to do; and a domain with no text named. On the embedded defaults and on
PostgreSQL with an S3 store."""

import hashlib

import httpx
import pytest
import torch
from helpers import CORPUS, TRAIN_DOMAINS, elmforest, streams, tiny_train_config
from live import Coordinator, MotoS3, add_domain, contribute, fresh_pg_database

from contributor_client import commands
from contributor_client.http import ClientError


def seed_of(preset: str, out, tok, cache_dir, steps: int = 30):
    from btm.data import BlockSampler
    from btm.family import Card, new_model, preset_config
    from btm.train import train

    train(new_model(preset_config(preset, tok), seed=0), tok,
          BlockSampler(streams(tok, cache_dir, TRAIN_DOMAINS), 64), tiny_train_config(steps), out,
          Card(name="seed", kind="seed"))
    return out


@pytest.fixture(scope="module", params=["embedded", pytest.param("postgres+s3", marks=pytest.mark.postgres)])
def backend(request):
    """The embedded defaults, or PostgreSQL with moto's S3 server."""
    if request.param == "embedded":
        yield {}
        return
    with fresh_pg_database() as url:
        s3 = MotoS3()
        try:
            yield {"ELMFOREST_DATABASE_URL": url, **s3.env("moe")}
        finally:
            s3.stop()


@pytest.fixture(scope="module")
def site(backend, tmp_path_factory, tok, cache_dir):
    """A Llama forest whose v2 has two ELMs (python, kjv_bible), a GPT-2 forest with its seed
    alone, and a coordinator that allows at most 20 tuning steps."""
    tmp = tmp_path_factory.mktemp("moe")
    c = Coordinator(tmp / "coord", {"ELMFOREST_MOE_TUNE_MAX_STEPS": "20", **backend})
    admin, alice, bob = c.user("admin", "admin"), c.user("alice"), c.user("bob")
    admin.create_forest("llm", seed_of("tiny", tmp / "llama-seed", tok, cache_dir))  # Llama
    admin.create_forest("gpt", seed_of("gpt2-tiny", tmp / "gpt2-seed", tok, cache_dir, steps=1))
    add_domain(alice, "python", CORPUS)
    add_domain(bob, "kjv_bible", CORPUS)
    for who, d in ((alice, "python"), (bob, "kjv_bible")):
        x = contribute(c, who, "llm", d, tok, cache_dir, tmp)
        admin.post(f"/contributions/{x['id']}/approve", {})
    admin.finish(admin.post("/forests/llm/publish", {"note": "two ELMs"}), "publish")
    yield {"c": c, "admin": admin, "alice": alice, "bob": bob}
    c.stop()


def sha256(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def finite_logits(model_dir, tok) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("def main():\n    return 1")])).logits
    assert torch.isfinite(logits).all()
    return model


def test_an_moe_export_over_the_api_and_the_client(site, tmp_path, tok, monkeypatch):
    from btm.family import read_card

    c, alice = site["c"], site["alice"]
    listing = alice.get("/forests/llm/moe")
    assert listing["available"] and listing["reason"] is None and listing["version"] == 2
    m = alice.post("/forests/llm/moe", {})  # defaults: 2 experts per token, the uniform backbone
    assert m["status"] == "requested" and m["job_id"] and (m["experts_per_token"], m["backbone"]) == (2, "uniform")
    assert alice.post("/forests/llm/moe", {"experts_per_token": 2})["id"] == m["id"]  # cached per options
    m = alice.wait(lambda: alice.get(f"/forests/llm/moe/{m['id']}"), lambda x: x["status"] != "requested", timeout=300)
    assert m["status"] == "ready", m["error"]
    assert m["samples"] == {"python": "branch-init sample of python", "kjv_bible": "branch-init sample of kjv_bible"}
    assert set(m["files"]) >= {"config.json", "model.safetensors", "README.md", "tokenizer.json"}

    # the client: the same artifact, every file's sha256 as declared; plain transformers loads it
    got = commands.download_moe(alice, "llm", tmp_path / "moe", version=2)
    assert got["id"] == m["id"]
    assert {f.name: sha256(f) for f in (tmp_path / "moe").iterdir()} == m["files"]
    model = finite_logits(tmp_path / "moe", tok)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (2, 2)
    card = read_card(tmp_path / "moe")
    assert card.kind == "moe" and card.recipe.startswith("elmforest download moe llm --version 2")
    assert card.data["router_samples"]["python"] == "branch-init sample of python"
    assert str(c.data_dir) not in (tmp_path / "moe" / "README.md").read_text()  # no server paths

    # the command line: a posterior backbone for python, one expert per token
    monkeypatch.setenv("ELMFOREST_URL", c.url)
    monkeypatch.setenv("ELMFOREST_TOKEN", alice.token)
    r = elmforest("download", "moe", "llm", "--experts-per-token", 1, "--backbone", "posterior", "--domain", "python",
                  "--out", tmp_path / "post", cwd=tmp_path)
    assert "1 expert(s) per token, posterior backbone for python" in " ".join(r.output.split())
    model = finite_logits(tmp_path / "post", tok)
    assert model.config.num_experts_per_tok == 1
    assert read_card(tmp_path / "post").data["backbone_weights"].keys() == {"python", "kjv_bible"}

    # the web's download page of the version shows them, with each file's sha256
    page = httpx.get(f"{c.url}/forests/llm/download?version=2").text
    assert f"/forests/llm/moe/{m['id']}" in page and m["files"]["model.safetensors"] in page
    page = httpx.get(f"{c.url}/forests/llm/moe/{m['id']}").text
    assert "elmforest download moe llm --version 2" in page and m["files"]["config.json"] in page


def test_a_family_with_no_moe_form_is_refused_without_a_job(site):
    c, alice, admin = site["c"], site["alice"], site["admin"]

    def moe_jobs() -> int:
        return sum(j["kind"] == "moe_export" for j in admin.get("/jobs"))

    before = moe_jobs()
    with pytest.raises(ClientError) as e:
        alice.post("/forests/gpt/moe", {})
    assert e.value.status == 422
    assert "gpt2 forest has no mixture-of-experts form" in str(e.value) and "llama (as mixtral)" in str(e.value)
    assert "qwen2 (as qwen2_moe)" in str(e.value)
    assert moe_jobs() == before
    listing = alice.get("/forests/gpt/moe")
    assert not listing["available"] and "llama (as mixtral)" in listing["reason"] and listing["exports"] == []
    page = httpx.get(f"{c.url}/forests/gpt/download").text
    assert "No MoE export of v1" in page and "no mixture-of-experts form" in page


def test_bad_options_say_what_to_do(site):
    alice, admin = site["alice"], site["admin"]

    def refused(client, path, body, status, *words, **params):
        with pytest.raises(ClientError) as e:
            client.post(path, body, **params)
        assert e.value.status == status and all(w in str(e.value) for w in words), str(e.value)

    refused(alice, "/forests/llm/moe", {"experts_per_token": 3}, 400, "has 2 ELM(s)", "at most 2")
    refused(alice, "/forests/llm/moe", {"backbone": "mixture"}, 422, "backbone", "'uniform', 'posterior' or 'seed'")
    refused(alice, "/forests/llm/moe", {"backbone": "posterior"}, 400, "needs a target domain")
    refused(alice, "/forests/llm/moe", {"domain": "python"}, 400, "posterior backbone only")
    refused(alice, "/forests/llm/moe", {}, 400, "no ELMs", version=1)
    m = admin.post("/forests/llm/moe", {"experts_per_token": 1})
    m = admin.wait(lambda: admin.get(f"/forests/llm/moe/{m['id']}"), lambda x: x["status"] != "requested", timeout=300)
    tune = f"/forests/llm/moe/{m['id']}/tune"
    refused(admin, tune, {"steps": 21}, 400, "1 to 20", "ELMFOREST_MOE_TUNE_MAX_STEPS")
    refused(admin, tune, {"steps": 0}, 422, "steps", "greater than or equal to 1")
    refused(admin, tune, {"steps": 2, "block_size": 4096}, 400, "longer than the model's context", "at most 256")


def test_router_tuning_is_a_maintainers_job(site, tmp_path, tok, monkeypatch):
    from btm.family import read_card
    from btm.safetensors_io import iter_tensors, open_weights

    c, admin, alice = site["c"], site["admin"], site["alice"]
    parent = commands.moe_export(alice, "llm", 2, 1)
    # a contributor or an anonymous visitor is refused, and nothing starts
    for who, status in ((alice, 403), (c.anonymous(), 401)):
        with pytest.raises(ClientError) as e:
            commands.tune_router(who, "llm", 4, moe_id=parent["id"])
        assert e.value.status == status
    assert admin.get(f"/forests/llm/moe/{parent['id']}")["status"] == "ready"

    # a maintainer's command: the export is found (cached), tuned by a job, downloaded
    monkeypatch.setenv("ELMFOREST_URL", c.url)
    monkeypatch.setenv("ELMFOREST_TOKEN", admin.token)
    r = elmforest("review", "tune-router", "llm", "--version", 2, "--experts-per-token", 1, "--steps", 4,
                  "--batch-size", 4, "--block-size", 32, "--lr", 0.03, "--out", tmp_path / "tuned", cwd=tmp_path)
    assert f"routers tuned from MoE {parent['id']} (router, 4 steps)" in " ".join(r.output.split())
    tuned = next(m for m in admin.get("/forests/llm/moe")["exports"] if m["parent_id"] == parent["id"])
    assert tuned["status"] == "ready" and tuned["tuning"]["steps"] == 4 and tuned["id"] != parent["id"]
    assert {f.name: sha256(f) for f in (tmp_path / "tuned").iterdir()} == tuned["files"]
    assert tuned["files"]["model.safetensors"] != parent["files"]["model.safetensors"]
    card = read_card(tmp_path / "tuned")
    assert card.recipe == tuned["recipe"] and card.recipe.startswith("elmforest review tune-router llm --version 2")
    assert card.data["tuned"]["what"] == "router" and card.training["updates"] == 4
    assert card.data["tuned"]["samples"]["python"] == "branch-init sample of python"
    finite_logits(tmp_path / "tuned", tok)
    commands.download_moe(alice, "llm", tmp_path / "moe", moe_id=parent["id"])
    before, after = (dict(iter_tensors(open_weights(tmp_path / d))) for d in ("moe", "tuned"))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".block_sparse_moe.gate." in n for n in changed)  # the routers alone
    # asking again is the same artifact; the web page shows its recipe
    again = commands.tune_router(admin, "llm", 4, moe_id=parent["id"], batch_size=4, block_size=32, lr=0.03)
    assert again["id"] == tuned["id"]
    page = httpx.get(f"{c.url}/forests/llm/moe/{tuned['id']}").text
    assert "elmforest review tune-router llm" in page and tuned["files"]["model.safetensors"] in page


def test_a_domain_with_no_text_is_named(tmp_path):
    """The service on a database alone: an ELM whose domain has no text on the coordinator."""
    from coordinator import migrate
    from coordinator.db import session_scope
    from coordinator.errors import BadRequest, Unprocessable
    from coordinator.models import Artifact, Domain, Forest, ForestVersion
    from coordinator.services import cache, moe

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate.upgrade(url)
    cache.manifests.clear()
    with session_scope(url) as db:
        llama = Forest(name="ll", family="llama", config={"model_type": "llama"}, tokenizer_sha256="0" * 64,
                       seed_files={})
        gpt2 = Forest(name="gg", family="gpt2", config={"model_type": "gpt2"}, tokenizer_sha256="0" * 64,
                      seed_files={})
        elms = [{"name": "legal", "domain": "legal"}, {"name": "go", "domain": "go"}]
        v = ForestVersion(forest=llama, number=2, manifest={"elms": elms}, manifest_sha256="0" * 64)
        g = ForestVersion(forest=gpt2, number=2, manifest={"elms": elms}, manifest_sha256="1" * 64)
        db.add_all([llama, gpt2, v, g, Artifact(sha256="a" * 64, size=1, kind="eval-data", origin="a test")])
        db.flush()
        db.add_all([Domain(name="legal"), Domain(name="go", eval_data_sha256="a" * 64)])
        db.flush()
        with pytest.raises(BadRequest, match=r"no text of domain 'legal' \(ELM legal\)"):
            moe.request(db, v)
        with pytest.raises(Unprocessable, match="families that have one"):
            moe.request(db, g)
    cache.manifests.clear()
