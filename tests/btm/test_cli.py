"""The `elmforest` command line, end to end on the demo corpus, as a user runs it."""

import json
import subprocess
import sys

import pytest
from helpers import elmforest


def test_seed_branch_train_forest_eval_average_from_the_cli(tmp_path, corpus_dir, tokenizer_dir, cache_dir):
    tiny = ["--batch-size", 4, "--block-size", 64, "--no-progress", "--cache-dir", cache_dir]
    elmforest("seed", "--corpus", corpus_dir, "--out", "seed", "--preset", "tiny", "--tokenizer", tokenizer_dir,
              "--steps", 6, *tiny, cwd=tmp_path)
    elmforest("forest", "init", "forest", "--seed", "seed", "--name", "demo", cwd=tmp_path)
    for d in ["python", "kjv_bible"]:
        elmforest("branch", "--forest", "forest", "--sample", corpus_dir / d / "valid.jsonl", "--out", f"init-{d}",
                  "--domain", d, "--block-size", 64, cwd=tmp_path)
        elmforest("train", "--init", f"init-{d}", "--corpus", corpus_dir, "--domain", d, "--out", d, "--steps", 4,
                  *tiny, cwd=tmp_path)
        elmforest("forest", "add", "forest", d, cwd=tmp_path)
    r = elmforest("forest", "list", "forest", cwd=tmp_path)
    assert "python" in r.output and "kjv_bible" in r.output
    manifest = json.loads(elmforest("forest", "show", "forest", cwd=tmp_path).stdout)
    assert manifest["version"] == 3 and [e["domain"] for e in manifest["elms"]] == ["python", "kjv_bible"]
    assert manifest["elms"][1]["parents"][0]["name"] == "python"  # posterior branch over a 1-ELM forest
    r = elmforest("eval", "--forest", "forest", "--corpus", corpus_dir, "--domains", "python,go", "--block-size", 64,
                  "--max-eval-blocks", 4, "--prior-blocks", 4, "--model", "seed=seed", "--json", "ev.json",
                  "--cache-dir", cache_dir, cwd=tmp_path)
    assert "ensemble" in r.output and "average/posterior" in r.output
    rep = json.loads((tmp_path / "ev.json").read_text())
    assert {r["domain"] for r in rep["rows"]} == {"python", "go"}
    elmforest("average", "--forest", "forest", "--target", corpus_dir / "go" / "valid.jsonl", "--out", "avg-go",
              "--block-size", 64, cwd=tmp_path)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "avg-go")
    r = elmforest("generate", "--forest", "forest", "--prompt", "def ", "--max-new-tokens", 5, cwd=tmp_path)
    assert "\ndef " in r.output
    elmforest("forest", "remove", "forest", "kjv_bible", "--reason", "test", cwd=tmp_path)
    assert "all files match" in elmforest("forest", "verify", "forest", cwd=tmp_path).output


@pytest.mark.parametrize(
    "args, message",
    [
        (["forest", "list", "nowhere"], "no forest.json"),
        (["seed", "--corpus", "missing", "--out", "x"], "corpus directory not found"),
        (["branch", "--out", "x"], "exactly one of --from"),
        (["train", "--init", "missing", "--out", "x", "--data", "y"], "no tokenizer.json"),
    ],
)
def test_bad_input_raises_an_error_that_says_what_to_do(tmp_path, args, message):
    from btm.errors import BTMError

    r = elmforest(*args, cwd=tmp_path, check=False)
    assert isinstance(r.exception, BTMError) and message in str(r.exception)


def test_the_command_prints_errors_as_one_line_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "elmforest_cli", "forest", "list", "nowhere"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "error: nowhere: no forest.json" in r.stderr and "Traceback" not in r.stderr
