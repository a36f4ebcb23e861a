"""Routing by the text: each sequence runs the experts that fit it, with no target file."""

import json
import math
import shutil
import warnings

import pytest
import torch
from helpers import elmforest
from transformers import AutoModelForCausalLM

from btm.data import read_documents
from btm.errors import BTMError
from btm.forest import Forest
from btm.forest_model import ForestForCausalLM
from btm.recipes import compute_vectors, routing
from btm.routing import choose, chosen_mask, routed_mix

DOMAINS = ["python", "kjv_bible", "postgres_docs"]  # the fixture forest's ELMs, in forest order


@pytest.fixture(scope="module")
def routed_forest(tmp_path_factory, forest_dir, corpus_dir):
    """A copy of the fixture forest whose ELMs have routing vectors. The tests' seed is too
    small for its hidden states to tell domains apart (bench/routing.py measures that on real
    models), so each ELM's domain sample here is the test prompt of its domain: the centroid
    router must then send each prompt to its own ELM."""
    tmp = tmp_path_factory.mktemp("routed")
    shutil.copytree(forest_dir, tmp / "forest")
    samples = {}
    for d, text in zip(DOMAINS, _prompts(corpus_dir), strict=True):
        samples[d] = tmp / f"{d}.jsonl"
        samples[d].write_text(json.dumps({"text": text}) + "\n")
    assert compute_vectors(Forest.load(tmp / "forest"), samples) == []
    return tmp / "forest"


def _prompts(corpus_dir, n_chars=160):
    """One prompt of real text per domain: python, bible, postgres."""
    return [next(iter(read_documents(corpus_dir / d / "test.jsonl")))[:n_chars] for d in DOMAINS]


def _batch(tok, texts):
    rows = [[tok.bos_token_id] + tok.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def _model(root, router, k):
    r = routing(Forest.load(root), router=router)
    return ForestForCausalLM.from_experts(r.paths, r.prior, k, names=r.names, router=r.router,
                                          routing_vectors=r.vectors, seed=r.seed)


def test_ties_break_in_forest_order():
    assert choose(torch.zeros(5), 2).tolist() == [0, 1]
    assert choose(torch.tensor([1.0, 3.0, 3.0, 0.0]), 1).tolist() == [1]
    assert choose(torch.tensor([[0.0, 2.0, 1.0], [5.0, 5.0, 5.0]]), 2).tolist() == [[1, 2], [0, 1]]
    assert chosen_mask(torch.tensor([0.0, 2.0, 1.0]), 2).tolist() == [False, True, True]


@pytest.mark.parametrize("router", ["prompt", "centroid"])
def test_top_n_is_the_full_ensemble(routed_forest, tok, corpus_dir, router):
    """k = n: every row runs every ELM, and the output is today's all-n ensemble."""
    full = _model(routed_forest, "prior", None)
    routed = _model(routed_forest, router, 3)
    batch = _batch(tok, _prompts(corpus_dir, 60))
    with torch.no_grad():
        a = full(**batch, use_cache=False).logits
        b = routed(**batch, use_cache=False).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    want = full.generate(**batch, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    got = routed.generate(**batch, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(want.sequences, got.sequences)
    for x, y in zip(want.logits, got.logits, strict=True):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("router,k", [("prompt", 1), ("prompt", 2), ("centroid", 1), ("centroid", 2)])
def test_each_row_runs_its_own_experts_and_a_batch_equals_each_row_alone(routed_forest, tok, corpus_dir, router, k):
    model = _model(routed_forest, router, k)
    texts = _prompts(corpus_dir)
    batch = _batch(tok, texts)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    routes = list(model.routes)
    assert len({tuple(r.experts) for r in routes}) > 1  # rows of one batch chose different experts
    if k == 1:
        assert [r.experts[0] for r in routes] == DOMAINS  # each prompt to its own ELM
    for r in routes:
        assert len(r.experts) == k and sum(r.weights) == pytest.approx(1.0)
    width = batch["input_ids"].shape[1]
    for b, text in enumerate(texts):
        alone = _batch(tok, [text])
        one = model.generate(**alone, max_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        assert model.routes[0].experts == routes[b].experts
        assert model.routes[0].weights == pytest.approx(routes[b].weights, abs=1e-6)
        assert torch.equal(one.sequences[0, alone["input_ids"].shape[1]:], out.sequences[b, width:])
        for x, y in zip(one.logits, out.logits, strict=True):
            torch.testing.assert_close(y[b], x[0], atol=1e-4, rtol=0)


def test_the_prompt_router_is_bayes_over_every_elm_then_the_mixture_of_the_chosen(routed_forest, tok, corpus_dir):
    """From scratch, for one prompt: the top-2 of prior x p_j(prompt) over all 3 ELMs, then
    the next token's mixture among those 2 with weights prior x p_j(prompt)."""
    f = Forest.load(routed_forest)
    experts = [AutoModelForCausalLM.from_pretrained(e.path).eval() for e in f.elms]
    model = _model(routed_forest, "prompt", 2)
    ids = _batch(tok, [_prompts(corpus_dir)[1]])["input_ids"]
    with torch.no_grad():
        lp = torch.stack([torch.log_softmax(m(ids).logits[0].double(), -1) for m in experts])  # (3, T, V)
        loglik = lp[:, :-1].gather(-1, ids[0, 1:][None, :, None].expand(3, -1, 1))[..., 0].sum(-1)
        top2 = sorted(torch.argsort(loglik, descending=True)[:2].tolist())
        logw = loglik[top2] - torch.logsumexp(loglik[top2], 0)
        want = torch.logsumexp(logw[:, None] + lp[top2, -1], 0)
        got = model(input_ids=ids, use_cache=True, logits_to_keep=1).logits[0, -1]
    assert model.routes[0].experts == [f.names()[j] for j in top2]
    assert model.routes[0].weights == pytest.approx(torch.softmax(loglik[top2], 0).tolist(), abs=1e-6)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("router", ["prompt", "centroid"])
def test_scoring_chooses_each_positions_experts_from_the_text_before_it(routed_forest, tok, corpus_dir, router):
    """Perplexity of a whole text: at each position the experts come from the text before it,
    never from the token being scored; checked against every ELM's token log-probs."""
    from btm.data import eval_blocks, tokenize_file
    from btm.ensemble import EnsembleLM
    from btm.posterior import token_logprobs
    from btm.routing import Centroids, prefix_vectors, uniform_log_prior

    r = routing(Forest.load(routed_forest), router=router)
    ens = EnsembleLM(r.paths, None, 1, names=r.names, router=r.router, routing_vectors=r.vectors, seed=r.seed)
    blocks = eval_blocks(tokenize_file(corpus_dir / "go" / "test.jsonl", tok), 32, 4)
    got = ens.token_logprobs(blocks, batch_size=2)
    lp = torch.stack([token_logprobs(m, blocks) for m in ens.models]).double()  # (3, N, T)
    if router == "prompt":
        prefix = torch.cumsum(lp, -1) - lp  # log p_j(x_<t)
        best = prefix.argmax(0)  # top-1 of the posterior (uniform prior) of the text before t
    else:
        from btm.family import load_model

        scores = Centroids(r.vectors).scores(prefix_vectors(load_model(r.seed), blocks[:, :-1]), uniform_log_prior(3))
        best = scores.argmax(-1)
    want = lp.gather(0, best[None])[0]
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    torch.testing.assert_close(routed_mix(lp, uniform_log_prior(3), 1, None if router == "prompt" else
                                          scores.movedim(-1, 0)).double(), want, atol=1e-6, rtol=0)
    assert len(set(best.flatten().tolist())) > 1  # positions of one text chose different experts


def test_lm_eval_routes_a_loglikelihood_request_on_its_context_alone(routed_forest, corpus_dir, tok):
    """A python context with a bible continuation is scored by the python expert (its context
    chose it), exactly as lm-eval's own hf model scores that expert."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from btm.lm_eval_harness import ElmforestLM

    python, bible, _ = _prompts(corpus_dir, 300)
    reqs = [Instance("loglikelihood", {}, (python, " " + bible[:80]), 0),
            Instance("loglikelihood", {}, (bible, " " + python[:80]), 1)]
    ours = ElmforestLM(forest=str(routed_forest), top_k=1, router="prompt", batch_size=2, device="cpu")
    got = ours.loglikelihood(reqs)
    f = Forest.load(routed_forest)
    for req, (ll, _), expert in zip(reqs, got, ["python", "kjv_bible"], strict=True):
        hf = HFLM(pretrained=str(f.get(expert).path), tokenizer=tok, batch_size=1, device="cpu")
        want, _ = hf.loglikelihood([req])[0]
        assert ll == pytest.approx(want, abs=1e-4)


def test_centroid_without_vectors_says_how_to_compute_them_and_routes_by_the_prompt(forest_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = routing(Forest.load(forest_dir), router="centroid")
    assert r.router == "prompt" and r.vectors is None
    assert "elmforest forest vectors" in str(caught[0].message)
    assert routing(Forest.load(forest_dir)).router == "prompt"  # the default without vectors: never the first k


def test_bad_routing_vectors_are_refused(routed_forest, tmp_path):
    shutil.copytree(routed_forest, tmp_path / "f")
    f = Forest.load(tmp_path / "f")
    version = f.version
    with pytest.raises(BTMError, match="hidden size"):
        f.set_routing_vectors({"python": [1.0, 2.0]})
    good = f.elms[0].entry["routing_vector"]
    with pytest.raises(BTMError, match="NaN or infinite"):
        f.set_routing_vectors({"python": [math.nan] + good[1:]})
    with pytest.raises(BTMError, match="no ELM named"):
        compute_vectors(f, {"nope": "x"})
    assert Forest.load(tmp_path / "f").version == version


def test_cli_routes_each_prompt_and_a_removed_elm_is_never_chosen(routed_forest, tmp_path, corpus_dir):
    shutil.copytree(routed_forest, tmp_path / "f")
    python, bible, _ = _prompts(corpus_dir)
    r = elmforest("generate", "--forest", "f", "--prompt", python, "--prompt", bible, "--top-k", 1,
                  "--temperature", 0, "--max-new-tokens", 4, cwd=tmp_path)
    lines = [x for x in r.output.splitlines() if x.startswith("experts")]
    assert lines == ["experts (centroid router): python (1.00)", "experts (centroid router): kjv_bible (1.00)"]
    r = elmforest("generate", "--forest", "f", "--prompt", python, "--router", "prompt", "--top-k", 2,
                  "--reroute-every", 2, "--temperature", 0, "--max-new-tokens", 4, cwd=tmp_path)
    assert "experts (prompt router): python" in r.output
    text = tmp_path / "mixed.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in [python, bible]))
    r = elmforest("eval", "--forest", "f", "--text", text, "--top-k", "1,2", "--block-size", 32, cwd=tmp_path)
    for subject in ("python", "ensemble", "prompt/top1", "centroid/top2"):
        assert subject in r.output
    elmforest("forest", "remove", "f", "python", "--reason", "withdrawn", cwd=tmp_path)
    r = elmforest("generate", "--forest", "f", "--prompt", python, "--top-k", 1, "--temperature", 0,
                  "--max-new-tokens", 2, cwd=tmp_path)
    assert "experts (centroid router):" in r.output and "python (" not in r.output


def test_forest_add_keeps_the_routing_vector_of_its_domain(tmp_path, forest_dir, corpus_dir):
    """An ELM whose card names its training data gets its vector when it joins; `--sample` gives one."""
    f = Forest.init(tmp_path / "f", Forest.load(forest_dir).seed_dir, "f")
    src = Forest.load(forest_dir).get("python").path
    r = elmforest("forest", "add", "f", src, "--name", "py", "--sample", corpus_dir / "python", cwd=tmp_path)
    assert "routing vector" not in r.output
    f = Forest.load(tmp_path / "f")
    assert len(f.get("py").entry["routing_vector"]) == AutoModelForCausalLM.from_pretrained(src).config.hidden_size
