"""An exported forest runs where elmforest is not installed: transformers loads its code from
the repository (trust_remote_code), routes each prompt by the forest's vectors, and lm-eval's
own `hf` model evaluates it."""

import inspect
import json
from pathlib import Path

import pytest
import torch
from helpers import run_without_btm

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "examples" / "lm_eval_tasks"
LM_EVAL = "from lm_eval.__main__ import cli_evaluate\nsys.argv = ['lm_eval'] + sys.argv[1:]\ncli_evaluate()\n"


def left_padded(tok, prompts):
    """Left-padded prompts led by the start token: the batch both processes generate from."""

    rows = [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


LOAD_AND_GENERATE = inspect.getsource(left_padded) + """
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, prompts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, top_k=1)
tok = AutoTokenizer.from_pretrained(out)
ids, mask = left_padded(tok, prompts)
seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
print(json.dumps({"module": type(model).__module__, "routes": [r.experts for r in model.routes],
                  "sequences": seq.tolist()}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, forest_dir, corpus_dir):
    """The fixture forest with routing vectors (each ELM's test prompt as its sample: the
    tests' seed is too small to tell domains apart otherwise), exported."""
    import shutil

    from btm.data import read_documents
    from btm.export import export
    from btm.forest import Forest
    from btm.recipes import compute_vectors

    tmp = tmp_path_factory.mktemp("standalone")
    shutil.copytree(forest_dir, tmp / "forest")
    prompts, samples = [], {}
    for d in ("python", "kjv_bible", "postgres_docs"):
        prompts.append(next(iter(read_documents(corpus_dir / d / "test.jsonl")))[:160])
        samples[d] = tmp / f"{d}.jsonl"
        samples[d].write_text(json.dumps({"text": prompts[-1]}) + "\n")
    compute_vectors(Forest.load(tmp / "forest"), samples)
    export(Forest.load(tmp / "forest"), tmp / "hub")
    return tmp / "hub", prompts


def test_an_export_loads_routes_and_generates_without_elmforest(exported, tmp_path):
    out, prompts = exported
    r = run_without_btm(LOAD_AND_GENERATE, out, json.dumps(prompts), cwd=tmp_path)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules.")  # the repository's own code, not btm's
    assert got["routes"] == [["python"], ["kjv_bible"], ["postgres_docs"]]
    # the same as elmforest's own model on the same export
    from btm.forest_model import ForestForCausalLM

    model = ForestForCausalLM.from_pretrained(out, top_k=1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids, mask = left_padded(tok, prompts)
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert got["sequences"] == want.tolist()


def test_lm_eval_hf_model_evaluates_an_export_without_elmforest(exported, tmp_path):
    out, _ = exported
    run_without_btm(LM_EVAL, "--model", "hf", "--model_args", f"pretrained={out},trust_remote_code=True,top_k=2",
         "--tasks", "demo_mc,demo_rolling,demo_gen", "--include_path", TASKS, "--output_path", tmp_path / "res",
         "--limit", "3", "--device", "cpu", cwd=ROOT, timeout=600)
    results = json.loads(next((tmp_path / "res").rglob("results_*.json")).read_text())["results"]
    assert 0 <= results["demo_mc"]["acc,none"] <= 1 and results["demo_rolling"]["bits_per_byte,none"] > 0
    assert "exact_match,none" in results["demo_gen"]


def test_an_export_still_imports_back_whole(exported, tmp_path):
    from btm.export import import_
    from btm.hashing import sha256_file

    out, _ = exported
    back = import_(out, tmp_path / "back")
    assert back.verify() == []
    for name in ("forest_model.py", "routing.py", "config.json", "tokenizer.json"):
        assert sha256_file(tmp_path / "back" / name) == sha256_file(out / name)


def test_a_corrupt_export_is_refused_on_import_and_nothing_is_left(exported, tmp_path):
    import shutil

    from btm.errors import ForestError
    from btm.export import import_

    out, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    weights = next((bad / "elms").rglob("model.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # one flipped bit in the last tensor
    weights.write_bytes(bytes(blob))
    with pytest.raises(ForestError, match=r"files differ from its manifest.*nothing imported"):
        import_(bad, tmp_path / "back")
    assert not (tmp_path / "back").exists()
    (bad / "forest.json").write_text("{not json")
    with pytest.raises(ForestError, match="forest.json"):
        import_(bad, tmp_path / "back")
    assert not (tmp_path / "back").exists()
