"""The whole contribution flow against a live coordinator on the embedded defaults: branch
init -> download -> train a few steps -> upload -> validated -> evaluated -> approved ->
published -> averaged model loads in transformers -> leaderboard rows."""

import pytest
from live import run_contribution_flow

from contributor_client import commands


def test_contribution_flow_on_the_embedded_defaults(coordinator, seed_dir, tok, cache_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from btm.forest import Forest

    r = run_contribution_flow(coordinator, seed_dir, tok, cache_dir, tmp_path)
    admin = r["admin"]
    # the published version downloads as a btm forest with the hashes of its manifest
    f = Forest.load(commands.download_forest(admin, "demo", tmp_path / "forest"))
    assert f.version == 2 and f.names() == ["python"] and f.verify() == []
    # the leaderboard fills in by itself (the publish job queues the evaluation)
    lb = admin.wait(lambda: admin.get("/forests/demo/leaderboard"), lambda x: len(x["rows"]) > 0, timeout=120)
    methods = {row["method"] for row in lb["rows"]}
    assert {"elm", "ensemble", "uniform", "argmax", "posterior"} <= methods
    assert all(row["ppl"]["python"] > 1 for row in lb["rows"]), lb and lb["domains"] == [{"name": "python", "role": "train"}]
    assert admin.get("/forests/demo/posteriors")["python"] == {"python": pytest.approx(1.0)}
    # an averaged model for a target domain, downloadable and loadable with transformers
    avg = commands.download_average(admin, "demo", "posterior", "python", tmp_path / "avg")
    AutoModelForCausalLM.from_pretrained(avg)
    # and the first version is still there, unchanged
    assert admin.get("/forests/demo/versions/1")["elms"] == []
