"""A forest as one native mixture-of-experts model: the ELMs' MLPs as experts bit for bit, the
rest the averaging code's output, loaded by plain transformers (and lm-eval) with no code of ours."""

import json
import math

import pytest
import torch
from helpers import ROOT, elmforest, run_without_btm
from transformers import AutoModelForCausalLM

from btm.errors import DataError, FamilyError
from btm.forest import Forest
from btm.moe import MLP_TENSOR, export_moe
from btm.safetensors_io import iter_tensors, open_weights

DOMAINS = ["python", "kjv_bible", "postgres_docs"]


def _forest(root, preset, tok, n):
    """A forest of `preset` (untrained, distinct weights per ELM: enough to follow every tensor)."""
    from btm.family import Card, new_model, preset_config, save_elm

    cfg = preset_config(preset, tok)
    save_elm(new_model(cfg, seed=0), tok, root / "seed", Card(name="seed", kind="seed"))
    f = Forest.init(root / "forest", root / "seed", preset)
    for i, d in enumerate(DOMAINS[:n]):
        f.add(save_elm(new_model(cfg, seed=i + 1), tok, root / d, Card(name=d, domain=d)))
    return Forest.load(root / "forest")


def _samples(corpus_dir, f):
    return {n: corpus_dir / n for n in f.names()}


@pytest.mark.parametrize("preset,arch", [("tiny", "MixtralForCausalLM"), ("qwen2-tiny", "Qwen2MoeForCausalLM")])
def test_the_moe_of_a_one_elm_forest_is_that_elm(tmp_path, tok, corpus_dir, preset, arch):
    f = _forest(tmp_path, preset, tok, 1)
    out = export_moe(f, tmp_path / "moe", experts_per_token=2, samples=_samples(corpus_dir, f))
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    elm = AutoModelForCausalLM.from_pretrained(f.elms[0].path).eval()
    assert type(moe).__name__ == arch
    ids = torch.randint(0, len(tok), (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, elm(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", ["tiny", "qwen2-tiny"])
def test_experts_are_the_elms_mlps_and_the_rest_is_the_average(tmp_path, tok, corpus_dir, preset):
    from btm.average import average_models

    f = _forest(tmp_path, preset, tok, 3)
    out = export_moe(f, tmp_path / "moe", experts_per_token=2, samples=_samples(corpus_dir, f))
    got = dict(iter_tensors(open_weights(out)))
    avg = dict(iter_tensors(open_weights(average_models([e.path for e in f.elms], [1 / 3] * 3, tmp_path / "avg"))))
    elms = [dict(iter_tensors(open_weights(e.path))) for e in f.elms]
    moe_name = {"tiny": "block_sparse_moe.experts.{j}.{w}.weight", "qwen2-tiny": "mlp.experts.{j}.{p}_proj.weight"}
    w = {"gate": "w1", "down": "w2", "up": "w3"}
    for name, t in avg.items():
        m = MLP_TENSOR.match(name)
        if m is None:
            assert torch.equal(got[name], t), name  # the averaging code's output, bit for bit
            continue
        for j in range(3):
            key = f"model.layers.{m.group(1)}." + moe_name[preset].format(j=j, w=w[m.group(2)], p=m.group(2))
            assert torch.equal(got[key], elms[j][name]), key  # the ELM's own MLP
    layers = AutoModelForCausalLM.from_pretrained(f.seed_dir).config.num_hidden_layers
    for i in range(layers):
        router = got[f"model.layers.{i}.{'block_sparse_moe' if preset == 'tiny' else 'mlp'}.gate.weight"]
        assert router.shape == (3, got["model.norm.weight"].shape[0])
        torch.testing.assert_close(router.norm(dim=-1), torch.ones(3))  # centred, unit rows
    if preset == "qwen2-tiny":  # biases averaged, embeddings tied (no output matrix), a zero-width shared expert
        assert "model.layers.0.self_attn.q_proj.bias" in got and "lm_head.weight" not in got
        assert got["model.layers.0.mlp.shared_expert.up_proj.weight"].numel() == 0
    moe = AutoModelForCausalLM.from_pretrained(out)
    cfg = moe.config
    assert (cfg.num_local_experts if preset == "tiny" else cfg.num_experts) == 3
    assert cfg.num_experts_per_tok == 2
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7]])
    assert moe.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_families_without_an_moe_form_and_missing_router_samples_are_refused(tmp_path, tok, corpus_dir):
    g = _forest(tmp_path / "g", "gpt2-tiny", tok, 2)
    with pytest.raises(FamilyError, match=r"gpt2 forest has no mixture-of-experts form.*llama \(as mixtral\)"):
        export_moe(g, tmp_path / "gpt2-moe", samples=_samples(corpus_dir, g))
    f = _forest(tmp_path / "l", "tiny", tok, 2)
    with pytest.raises(DataError, match=r"no router sample for ELM 'kjv_bible' \(domain kjv_bible\)"):
        export_moe(f, tmp_path / "moe", samples={"python": corpus_dir / "python"})
    assert not (tmp_path / "moe").exists() or not any((tmp_path / "moe").iterdir())


def test_cli_exports_an_moe_that_runs_without_elmforest_and_in_lm_eval(tmp_path, tok, corpus_dir):
    f = _forest(tmp_path, "tiny", tok, 3)
    elmforest("forest", "export", f.root, "moe", "--moe", "--experts-per-token", 2, "--router-corpus", corpus_dir,
              cwd=tmp_path)
    card = (tmp_path / "moe" / "README.md").read_text()
    assert "Mixture-of-experts model" in card and "experts_per_token" in card
    code = ("from transformers import AutoModelForCausalLM\nimport torch, json\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "print(json.dumps({'type': type(m).__name__, 'out': m.generate(torch.tensor([[0, 5, 6]]), "
            "max_new_tokens=3, do_sample=False).tolist()}))\n")
    r = run_without_btm(code, tmp_path / "moe")
    assert json.loads(r.stdout.strip().splitlines()[-1])["type"] == "MixtralForCausalLM"
    lm_eval = "from lm_eval.__main__ import cli_evaluate\nsys.argv = ['lm_eval'] + sys.argv[1:]\ncli_evaluate()\n"
    run_without_btm(lm_eval, "--model", "hf", "--model_args", f"pretrained={tmp_path / 'moe'}", "--tasks", "demo_mc",
                    "--include_path", ROOT / "examples" / "lm_eval_tasks", "--output_path", tmp_path / "res",
                    "--limit", "2", "--device", "cpu", cwd=ROOT, timeout=600)
    assert next((tmp_path / "res").rglob("results_*.json"))


def test_router_tuning_changes_only_the_routers(tmp_path, tok, corpus_dir, cache_dir):
    from btm.family import read_card

    f = _forest(tmp_path, "tiny", tok, 3)
    export_moe(f, tmp_path / "moe", experts_per_token=1, samples=_samples(corpus_dir, f))
    tiny = ["--batch-size", 6, "--block-size", 32, "--lr", 3e-2, "--no-progress", "--cache-dir", cache_dir]
    elmforest("tune-router", "moe", "--out", "tuned", "--steps", 6, *tiny, cwd=tmp_path)
    before, after = (dict(iter_tensors(open_weights(tmp_path / d))) for d in ("moe", "tuned"))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".block_sparse_moe.gate." in n for n in changed)  # the routers alone
    losses = [json.loads(x)["loss"] for x in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert len(losses) >= 1 and all(math.isfinite(x) for x in losses)  # (untrained experts: the loss is a bench's)
    card = read_card(tmp_path / "tuned")
    assert card.kind == "moe" and card.data["tuned"]["what"] == "router" and "tune-router" in card.recipe
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "tuned").config.output_router_logits is False
    r = elmforest("tune-router", "moe", "--out", "tuned", "--steps", 6, *tiny, cwd=tmp_path)  # done: nothing to do
    assert r.exit_code == 0
    with pytest.raises(DataError, match="not a mixture-of-experts export"):
        from btm.moe import tune_router
        from btm.train_config import TrainConfig

        tune_router(f.elms[0].path, tmp_path / "x", TrainConfig(steps=1))
