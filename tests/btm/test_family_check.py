"""One family check everywhere: weight tying, tokenizer and tensor layout decide, `forest add`
refuses what `average` and `eval` could not use, and the message leads with what a user knows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import elmforest

from btm.average import average_in_memory, average_models
from btm.errors import FamilyError
from btm.family import Card, family_id, new_model, preset_config, save_elm
from btm.forest import Forest
from btm.safetensors_io import iter_tensors, open_weights


def _model(tok, preset: str, out: Path, seed: int = 0, flip_tying: bool = False, **save) -> Path:
    """A tiny untrained model of `preset`, or of its variant with the opposite weight tying."""
    config = preset_config(preset, tok)
    if flip_tying:
        config.tie_word_embeddings = not config.tie_word_embeddings
    save_elm(new_model(config, seed), tok, out, Card(name=out.name, kind="seed" if out.name == "seed" else "elm"),
             **save)
    return out


def _eval(tmp_path, corpus_dir, *extra, check=True):
    return elmforest("eval", "--forest", "forest", "--corpus", corpus_dir, "--domains", "python", "--top-k", "1",
                     "--block-size", "32", "--max-eval-blocks", "2", "--prior-blocks", "2", "--work-dir",
                     tmp_path / "eval", *extra, cwd=tmp_path, check=check)


@pytest.mark.parametrize("preset", ["qwen2-tiny", "gpt2-tiny"])
def test_untied_model_is_refused_at_forest_add_and_the_forest_keeps_working(tmp_path, tok, corpus_dir, preset):
    assert preset_config(preset, tok).tie_word_embeddings  # both presets tie: the untied one is the stranger
    seed = _model(tok, preset, tmp_path / "seed")
    _model(tok, preset, tmp_path / "python", seed=1)
    untied = _model(tok, preset, tmp_path / "untied", seed=2, flip_tying=True)
    elmforest("forest", "init", "forest", "--seed", seed, cwd=tmp_path)
    elmforest("forest", "add", "forest", tmp_path / "python", "--domain", "python", cwd=tmp_path)
    manifest = (tmp_path / "forest" / "forest.json").read_bytes()

    r = elmforest("forest", "add", "forest", untied, "--domain", "kjv_bible", cwd=tmp_path, check=False)
    assert isinstance(r.exception, FamilyError), r.output
    msg = str(r.exception)
    assert msg.startswith(f"{untied} and the forest's seed (forest/seed) are of different model families: "
                          "tie_word_embeddings: False vs True; tensor names differ: extra ['lm_head.weight']"), msg
    assert (tmp_path / "forest" / "forest.json").read_bytes() == manifest
    assert not (tmp_path / "forest" / "elms" / "untied").exists()
    # what was accepted still averages and evaluates
    elmforest("average", "--forest", "forest", "--method", "uniform", "--out", "avg", cwd=tmp_path)
    _eval(tmp_path, corpus_dir)
    # and the family id, stored with forests and cards, tells the two apart too
    tied_cfg, untied_cfg = preset_config(preset, tok), preset_config(preset, tok)
    untied_cfg.tie_word_embeddings = False
    assert family_id(tied_cfg, tok) != family_id(untied_cfg, tok)


def test_other_architecture_message_starts_with_model_type_and_names_both(tmp_path, tok):
    f = Forest.init(tmp_path / "forest", _model(tok, "gpt2-tiny", tmp_path / "seed"))
    llama = _model(tok, "tiny", tmp_path / "llama")
    with pytest.raises(FamilyError) as e:
        f.add(llama)
    msg = str(e.value)
    head = f"{llama} and the forest's seed ({tmp_path / 'forest' / 'seed'}) are of different model families: "
    assert msg.startswith(head + "model_type: 'llama' vs 'gpt2'; tie_word_embeddings: False vs True; "), msg
    # then the other keys, then the tensors, a few named
    assert msg.index("other config keys:") < msg.index("tensor names differ: missing ['transformer.h.0.attn")
    assert "and 25 more" in msg and len(msg) < 1500
    assert Forest.load(tmp_path / "forest").names() == []


def test_a_bf16_copy_is_of_the_family_and_averages_with_fp32(tmp_path, tok):
    """Floating precision is storage, not family: a bf16 ELM in an fp32 forest averages (each
    input read in its own dtype, accumulated in fp32)."""
    f = Forest.init(tmp_path / "forest", _model(tok, "gpt2-tiny", tmp_path / "seed"))
    f.add(_model(tok, "gpt2-tiny", tmp_path / "fp32", seed=1))
    f.add(_model(tok, "gpt2-tiny", tmp_path / "bf16", seed=2, dtype=torch.bfloat16))
    paths = [e.path for e in f.elms]
    assert open_weights(paths[1]).signature()["transformer.wte.weight"][0] == "BF16"
    out = average_models(paths, [0.5, 0.5], tmp_path / "avg")
    want = average_in_memory(paths, [0.5, 0.5])
    for k, t in iter_tensors(open_weights(out)):
        assert t.dtype == torch.float32 and torch.equal(t, want[k]), k


def test_an_elm_accepted_before_the_check_is_named_by_eval_branch_and_average(tmp_path, tok, corpus_dir):
    """A forest written when tying was not checked may hold an untied ELM among tied ones:
    every command that mixes weights names it (rather than failing deep inside)."""
    f = Forest.init(tmp_path / "forest", _model(tok, "qwen2-tiny", tmp_path / "seed"))
    f.add(_model(tok, "qwen2-tiny", tmp_path / "python", seed=1), domain="python")
    untied = _model(tok, "qwen2-tiny", tmp_path / "stray", seed=2, flip_tying=True)
    shutil.copytree(untied, tmp_path / "forest" / "elms" / "stray")  # as an old `forest add` did
    m = json.loads((tmp_path / "forest" / "forest.json").read_text())
    m["elms"].append({**m["elms"][0], "name": "stray", "path": "elms/stray", "domain": "kjv_bible"})
    (tmp_path / "forest" / "forest.json").write_text(json.dumps(m))

    stray = "ELM 'stray' (forest/elms/stray) and the forest's seed (forest/seed) are of different model families"
    r = _eval(tmp_path, corpus_dir, check=False)
    assert isinstance(r.exception, FamilyError) and str(r.exception).startswith(stray), r.output
    r = elmforest("branch", "--forest", "forest", "--method", "uniform", "--out", "init", cwd=tmp_path, check=False)
    assert isinstance(r.exception, FamilyError) and str(r.exception).startswith(stray), r.output
    r = elmforest("average", "--forest", "forest", "--method", "uniform", "--out", "avg", cwd=tmp_path, check=False)
    assert isinstance(r.exception, FamilyError), r.output
    assert "tie_word_embeddings: False vs True; tensor names differ: extra ['lm_head.weight']" in str(r.exception)
