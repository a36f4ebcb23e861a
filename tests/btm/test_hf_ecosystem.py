"""The forest among Hugging Face tools: models by Hub id (from a local Hub cache, offline), the
ensemble as a transformers model that generate() drives, lm-evaluation-harness, and forests in
the Hub layout. Families: GPT-2 (the session's forest) and Llama (examples/tiny_hub_models.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, elmforest
from transformers import AutoModelForCausalLM

TASKS = ROOT / "examples" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache holding example/tiny-llama-{base,python,bible,postgres}, used offline."""
    spec = importlib.util.spec_from_file_location("tiny_hub_models", ROOT / "examples" / "tiny_hub_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cache = tmp_path_factory.mktemp("hub-cache")
    commits = mod.build(cache, base_steps=20, tune_steps=10)
    return cache, commits


@pytest.fixture
def offline(hub, monkeypatch, tmp_path):
    cache, commits = hub
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return commits


@pytest.fixture(scope="module")
def llama_forest(hub, tmp_path_factory):
    """The README's forest: the tiny Llama base and its three fine-tunes, imported by Hub id."""
    cache, _ = hub
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_CACHE", str(cache))
    mp.setenv("HF_HUB_OFFLINE", "1")
    d = tmp_path_factory.mktemp("llama")
    try:
        elmforest("forest", "init", "forest", "--seed", "example/tiny-llama-base", cwd=d)
        elmforest("forest", "add", "forest", "example/tiny-llama-python", "--domain", "python", cwd=d)
        elmforest("forest", "add", "forest", "example/tiny-llama-bible@main", "--domain", "kjv_bible", cwd=d)
        elmforest("forest", "add", "forest", "example/tiny-llama-postgres", "--revision", "main", "--domain",
                  "postgres_docs", cwd=d)
    finally:
        mp.undo()
    return d / "forest"


def _experts(forest_dir) -> list[Path]:
    from btm.forest import Forest

    return [e.path for e in Forest.load(forest_dir).elms]


def _batch(tok, texts):
    """Left-padded prompts that start with the start-of-document token, as EnsembleLM builds them."""
    from btm.tokenizer import bos_id

    rows = [[bos_id(tok)] + tok.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, rows))
    pad = bos_id(tok)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, pad_token_id=pad)


# -------------------------------------------------------------------- the ensemble is a transformers model

MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, temperature=0.8, top_k=0, top_p=1.0),
    "top-k/top-p": dict(do_sample=True, top_k=20, top_p=0.9),
    "repetition penalty": dict(do_sample=True, repetition_penalty=1.3),
    "stop strings": dict(do_sample=True, stop_strings=["\n"]),
}


@pytest.mark.parametrize("family", ["llama", "gpt2", "hub llama"])
def test_one_expert_forest_generates_exactly_what_the_expert_does(family, forest_dir, llama_forest, tok, tmp_path):
    from btm.family import Card, new_model, preset_config, save_elm
    from btm.forest_model import ForestForCausalLM
    from btm.tokenizer import load_tokenizer

    if family == "gpt2":  # another cache layout and position scheme; random weights are enough here
        expert_dir = save_elm(new_model(preset_config("gpt2-tiny", tok), seed=0), tok, tmp_path / "g", Card(name="g"))
    else:
        expert_dir = _experts(forest_dir if family == "llama" else llama_forest)[0]
    tokenizer = tok if family != "hub llama" else load_tokenizer(expert_dir)
    expert = AutoModelForCausalLM.from_pretrained(expert_dir).eval()
    forest = ForestForCausalLM.from_experts([expert_dir])
    batch = _batch(tokenizer, ["def parse(x):", "And God said", "SELECT"])  # three lengths: left padding
    for mode, kw in MODES.items():
        extra = {"tokenizer": tokenizer} if "stop_strings" in kw else {}
        torch.manual_seed(0)
        want = expert.generate(**batch, max_new_tokens=16, **kw, **extra)
        torch.manual_seed(0)
        got = forest.generate(**batch, max_new_tokens=16, **kw, **extra)
        assert torch.equal(want, got), f"{family}, {mode}: the one-expert forest decoded differently"


def test_generation_follows_the_mixture_of_each_sequences_own_prefix(forest_dir, tok):
    """The logits generate() sees at every step, for every sequence of a left-padded batch, are
    the mixture log p(x_t|x_<t) = log sum_j p_j(x_t|x_<t) w_j(t), w_j(t) ∝ prior_j p_j(x_<t),
    computed here from scratch on each sequence alone, without padding or caches."""
    from btm.forest_model import ForestForCausalLM

    paths, prior = _experts(forest_dir), [0.5, 0.3, 0.2]
    forest = ForestForCausalLM.from_experts(paths, prior)
    experts = [AutoModelForCausalLM.from_pretrained(p).eval() for p in paths]
    batch = _batch(tok, ["import os\n", "And the LORD spake unto Moses, saying,", "SELECT"])
    out = forest.generate(**batch, max_new_tokens=8, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    width = batch["input_ids"].shape[1]
    for b in range(3):
        real = int(batch["attention_mask"][b].sum())
        seq = out.sequences[b, width - real:][None]  # this sequence alone: prompt and what was generated
        with torch.no_grad():
            lp = torch.stack([torch.log_softmax(m(seq).logits[0].double(), -1) for m in experts])  # (k, T, V)
        tok_lp = lp[:, :-1].gather(-1, seq[0, 1:][None, :, None].expand(3, -1, 1))[..., 0]
        prefix = torch.cat([torch.zeros(3, 1, dtype=torch.float64), tok_lp.cumsum(-1)], -1)  # log p_j(x_<=t)
        logw = torch.log(torch.tensor(prior, dtype=torch.float64))[:, None] + prefix
        mix = torch.logsumexp(logw[..., None] + lp, 0) - torch.logsumexp(logw, 0)[:, None]  # (T, V)
        for step, logits in enumerate(out.logits):
            t = real - 1 + step  # the position that predicts generated token `step`
            torch.testing.assert_close(logits[b].double(), mix[t], atol=2e-5, rtol=0)
            assert out.sequences[b, width + step] == mix[t].argmax()


def test_ensemble_generate_batches_prompts_and_stops(forest_dir, tok):
    from btm.ensemble import EnsembleLM

    ens = EnsembleLM(_experts(forest_dir), [0.6, 0.3, 0.1], 2, tokenizer=tok)
    prompts = ["import os\n", "And God said", "SELECT * FROM"]
    batched = ens.generate(prompts, max_new_tokens=10, temperature=0)
    assert [ens.generate(p, max_new_tokens=10, temperature=0) for p in prompts] == batched  # padding is invisible
    assert all(t.startswith(p) for t, p in zip(batched, prompts, strict=True))
    stopped = ens.generate(prompts, max_new_tokens=30, temperature=0, stop_strings=["e"])
    for t, p in zip(stopped, prompts, strict=True):
        assert "e" not in t[len(p):]  # cut at the stop string, which is left out
    r = elmforest("generate", "--forest", forest_dir, "--prompt", "def ", "--prompt", "And", "--temperature", 0,
                  "--max-new-tokens", 6, "--repetition-penalty", 1.2, "--sample-top-k", 5, cwd=forest_dir.parent)
    assert "\ndef " in r.output and "\nAnd" in r.output


def test_transformers_auto_classes_load_an_exported_forest(forest_dir, tmp_path, tok):
    import btm.forest_model  # noqa: F401 - registers the elmforest model type
    from btm.export import export
    from btm.forest import Forest

    export(Forest.load(forest_dir), tmp_path / "hub")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hub")
    assert type(model).__name__ == "ForestForCausalLM" and model.k == 3
    batch = _batch(tok, ["def "])
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, batch["input_ids"].shape[1] + 4)


# -------------------------------------------------------------------- lm-evaluation-harness

def _lm_eval(model, model_args):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from btm.lm_eval_harness import register

    register()  # as `elmforest lm-eval` does
    return simple_evaluate(model=model, model_args=model_args, tasks=["demo_mc", "demo_rolling", "demo_gen"],
                           task_manager=TaskManager(include_path=str(TASKS)), log_samples=True, batch_size=2,
                           device="cpu", random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                           fewshot_random_seed=0)


def test_lm_eval_scores_a_one_expert_forest_as_its_hf_model(forest_dir, tmp_path, offline, monkeypatch):
    from btm.forest import Forest

    one = Forest.init(tmp_path / "one", Forest.load(forest_dir).seed_dir, "one")
    one.add(_experts(forest_dir)[0])
    monkeypatch.chdir(ROOT)  # the tasks name their data files from the project's root
    ours = _lm_eval("elmforest", f"forest={tmp_path / 'one'}")
    theirs = _lm_eval("hf", f"pretrained={one.elms[0].path}")
    for task in ("demo_mc", "demo_rolling", "demo_gen"):
        a, b = ours["samples"][task], theirs["samples"][task]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            for rx, ry in zip(x["filtered_resps"], y["filtered_resps"], strict=True):
                if isinstance(rx, str):
                    assert rx == ry  # generate_until: the same text
                else:  # loglikelihood (logprob, is_greedy) or loglikelihood_rolling (logprob)
                    rx, ry = (rx, ry) if isinstance(rx, (list, tuple)) else ((rx,), (ry,))
                    assert abs(rx[0] - ry[0]) <= 1e-4 and rx[1:] == ry[1:]
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][metric] == pytest.approx(value, abs=1e-4), (task, metric)


INSTALLS = {
    "editable": lambda src, pip, tmp: [pip, "install", "-q", "--no-deps", "--no-build-isolation", "-e", src],
    "directory": lambda src, pip, tmp: [pip, "install", "-q", "--no-deps", "--no-build-isolation", src],
    "wheel": lambda src, pip, tmp: [pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src],
}


@pytest.mark.parametrize("how", list(INSTALLS))
def test_elmforest_lm_eval_works_however_elmforest_is_installed(llama_forest, tmp_path, offline, how):
    """A fresh virtual environment with elmforest installed one way (its dependencies taken
    from this one): `elmforest lm-eval` runs lm-eval's command line with the forest model."""
    import os
    import shutil
    import sysconfig

    src = tmp_path / "src"  # a copy of the tracked files: building writes into its source
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    deps = sysconfig.get_paths()["purelib"]
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(deps + "\n")  # the dependencies; no .pth of that environment runs
    env = {**os.environ, "PYTHONPATH": deps, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    cmd = INSTALLS[how](src, pip[-1], tmp_path)
    subprocess.run([*pip[:-1], *[str(c) for c in cmd]], check=True, env=env, capture_output=True)
    if how == "wheel":
        wheel = next((tmp_path / "dist").glob("elmforest-*.whl"))
        subprocess.run([*pip, "install", "-q", "--no-deps", str(wheel)], check=True, env=env, capture_output=True)
    run_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import btm, sys; print(btm.__file__)"],
                           capture_output=True, text=True, env=run_env, cwd=tmp_path, check=True)
    assert str(src if how == "editable" else venv) in probe.stdout  # this environment's elmforest
    r = subprocess.run(
        [str(venv / "bin" / "elmforest"), "lm-eval", "--model", "elmforest", "--model_args",
         f"forest={llama_forest},top_k=2,target={ROOT / 'btm/demo_corpus/python/valid.jsonl'}",
         "--tasks", "demo_mc,demo_rolling,demo_gen", "--include_path", str(TASKS), "--output_path", str(tmp_path / "out"),
         "--limit", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert 0 <= results["demo_mc"]["acc,none"] <= 1 and results["demo_rolling"]["bits_per_byte,none"] > 0
    assert "exact_match,none" in results["demo_gen"]


# -------------------------------------------------------------------- models by Hub id

def test_hub_models_are_imported_with_their_source_and_file_hashes(llama_forest, hub):
    from btm.forest import Forest

    _, commits = hub
    f = Forest.load(llama_forest)
    assert f.manifest["model_type"] == "llama" and f.names() == ["tiny-llama-python", "tiny-llama-bible",
                                                                    "tiny-llama-postgres"]
    assert f.manifest["seed"]["source"]["hub"] == "example/tiny-llama-base"
    for e in f.elms:
        src = e.entry["source"]
        assert src["revision"] == commits[src["hub"]] and src["requested"] == "main"
        weights = src["files"]["model.safetensors"]
        assert weights == e.entry["files"]["model.safetensors"]  # what came from the Hub is what is in the forest
        card = (e.path / "README.md").read_text()
        assert src["hub"] in card and src["revision"] in card and weights in card
    assert Forest.load(llama_forest).verify() == []


def test_seed_and_branch_start_from_hub_ids(offline, tmp_path, corpus_dir, cache_dir):
    tiny = ["--batch-size", 4, "--block-size", 32, "--no-progress", "--cache-dir", cache_dir]
    elmforest("seed", "--corpus", corpus_dir, "--out", "seed", "--init", "example/tiny-llama-base@main",
              "--domains", "python", "--steps", 2, *tiny, cwd=tmp_path)
    from btm.family import load_config, read_card

    assert load_config(tmp_path / "seed").model_type == "llama"
    assert read_card(tmp_path / "seed").source["revision"] == offline["example/tiny-llama-base"]
    elmforest("branch", "--from", "example/tiny-llama-python", "--out", "init", "--domain", "go", cwd=tmp_path)
    card = read_card(tmp_path / "init")
    assert card.parents == [{"name": "example/tiny-llama-python", "weight": 1.0}]
    assert card.source["hub"] == "example/tiny-llama-python"


def _refused(*args, cwd) -> str:
    from btm.errors import BTMError

    r = elmforest(*args, cwd=cwd, check=False)
    assert isinstance(r.exception, BTMError), r.output
    return str(r.exception)


def test_hub_ids_that_cannot_be_used_are_clear_errors(offline, hub, tmp_path, llama_forest):
    from btm.forest import Forest
    from btm.hub import add_to_cache

    cache, _ = hub
    version = Forest.load(llama_forest).version
    why = _refused("forest", "add", llama_forest, "example/not-downloaded", cwd=tmp_path)
    assert "not in the Hugging Face cache" in why and "HF_HUB_OFFLINE" in why and "hf download" in why
    assert "v9" in _refused("forest", "add", llama_forest, "example/tiny-llama-python@v9", cwd=tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: it must never be loaded
    add_to_cache(pickled, "example/pickled-only", "main", cache)
    why = _refused("forest", "add", llama_forest, "example/pickled-only", cwd=tmp_path)
    assert "only as pickles" in why and "pytorch_model.bin" in why
    assert "two revisions" in _refused("forest", "add", llama_forest, "example/tiny-llama-python@main", "--revision",
                                       "v2", cwd=tmp_path)
    assert Forest.load(llama_forest).version == version  # nothing was added


# -------------------------------------------------------------------- the Hub layout

def test_export_then_import_round_trips_every_file(llama_forest, tmp_path, offline, hub):
    from btm.forest import Forest
    from btm.hashing import sha256_file
    from btm.hub import add_to_cache

    elmforest("forest", "export", llama_forest, "hub-out", "--uniform", cwd=tmp_path)
    out = tmp_path / "hub-out"
    readme = (out / "README.md").read_text()
    assert "| python |" in readme and "imported from example/tiny-llama-python@" in readme
    assert (out / "averages" / "uniform" / "model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(out / "averages" / "uniform")
    elmforest("forest", "import", "hub-out", "back", cwd=tmp_path)

    def hashes(root):
        return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}

    exported = hashes(out)
    assert hashes(tmp_path / "back") == exported  # every file, byte for byte
    models = {k: v for k, v in hashes(llama_forest).items() if k.startswith(("seed/", "elms/"))}
    assert models and all(exported[k] == v for k, v in models.items())  # and the models are the forest's

    # from the Hub: pushed as it is, fetched by id; the manifest records where it came from
    add_to_cache(out, "example/tiny-forest", "v1", hub[0])
    elmforest("forest", "import", "example/tiny-forest@v1", "from-hub", cwd=tmp_path)
    f = Forest.load(tmp_path / "from-hub")
    assert f.manifest["imported_from"]["hub"] == "example/tiny-forest" and f.verify() == []
    assert {k: v for k, v in hashes(tmp_path / "from-hub").items() if k != "forest.json"} == {
        k: v for k, v in exported.items() if k != "forest.json"}

    # a tampered file is found and nothing is imported
    (out / "elms" / "tiny-llama-bible" / "config.json").write_text("{}")
    assert "differ from its manifest" in _refused("forest", "import", "hub-out", "bad", cwd=tmp_path)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.importing").exists()

