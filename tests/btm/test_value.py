"""The value of an ELM (btm.value) against brute force, and the score cache (btm.score_cache):
reused when whole, scored again when missing, truncated, corrupted or of another shape."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from btm.evaluate import SEED, Scores, domain_blocks, evaluate_forest, subset_scorer
from btm.forest import Forest
from btm.score_cache import DirStore, decode, encode, entry_key
from btm.value import (
    SubsetScorer,
    domain_values,
    exact_shapley,
    leave_one_out,
    merge_preview,
    shapley,
)


def synthetic(n: int, seed: int = 0) -> tuple[Scores, list[str]]:
    """n experts and a base on one domain: random token log-probs (6 blocks of 10 targets), each
    expert better on its own share of the blocks, and dev log-likelihoods of 8 sequences."""
    g = torch.Generator().manual_seed(seed)
    s = Scores()
    names = [f"e{i}" for i in range(n)]
    for i, name in enumerate(names):
        lp = -torch.rand(6, 10, generator=g) * 3 - 0.5
        lp[i % 6] += 1.0
        s.test[(name, "d")] = lp
        s.dev[(name, "d")] = (lp.sum(1).double().numpy()[[0, 1, 2, 3, 4, 5, 0, 1]] + np.arange(8) * 0.1 * i)
    s.test[(SEED, "d")] = -torch.rand(6, 10, generator=g) * 3 - 1.0
    return s, names


@pytest.mark.parametrize("n", [1, 3, 4])
def test_subset_ensembles_loo_and_shapley_equal_brute_force(n):
    s, names = synthetic(n)
    sc = subset_scorer(s, names, "d")
    base = math.exp(-s.test[(SEED, "d")].double().mean().item())
    # every subset's perplexity is the evaluated ensemble of that subset, prior recomputed over it
    for k in range(1, n + 1):
        sub = names[:k]
        assert sc.ppl(range(k)) == pytest.approx(s.ensemble_ppl(sub, "d"), rel=1e-12)
    assert sc.ppl(()) == pytest.approx(base)
    loo = leave_one_out(sc)
    for i in range(n):
        rest = [x for j, x in enumerate(names) if j != i]
        without = s.ensemble_ppl(rest, "d") if rest else base
        assert loo[i] == pytest.approx(without / s.ensemble_ppl(names, "d") - 1, rel=1e-9, abs=1e-12)
    exact = exact_shapley(sc)
    full = sc.value(range(n))
    assert exact.sum() == pytest.approx(full, abs=1e-9)  # efficiency
    est = shapley(sc, permutations=400, seed=1)
    assert est.values.sum() == pytest.approx(full, abs=1e-9)  # each ordering telescopes
    assert est.permutations == 400
    if n > 1:
        assert np.all(np.abs(est.values - exact) <= 4 * est.stderr + 1e-9)
    assert sc.memo.keys() <= {tuple(sorted(c)) for c in _subsets(n)}  # memoised: never more than 2^n


def _subsets(n):
    from itertools import combinations

    return [c for k in range(n + 1) for c in combinations(range(n), k)]


def test_two_equal_experts_share_equally_and_a_useless_one_gets_nothing():
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(4, 8, generator=g) - 0.5
    dev = np.array([[-10.0, -10.0, -1e6]] * 4)  # the third never gets prior mass beside the others
    seed = -(lp - 5.0).double().mean().item()  # and alone it is no better than the seed
    sc = SubsetScorer([lp, lp.clone(), lp - 5.0], dev, base_nll=seed)
    ex = exact_shapley(sc)
    assert ex[0] == pytest.approx(ex[1]) and abs(ex[2]) < 1e-9
    rep = domain_values(["a", "b", "c"], sc, permutations=50)
    assert set(rep["elms"]) == {"a", "b", "c"} and rep["permutations"] == 50
    assert rep["elms"]["a"]["loo"] == pytest.approx(0.0, abs=1e-9)  # b stands in for a
    assert sum(e["shapley"] for e in rep["elms"].values()) == pytest.approx(rep["improvement"])


def test_merge_preview_is_the_ratio_with_and_without_the_candidate():
    s, names = synthetic(3, seed=5)
    p = merge_preview(subset_scorer(s, names, "d"))
    assert p["before_ppl"] == pytest.approx(s.ensemble_ppl(names[:2], "d"))
    assert p["after_ppl"] == pytest.approx(s.ensemble_ppl(names, "d"))
    assert p["change"] == pytest.approx(p["after_ppl"] / p["before_ppl"] - 1)


def test_cache_entries_are_checked_on_read():
    key = entry_key("m", "b")
    t, d = torch.randn(3, 5), np.arange(4.0)
    data = encode(key, t, d)
    got = decode(data, key, (3, 5), 4)
    assert torch.equal(got[0], t) and np.array_equal(got[1], d)
    assert decode(data, key, (3, 5), None)[1] is None  # dev not wanted: any entry serves
    bad = [None, b"", data[:-1], data + b"x", data[:-8] + b"\0" * 8, data.replace(b"scores/1", b"scores/2"),
           encode(entry_key("m", "c"), t, d)]
    assert all(decode(b, key, (3, 5), 4) is None for b in bad)
    assert decode(data, key, (5, 3), 4) is None and decode(data, key, (3, 5), 5) is None
    assert decode(encode(key, t, None), key, (3, 5), 4) is None  # scored without dev: not enough


def test_scores_are_reused_and_a_bad_entry_is_scored_again(tmp_path, forest_dir, tok, cache_dir, corpus_dir):
    from btm.data import Corpus

    f = Forest.load(forest_dir)
    doms = domain_blocks(Corpus(corpus_dir), ["python", "go"], tok, 32, 4, 4, cache_dir)
    store = DirStore(tmp_path / "store")
    e = f.elms[0]
    a = Scores(store=store)
    a.add_model(e.name, e.path, doms)
    assert (a.scored, a.reused) == (2, 0)
    files = sorted((tmp_path / "store" / "scores").iterdir())
    assert len(files) == 2
    b = Scores(store=store)
    b.add_model(e.name, e.path, doms)
    assert (b.scored, b.reused) == (0, 2)
    for d in doms:
        assert torch.equal(a.test[(e.name, d.name)], b.test[(e.name, d.name)])
        assert np.array_equal(a.dev[(e.name, d.name)], b.dev[(e.name, d.name)])
    # truncated, then of another shape (another domain's entry under this key), then missing
    files[0].write_bytes(files[0].read_bytes()[:-3])
    other = files[1].read_bytes()
    files[1].write_bytes(other.replace(files[1].name.encode(), files[0].name.encode()))
    for broken in ("truncated", "missing"):
        c = Scores(store=store)
        c.add_model(e.name, e.path, doms)
        assert c.scored >= 1 and c.scored + c.reused == 2, broken
        for d in doms:
            assert torch.equal(a.test[(e.name, d.name)], c.test[(e.name, d.name)])
        files[0].unlink()
    wrong = Scores(store=store)
    key = entry_key("fp", doms[0].fingerprint)
    store.write(key, encode(key, torch.zeros(2, 2), np.zeros(doms[0].dev.shape[0])))  # wrong shape
    wrong.add_model(e.name, e.path, doms[:1], fingerprint="fp")
    assert wrong.scored == 1 and wrong.test[(e.name, doms[0].name)].shape == a.test[(e.name, doms[0].name)].shape
    assert decode(store.read(key), key, tuple(a.test[(e.name, doms[0].name)].shape), doms[0].dev.shape[0])


def test_forest_values_agree_with_evaluating_the_forest_without_each_elm(tmp_path, forest_dir, tok, cache_dir,
                                                                         corpus_dir):
    from btm.data import Corpus

    f = Forest.load(forest_dir)
    doms = domain_blocks(Corpus(corpus_dir), ["python", "go"], tok, 32, 4, 4, cache_dir)
    store = DirStore(tmp_path / "store")
    rep = evaluate_forest(f, doms, tmp_path / "w", top_ks=(), averages=(), store=store, permutations=30)
    assert rep["scoring"]["scored"] == 3 * 2 + 2  # the ELMs, then the seed
    v = rep["values"]
    assert set(v) == {"python", "go"} and set(v["python"]["elms"]) == set(f.names())
    ens = {r["domain"]: r["ppl"] for r in rep["rows"] if r["subject"] == "ensemble"}
    for dn, dv in v.items():
        assert dv["forest_ppl"] == pytest.approx(ens[dn], rel=1e-9)
        assert sum(x["shapley"] for x in dv["elms"].values()) == pytest.approx(dv["improvement"], abs=1e-9)
    # a version without one ELM, evaluated from its models: it equals leave-one-out
    shutil.copytree(forest_dir, tmp_path / "f")
    g = Forest.load(tmp_path / "f")
    g.remove("kjv_bible", "test")
    again = evaluate_forest(g, doms, tmp_path / "w2", top_ks=(), averages=(), store=store, permutations=10)
    assert again["scoring"] == {"scored": 0, "reused": 2 * 2 + 2}  # a removal scores nothing
    fresh = evaluate_forest(g, doms, tmp_path / "w3", top_ks=(), averages=())
    for r in fresh["rows"]:
        if r["subject"] == "ensemble":
            want = v[r["domain"]]["forest_ppl"] * (1 + v[r["domain"]]["elms"]["kjv_bible"]["loo"])
            assert r["ppl"] == pytest.approx(want, rel=1e-6)
