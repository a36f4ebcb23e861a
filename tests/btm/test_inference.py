"""Posterior, cached prior, ensemble, top-k, averaging and branching, against brute force."""

import itertools
import math

import numpy as np
import pytest
import torch

from btm.average import average_in_memory, average_models
from btm.branch import branch, plan_branch, sample_blocks
from btm.data import eval_blocks, tokenize_file
from btm.ensemble import EnsembleLM, mix_logprobs
from btm.errors import BTMError, DataError, FamilyError
from btm.evaluate import Scores, domain_blocks, evaluate_forest
from btm.family import Card, load_model, new_model, preset_config, save_elm
from btm.forest import Forest
from btm.posterior import cached_prior, log_posterior
from btm.safetensors_io import iter_tensors, open_weights
from btm.weights import normalise_weights, select_top_k


def test_posterior_equals_brute_force_bayes():
    rng = np.random.default_rng(0)
    # 3 experts, 4 sequences: p(x|D=j) as explicit probabilities
    lik = rng.uniform(1e-6, 1e-3, size=(4, 3))
    prior = np.array([0.5, 0.3, 0.2])
    brute = lik * prior / (lik * prior).sum(axis=1, keepdims=True)
    got = np.exp(log_posterior(np.log(lik), np.log(prior)))
    np.testing.assert_allclose(got, brute, rtol=1e-12)
    # log space survives likelihoods that underflow as raw probabilities (1024-token blocks)
    ll = np.array([[-5000.0, -5002.0, -6000.0]])
    got = np.exp(log_posterior(ll, np.log(np.ones(3) / 3)))
    np.testing.assert_allclose(got[0], [1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2)), 0.0], atol=1e-12)


def test_cached_prior_is_the_ewm_of_batch_posteriors():
    rng = np.random.default_rng(1)
    ll = rng.normal(-50, 3, size=(10, 3))
    got = cached_prior(ll, group=4, alpha=0.3)
    prior, ema = np.ones(3) / 3, None
    for b in (ll[0:4], ll[4:8], ll[8:10]):
        post = np.exp(b) * prior
        post /= post.sum(axis=1, keepdims=True)
        m = post.mean(0)
        ema = m if ema is None else 0.7 * ema + 0.3 * m
        prior = ema
    np.testing.assert_allclose(got, ema / ema.sum(), rtol=1e-10)
    with pytest.raises(DataError, match="empty"):
        cached_prior(np.zeros((0, 3)))


def test_mixture_matches_explicit_prefix_weighted_sum():
    rng = np.random.default_rng(2)
    k, T = 3, 5
    p = rng.dirichlet(np.ones(7), size=(k, T))  # each expert's next-token distribution per position
    x = rng.integers(0, 7, size=T)
    prior = np.array([0.2, 0.5, 0.3])
    lp = torch.tensor(np.log(p[:, np.arange(T), x]))[:, None, :]  # (k, 1, T)
    got = mix_logprobs(lp, torch.tensor(np.log(prior)))[0].double().numpy()
    for t in range(T):
        w = prior * np.array([np.prod(p[j, np.arange(t), x[:t]]) for j in range(k)])
        w = w / w.sum()
        want = np.log(sum(w[j] * p[j, t, x[t]] for j in range(k)))
        assert got[t] == pytest.approx(want, abs=1e-5)


def test_ensemble_with_all_experts_equals_the_mixture_and_top_k_runs_only_k(forest_dir, tok, cache_dir, corpus_dir):
    f = Forest.load(forest_dir)
    models = [load_model(e.path) for e in f.elms]
    calls = [0] * len(models)
    for i, m in enumerate(models):
        m.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    blocks = eval_blocks(tokenize_file(corpus_dir / "python" / "test.jsonl", tok, cache_dir), 32, 6)
    prior = [0.6, 0.1, 0.3]
    full = EnsembleLM(models, prior, None)
    per_expert = [m for m in models]
    # explicit mixture, token by token, in probability space
    with torch.no_grad():
        probs = [torch.softmax(m(input_ids=blocks[:, :-1]).logits, -1).gather(-1, blocks[:, 1:, None])[..., 0].double()
                 for m in per_expert]
    want = []
    for n in range(blocks.shape[0]):
        for t in range(blocks.shape[1] - 1):
            w = torch.tensor([prior[j] * probs[j][n, :t].prod() for j in range(3)])
            w = w / w.sum()
            want.append(math.log(sum(w[j] * probs[j][n, t] for j in range(3))))
    got = full.token_logprobs(blocks).reshape(-1).double()
    np.testing.assert_allclose(got.numpy(), np.array(want), atol=2e-4)

    calls[:] = [0, 0, 0]
    top2 = EnsembleLM(models, prior, top_k=2, names=f.names())
    assert top2.names == [f.names()[0], f.names()[2]]
    assert top2.weights == pytest.approx([0.6 / 0.9, 0.3 / 0.9])
    top2.perplexity(blocks, batch_size=2)
    assert calls == [3, 0, 3]  # 6 blocks in batches of 2, only the two chosen experts run


def test_ensemble_generates_text(forest_dir, tok):
    f = Forest.load(forest_dir)
    ens = EnsembleLM([e.path for e in f.elms], [0.5, 0.25, 0.25], top_k=2, tokenizer=tok)
    text = ens.generate("import os\n", max_new_tokens=12, seed=0)
    assert text.startswith("import os\n") and len(text) > len("import os\n")
    assert ens.generate("import os\n", max_new_tokens=12, seed=0) == text  # seeded sampling repeats
    greedy = ens.generate(torch.tensor([tok.bos_token_id, 5, 6]), max_new_tokens=4, temperature=0)
    assert greedy.shape == (7,)


def test_average_of_identical_models_is_that_model(tmp_path, seed_dir):
    out = average_models([seed_dir, seed_dir, seed_dir], [0.2, 0.3, 0.5], tmp_path / "avg")
    a, b = dict(iter_tensors(open_weights(seed_dir))), dict(iter_tensors(open_weights(out)))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_streamed_average_equals_in_memory_average_exactly(tmp_path, forest_dir):
    f = Forest.load(forest_dir)
    srcs = [e.path for e in f.elms]
    w = [0.5, 0.2, 0.3]
    # sharded output; then a sharded input averaged again
    out = average_models(srcs, w, tmp_path / "avg", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").exists()
    got = dict(iter_tensors(open_weights(out)))
    want = average_in_memory(srcs, w)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    again = average_models([out, srcs[0]], [0.5, 0.5], tmp_path / "avg2")
    want2 = average_in_memory([out, srcs[0]], [0.5, 0.5])
    for k, t in iter_tensors(open_weights(again)):
        assert torch.equal(t, want2[k]), k
    # and the output is a model transformers loads, with its sources on the card
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    assert "| python | 0.5000 |" in (out / "README.md").read_text()


def test_weights_are_checked_and_normalised(tmp_path, forest_dir):
    w, note = normalise_weights([2, 1, 1])
    assert w.tolist() == [0.5, 0.25, 0.25] and "normalised" in note
    with pytest.raises(BTMError, match="non-negative"):
        normalise_weights([1, -1])
    with pytest.raises(BTMError, match="sum to 0"):
        normalise_weights([0, 0])
    f = Forest.load(forest_dir)
    out = average_models([e.path for e in f.elms], [2, 1, 1], tmp_path / "a")
    assert "normalised" in (out / "README.md").read_text()
    idx, w = select_top_k([0.0, 0.7, 0.3], 3)
    assert idx.tolist() == [1, 2]  # zero-weight experts are never run


def test_models_of_different_families_are_refused(tmp_path, tok, forest_dir):
    other = new_model(preset_config("small", tok))
    save_elm(other, tok, tmp_path / "other", Card(name="other"))
    f = Forest.load(forest_dir)
    with pytest.raises(FamilyError, match="different model families.*hidden_size: 256 vs 64"):
        average_models([f.elms[0].path, tmp_path / "other"], [0.5, 0.5], tmp_path / "x")
    with pytest.raises(FamilyError, match="different model families"):
        f.add(tmp_path / "other")
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_posterior_branch_init_weights_follow_the_sample(tmp_path, forest_dir, corpus_dir):
    f = Forest.load(forest_dir)
    blocks = sample_blocks(f, corpus_dir / "python" / "valid.jsonl", 64, 20)
    plan = plan_branch(f, blocks, "posterior")
    assert plan.names == ["python", "kjv_bible", "postgres_docs"]
    assert sum(plan.weights) == pytest.approx(1.0)
    # the weights are the sample's cached prior (an EMA that favours the sample's last blocks),
    # and over the whole sample python text is likeliest under the python ELM
    from btm.posterior import domain_prior, sequence_logliks

    paths = [e.path for e in f.elms]
    np.testing.assert_allclose(plan.weights, domain_prior(paths, blocks), atol=1e-9)
    assert np.argmax(sequence_logliks(paths, blocks).sum(0)) == 0
    out, plan = branch(f, tmp_path / "init", corpus_dir / "python" / "valid.jsonl", "posterior", "python2", 64, 20)
    card = (out / "README.md").read_text()
    assert "branch-init" in card and "python2" in card
    want = average_in_memory([e.path for e in f.elms], plan.weights)
    for k, t in iter_tensors(open_weights(out)):
        assert torch.equal(t, want[k])
    out2, plan2 = branch(f, tmp_path / "near", corpus_dir / "python" / "valid.jsonl", "argmax", "python2", 64, 20)
    one_hot = [0.0, 0.0, 0.0]
    one_hot[int(np.argmax(plan.weights))] = 1.0
    assert plan2.weights == one_hot  # argmax: all weight on the posterior's top ELM
    _, plan3 = branch(f, tmp_path / "s", None, "seed")
    assert plan3.names == ["seed"]
    with pytest.raises(DataError, match="no text"):
        (tmp_path / "empty.jsonl").write_text("")
        sample_blocks(f, tmp_path / "empty.jsonl", 64, 20)


def test_forest_evaluation_rows_and_scores_agree_with_ensemble(tmp_path, forest_dir, tok, cache_dir, corpus_dir):
    from btm.data import Corpus

    f = Forest.load(forest_dir)
    doms = domain_blocks(Corpus(corpus_dir), ["python", "go"], tok, 32, 8, 8, cache_dir)
    rep = evaluate_forest(f, doms, tmp_path, top_ks=(1, 2), extra_models={"seed": f.seed_dir})
    subjects = {r["subject"] for r in rep["rows"]}
    assert {"python", "ensemble", "ensemble/top1", "ensemble/top2", "average/uniform", "average/argmax",
            "average/posterior", "seed"} <= subjects
    assert rep["summary"]["ensemble"]["train"] > 0 and "eval" in rep["summary"]["ensemble"]
    # the score-based ensemble equals running EnsembleLM with the same prior
    s = Scores()
    for e in f.elms:
        s.add_model(e.name, e.path, doms[:1])
    prior = s.prior(f.names(), "python")
    ens = EnsembleLM([e.path for e in f.elms], prior, 2)
    assert s.ensemble_ppl(f.names(), "python", 2, prior) == pytest.approx(ens.perplexity(doms[0].test), rel=1e-5)


def test_forest_versions_add_remove_verify(tmp_path, forest_dir):
    import shutil

    shutil.copytree(forest_dir, tmp_path / "f")
    f = Forest.load(tmp_path / "f")
    v = f.version
    with pytest.raises(Exception, match="needs a reason"):
        f.remove("kjv_bible", " ")
    f.remove("kjv_bible", "license withdrawn")
    assert f.version == v + 1 and "kjv_bible" not in f.names()
    assert f.manifest["history"][-1]["reason"] == "license withdrawn"
    assert (tmp_path / "f" / "versions" / f"{v}.json").exists()
    assert not (tmp_path / "f" / "elms" / "kjv_bible").exists()
    assert f.verify() == []
    (tmp_path / "f" / "elms" / "python" / "config.json").write_text("{}")
    assert any("python/config.json" in p for p in f.verify())
    with pytest.raises(Exception, match="already in the forest"):
        f.add(tmp_path / "f" / "elms" / "postgres_docs")
    with pytest.raises(Exception, match="no ELM named 'nope'"):
        f.get("nope")


def test_all_pairs_of_top_k_are_consistent():
    prior = [0.1, 0.4, 0.2, 0.3]
    for k in range(1, 5):
        idx, w = select_top_k(prior, k)
        assert len(idx) == k and w.sum() == pytest.approx(1)
        assert all(prior[i] >= prior[j] for i, j in itertools.product(idx, set(range(4)) - set(idx)))


def test_integer_tensors_wait_for_the_float_chunks_being_written(tmp_path, monkeypatch):
    """An integer buffer is copied from the main thread while float chunks are written by the
    writer thread into the same file: the copy must wait for those writes, or the two
    interleave their seeks and writes (wrong bytes, or bytes past the end). Each chunk write
    is slowed down here so that an overlap, if the code allows one, always happens."""
    import threading
    import time

    import btm.average as avg
    from btm.safetensors_io import ShardedWriter, save_state_dict

    monkeypatch.setattr(avg, "CHUNK_BYTES", 4096)
    chunk_writing = threading.Event()
    overlaps = []
    write_range, write = ShardedWriter.write_range, ShardedWriter.write

    def slow_write_range(self, *a):
        chunk_writing.set()
        time.sleep(0.005)
        write_range(self, *a)
        chunk_writing.clear()

    def checked_write(self, name, t):
        if not t.is_floating_point():
            overlaps.append(chunk_writing.is_set())
        write(self, name, t)

    g = torch.Generator().manual_seed(0)
    srcs = []
    for i in range(3):
        state = {"a.weight": torch.randn(3000, generator=g), "b.position_ids": torch.arange(700),
                 "c.weight": torch.randn(3000, generator=g), "d.count": torch.arange(90, dtype=torch.int32)}
        save_state_dict(state, tmp_path / f"in{i}")
        srcs.append(tmp_path / f"in{i}")
    monkeypatch.setattr(ShardedWriter, "write_range", slow_write_range)
    monkeypatch.setattr(ShardedWriter, "write", checked_write)
    out = avg.average_weights([open_weights(s) for s in srcs], [0.5, 0.2, 0.3], tmp_path / "out")
    assert overlaps == [False, False]  # both integer tensors, each written with no chunk in flight
    want = average_in_memory(srcs, [0.5, 0.2, 0.3])
    want.update({n: t for n, t in iter_tensors(open_weights(srcs[0])) if not t.is_floating_point()})  # copied
    got = dict(iter_tensors(open_weights(tmp_path / "out")))
    assert out and got.keys() == want.keys()
    for name, t in got.items():
        assert torch.equal(t, want[name]), name


def test_chunked_streamed_average_is_exact_and_converts_dtypes(tmp_path, forest_dir, monkeypatch):
    """Tensors larger than a chunk are averaged chunk by chunk with the same result, and
    half-precision inputs are accumulated in fp32."""
    import btm.average as avg
    from btm.safetensors_io import save_state_dict

    f = Forest.load(forest_dir)
    srcs = [e.path for e in f.elms]
    monkeypatch.setattr(avg, "CHUNK_BYTES", 4096)  # every matrix spans several chunks
    out = average_models(srcs, [0.5, 0.2, 0.3], tmp_path / "avg")
    want = average_in_memory(srcs, [0.5, 0.2, 0.3])
    for k, t in iter_tensors(open_weights(out)):
        assert torch.equal(t, want[k]), k
    # bf16 copies of the same ELMs, averaged into a bf16 output
    halves = []
    for e in f.elms:
        d = tmp_path / f"bf16-{e.name}"
        import shutil

        shutil.copytree(e.path, d)
        (d / "model.safetensors").unlink()
        save_state_dict({k: v.to(torch.bfloat16) for k, v in iter_tensors(open_weights(e.path))}, d)
        halves.append(d)
    out16 = average_models(halves, [0.5, 0.2, 0.3], tmp_path / "avg16")
    want16 = average_in_memory(halves, [0.5, 0.2, 0.3])
    for k, t in iter_tensors(open_weights(out16)):
        assert t.dtype == torch.bfloat16 and torch.equal(t, want16[k].to(torch.bfloat16)), k
