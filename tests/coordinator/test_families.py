"""The coordinator with seeds of other families (Llama, Qwen2): the whole contribution flow,
averages, the leaderboard; and a maintainer's import of an existing checkpoint (here from a
local Hugging Face cache, as a Hub model would arrive), validated like an upload and shown as
imported in the lineage."""

import json

import httpx
import pytest
from helpers import CORPUS, TRAIN_DOMAINS, streams, tiny_train_config
from live import Coordinator, add_domain, run_contribution_flow, train_elm, wait_state

from contributor_client import commands
from contributor_client.http import ClientError


def family_seed(preset: str, out, tok, cache_dir):
    from btm.data import BlockSampler
    from btm.family import Card, new_model, preset_config
    from btm.train import train

    train(new_model(preset_config(preset, tok), seed=0), tok, BlockSampler(streams(tok, cache_dir, TRAIN_DOMAINS), 64),
          tiny_train_config(30), out, Card(name="seed", kind="seed"))
    return out


@pytest.mark.parametrize("preset", ["gpt2-tiny", "qwen2-tiny"])
def test_a_seed_of_another_family_goes_through_the_coordinator(preset, tmp_path, tok, cache_dir, seed_dir,
                                                               monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from btm.family import PRESETS
    from btm.forest import Forest
    from btm.hub import add_to_cache

    model_type = PRESETS[preset][0]
    seed = family_seed(preset, tmp_path / "seed", tok, cache_dir)
    c = Coordinator(tmp_path / "coord", {})
    try:
        r = run_contribution_flow(c, seed, tok, cache_dir, tmp_path)  # branch, train, submit, validate, evaluate, publish
        admin, alice = r["admin"], r["alice"]
        assert admin.forest("demo")["current_version"] == 2
        lb = admin.wait(lambda: admin.get("/forests/demo/leaderboard"), lambda x: len(x["rows"]) > 0, timeout=120)
        assert {"elm", "ensemble", "posterior"} <= {row["method"] for row in lb["rows"]}
        avg = commands.download_average(admin, "demo", "posterior", "python", tmp_path / "avg")
        assert AutoConfig.from_pretrained(avg).model_type == model_type
        AutoModelForCausalLM.from_pretrained(avg)
        if preset != "gpt2-tiny":
            return  # one family is enough for the import

        # a fine-tune of the seed made elsewhere, arriving as a Hub model (a local cache, offline)
        hub = tmp_path / "hub"
        monkeypatch.setenv("HF_HUB_CACHE", str(hub))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        add_domain(admin, "kjv_bible", CORPUS)
        ft = train_elm(seed, tmp_path / "bible-ft", tok, "kjv_bible", cache_dir, steps=12)
        commit = add_to_cache(ft, "example/tiny-gpt2-bible", "main", hub)
        with pytest.raises(ClientError, match="maintain"):  # maintainers only
            commands.import_checkpoint(alice, "demo", "example/tiny-gpt2-bible", "kjv_bible")
        x = commands.import_checkpoint(admin, "demo", "example/tiny-gpt2-bible", "kjv_bible", name="bible")
        assert x["branch_init_id"] is None and x["source"]["hub"] == "example/tiny-gpt2-bible"
        assert x["source"]["revision"] == commit and x["source"]["files"]["model.safetensors"] == x["weights_sha256"]
        x = wait_state(admin, x["id"], {"evaluated", "rejected"})
        assert x["state"] == "evaluated", x["history"]
        assert x["history"][0]["reason"].startswith("imported from example/tiny-gpt2-bible@")
        assert "the forest's seed" in x["history"][-1]["reason"]  # evaluated against the seed
        admin.post(f"/contributions/{x['id']}/approve", {"reason": "a known fine-tune"})
        admin.finish(admin.post("/forests/demo/publish", {"note": "imported bible"}), "publish")
        f = Forest.load(commands.download_forest(admin, "demo", tmp_path / "forest"))
        assert sorted(f.names()) == ["bible", "python"] and f.verify() == []
        entry = {e["name"]: e for e in json.loads((tmp_path / "forest" / "forest.json").read_text())["elms"]}["bible"]
        assert entry["parents"] == [] and entry["source"]["hub"] == "example/tiny-gpt2-bible"
        page = httpx.get(f"{c.url}/forests/demo/elms/bible").text
        assert "imported from example/tiny-gpt2-bible@" + commit[:12] in page

        # the same bytes again, or a model of another family: refused, saying why
        again = commands.import_checkpoint(admin, "demo", str(ft), "kjv_bible", name="bible-again")
        again = wait_state(admin, again["id"], {"evaluated", "rejected"})
        assert again["state"] == "rejected" and "ELM bible" in again["history"][-1]["reason"]
        with pytest.raises(ClientError, match="family"):
            commands.import_checkpoint(admin, "demo", str(seed_dir), "kjv_bible", name="gpt2")
    finally:
        c.stop()
