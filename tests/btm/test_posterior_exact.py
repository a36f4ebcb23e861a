"""The domain posterior exactly as specified, checked against independent oracles: a plain
per-sequence loop in float64 for the likelihoods, pandas' ewm(alpha=0.3, adjust=False) for the
cached prior. The prior does not depend on the forward batch size; forgetting an ELM names its
descendants; generation works with EOS-only tokenizers, long prompts and no target."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import elmforest

from btm.data import eval_blocks, tokenize_file
from btm.errors import ForestError
from btm.family import load_model
from btm.forest import Forest
from btm.posterior import EMA_ALPHA, EMA_GROUP, PRIOR_BLOCKS, domain_prior, sequence_logliks


@pytest.fixture(scope="module")
def blocks(tok, cache_dir, corpus_dir):
    return eval_blocks(tokenize_file(corpus_dir / "go" / "valid.jsonl", tok, cache_dir), 32, PRIOR_BLOCKS + 20)


def oracle_logliks(paths, blocks) -> np.ndarray:
    """One block at a time, a full log-softmax in float64."""
    out = np.zeros((blocks.shape[0], len(paths)))
    for j, p in enumerate(paths):
        m = load_model(p)
        with torch.no_grad():
            for i in range(blocks.shape[0]):
                logits = m(input_ids=blocks[i : i + 1, :-1]).logits.double()
                lp = torch.log_softmax(logits, -1).gather(-1, blocks[i : i + 1, 1:, None])
                out[i, j] = lp.sum().item()
    return out


def oracle_prior(ll: np.ndarray, group: int = 2, alpha: float = 0.3) -> np.ndarray:
    """Groups of `group` sequences in order; each group's mean posterior uses as its prior the
    EMA so far (pandas), uniform at the start."""
    means, prior = [], np.full(ll.shape[1], 1 / ll.shape[1])
    for i in range(0, ll.shape[0], group):
        joint = ll[i : i + group] + np.log(prior)
        post = np.exp(joint - joint.max(1, keepdims=True))
        means.append((post / post.sum(1, keepdims=True)).mean(0))
        prior = pd.DataFrame(means).ewm(alpha=alpha, adjust=False).mean().iloc[-1].to_numpy()
    return prior / prior.sum()


def test_the_prior_follows_the_oracles_and_not_the_batch_size(forest_dir, blocks):
    paths = [e.path for e in Forest.load(forest_dir).elms]
    assert (EMA_GROUP, EMA_ALPHA, PRIOR_BLOCKS) == (2, 0.3, 100)
    first = blocks[:PRIOR_BLOCKS]
    ll = sequence_logliks(paths, first, batch_size=16)
    want_ll = oracle_logliks(paths, first)
    np.testing.assert_allclose(ll, want_ll, atol=1e-3, rtol=1e-5)
    want = oracle_prior(want_ll)
    priors = {bs: domain_prior(paths, blocks, batch_size=bs, max_blocks=PRIOR_BLOCKS) for bs in (1, 7, 64)}
    for bs, p in priors.items():
        np.testing.assert_allclose(p, priors[1], atol=1e-6, err_msg=f"batch size {bs}")
        np.testing.assert_allclose(p, want, atol=1e-5, err_msg=f"batch size {bs} vs the oracle")
    # the prior comes from the first PRIOR_BLOCKS blocks only
    assert np.allclose(domain_prior(paths, first), priors[1], atol=1e-6)


def test_forgetting_an_elm_names_its_descendants(tmp_path, forest_dir):
    shutil.copytree(forest_dir, tmp_path / "forest")
    f = Forest.load(tmp_path / "forest")
    # postgres_docs branched 0.7 from python (and 0.3 from the seed), kjv_bible 0.05 from python
    m = json.loads((tmp_path / "forest" / "forest.json").read_text())
    parents = {"postgres_docs": [{"name": "python", "weight": 0.7}, {"name": "seed", "weight": 0.3}],
               "kjv_bible": [{"name": "python", "weight": 0.05}, {"name": "seed", "weight": 0.95}]}
    for e in m["elms"]:
        e["parents"] = parents.get(e["name"], e.get("parents", []))
    (tmp_path / "forest" / "forest.json").write_text(json.dumps(m))
    f = Forest.load(tmp_path / "forest")
    assert f.descendants("python") == {"postgres_docs": pytest.approx(0.7)}
    r = elmforest("forest", "remove", "forest", "python", "--reason", "withdrawn", cwd=tmp_path, check=False)
    why = str(r.exception)
    assert isinstance(r.exception, ForestError) and "postgres_docs (0.70)" in why and "--with-descendants" in why
    assert Forest.load(tmp_path / "forest").names() == f.names()  # nothing changed
    kept = tmp_path / "kept"
    shutil.copytree(tmp_path / "forest", kept)
    elmforest("forest", "remove", "kept", "python", "--reason", "withdrawn", "--keep-descendants", cwd=tmp_path)
    k = Forest.load(kept)
    assert "postgres_docs" in k.names() and k.manifest["history"][-1]["descendants"] == {
        "decision": "kept", "elms": {"postgres_docs": 0.7}}
    elmforest("forest", "remove", "forest", "python", "--reason", "withdrawn", "--with-descendants", cwd=tmp_path)
    g = Forest.load(tmp_path / "forest")
    assert g.names() == ["kjv_bible"] and g.manifest["history"][-1]["descendants"]["decision"] == "removed"
    assert not (tmp_path / "forest" / "elms" / "postgres_docs").exists() and g.verify() == []
    with pytest.raises(ForestError, match="needs a reason"):
        g.remove("kjv_bible", " ")


def test_generation_with_an_eos_only_tokenizer_a_long_prompt_and_no_target(tmp_path, forest_dir, tok):
    from btm.ensemble import EnsembleLM

    shutil.copytree(forest_dir, tmp_path / "forest")
    f = Forest.load(tmp_path / "forest")
    eos_only = tok.__class__.from_pretrained(f.seed_dir)
    eos_only.bos_token = None
    assert eos_only.bos_token_id is None and eos_only.eos_token_id is not None
    lm = EnsembleLM([e.path for e in f.elms], [1, 1, 1], tokenizer=eos_only)
    out = lm.generate("def main(", max_new_tokens=6, temperature=0)
    assert out.startswith("def main(")
    long = "import os\n" * 400  # far more tokens than the models' 256 positions
    assert len(eos_only.encode(long)) > 256
    out = lm.generate(long, max_new_tokens=6, temperature=0)
    assert out[:200] in long and len(out) < len(long)  # the prompt's last tokens are kept
    # no target: every expert weighs the same
    r = elmforest("generate", "--forest", "forest", "--prompt", "def ", "--max-new-tokens", 3, "--top-k", 3,
                  cwd=tmp_path)
    assert r.output.count("(0.33)") == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to compare with the CPU")
def test_the_posterior_is_the_same_on_a_gpu(forest_dir, blocks):
    """fp32 behind every posterior: a GPU gives the CPU's log-likelihoods and prior."""
    paths = [e.path for e in Forest.load(forest_dir).elms]
    first = blocks[:PRIOR_BLOCKS]
    cpu, gpu = (sequence_logliks(paths, first, device=d) for d in ("cpu", "cuda"))
    np.testing.assert_allclose(gpu / first.shape[1], cpu / first.shape[1], atol=1e-4)  # per token
    np.testing.assert_allclose(domain_prior(paths, first, device="cuda"), domain_prior(paths, first, device="cpu"),
                               atol=1e-4)
