"""A forest as a Hugging Face Hub repository, and back.

    OUT/README.md        the model card: what the forest is, its domains and ELMs, lineage, use
        config.json      the ensemble as a transformers model (ForestConfig: experts = elms/*,
                         the router and the ELMs' routing vectors), with auto_map to the code:
        forest_model.py routing.py weights.py errors.py model_files.py   its code (remote code)
        tokenizer files  the seed's, so tools that load a tokenizer from the repository find one
        forest.json      the manifest, as in the forest directory (every file's sha256)
        seed/ elms/<name>/ averages/<name>/   plain Hugging Face model directories

`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` loads it where elmforest is
not installed (the code travels in the repository, as custom architectures on the Hub do),
and so does `lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True`.

Push OUT with `hf upload org/name OUT` (or any git client); `forest import` reads it back from
a directory or a Hub id and checks every file against the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from btm import atomic
from btm.errors import ForestError
from btm.family import metric_text
from btm.forest import MANIFEST, Forest, copy_model_dir, listed_weights, model_files
from btm.model_files import CARD, FOREST_HUB_PATTERNS, PICKLE_SUFFIXES

PICKLED = [f"*{s}" for s in PICKLE_SUFFIXES]
# the model's code, copied from btm as it is: these import nothing but each other, torch and transformers
REMOTE_CODE = ("forest_model.py", "routing.py", "weights.py", "errors.py", "model_files.py")
AUTO_MAP = {"AutoConfig": "forest_model.ForestConfig", "AutoModelForCausalLM": "forest_model.ForestForCausalLM"}


def export(forest: Forest, out: str | os.PathLike, averages: dict[str, Path] | None = None) -> Path:
    """Write `forest` (and any averaged models, {name: directory}) in the Hub layout."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ForestError(f"{out} exists and is not empty; export into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    m = json.loads(json.dumps(forest.manifest))
    for entry in [m["seed"], *m["elms"]]:
        copy_model_dir(forest.root / entry["path"], out / entry["path"])
    m["averages"] = []
    for name, src in (averages or {}).items():
        copy_model_dir(Path(src), out / "averages" / name)
        m["averages"].append({"name": name, "path": f"averages/{name}", "files": model_files(out / "averages" / name)})
    atomic.write_text(out / MANIFEST, json.dumps(m, indent=2))
    from btm.family import load_config
    from btm.forest_model import ForestConfig, max_positions
    from btm.routing import forest_vectors

    ref = load_config(out / "seed")
    vectors = forest_vectors(m)  # each text routed: by the centroid router where every ELM has a vector
    ForestConfig(experts=[e["path"] for e in m["elms"]], names=[e["name"] for e in m["elms"]],
                 router="centroid" if vectors else "prompt", routing_vectors=vectors, seed=m["seed"]["path"],
                 vocab_size=ref.vocab_size, max_position_embeddings=max_positions(ref),
                 bos_token_id=ref.bos_token_id, eos_token_id=ref.eos_token_id, auto_map=AUTO_MAP,
                 ).save_pretrained(str(out))
    _write_code_and_tokenizer(out)
    atomic.write_text(out / CARD, card(m))
    return out


def _write_code_and_tokenizer(out: Path) -> None:
    """The model's code beside its config, and the seed's tokenizer files at the top."""
    from btm.model_files import CONFIG, is_aux_file

    here = Path(__file__).parent
    for name in REMOTE_CODE:
        shutil.copyfile(here / name, out / name)
    for f in (out / "seed").iterdir():
        if f.is_file() and is_aux_file(f.name) and f.name != CONFIG:
            shutil.copyfile(f, out / f.name)


def card(m: dict) -> str:
    """The repository's model card: the domain table and the lineage of every ELM."""
    lines = [
        "---", "library_name: transformers", "tags: [elmforest, branch-train-merge, ensemble]", "---", "",
        f"# {m['name']}: a forest of expert language models (version {m['version']})", "",
        "Grown by Branch-Train-Merge with elmforest: a seed LM, and one expert LM (ELM) "
        "per domain branched from it and trained on that domain alone. Use the forest as a sparse ensemble "
        "(the experts weighted by the domain posterior of your text) or collapse it into one model by a "
        "posterior-weighted parameter average. An ELM imported from elsewhere (a fine-tune of the seed "
        "on the Hub) is named with its source in the lineage.", "",
        "## Domains and experts", "", "| ELM | domain | parents (weight) | metrics |", "| --- | --- | --- | --- |",
    ]
    lines += [_domain_row(e) for e in m["elms"]]
    lines += ["", "## Lineage", "", "Each ELM started as the weighted average of its parents (the new domain's "
              "posterior over the forest when it branched):", "", "```"]
    lines += [_lineage(e) for e in m["elms"]]
    lines += ["```", ""]
    if m.get("averages"):
        lines += ["## Averaged models", ""] + [f"- `{a['path']}`" for a in m["averages"]] + [""]
    lines += [
        "## Use", "", "With transformers alone (the model's code is in this repository):", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'forest = AutoModelForCausalLM.from_pretrained("ORG/NAME", trust_remote_code=True, top_k=2)',
        'tokenizer = AutoTokenizer.from_pretrained("ORG/NAME")',
        "# each prompt runs the 2 experts that fit it; forest.routes says which", "```", "",
        "```bash", "lm_eval --model hf --model_args pretrained=ORG/NAME,trust_remote_code=True --tasks ...", "```", "",
        "With elmforest installed:", "", "```bash", "elmforest forest import ORG/NAME forest",
        'elmforest generate --forest forest --prompt "..." --top-k 2   # the experts that fit each prompt',
        "elmforest eval --forest forest --corpus DIR",
        "elmforest lm-eval --model elmforest --model_args forest=forest,top_k=2 --tasks ...", "```", "", "```python",
        "import btm.forest_model  # registers the ensemble with transformers' Auto classes",
        "from transformers import AutoModelForCausalLM",
        'forest = AutoModelForCausalLM.from_pretrained("forest", top_k=2)  # each text routed to its 2 experts',
        "from btm.forest_model import ForestForCausalLM",
        'forest = ForestForCausalLM.from_forest("forest", top_k=2, target="my_domain_text.jsonl")  # a cached prior',
        "```", "",
        "Every ELM is also a plain model: `AutoModelForCausalLM.from_pretrained(\"forest/elms/NAME\")`.", "",
        "## History", "",
    ]
    lines += [_history_line(h) for h in m.get("history", [])]
    return "\n".join(lines) + "\n"


def _domain_row(e: dict) -> str:
    """An ELM's row of the domain table: where it came from, its domain, parents and first four numbers."""
    parents = listed_weights((p["name"], p["weight"]) for p in e.get("parents", [])) or _no_parents(e)
    metrics = ", ".join(f"{k} {metric_text(v, 2)}"
                        for k, v in list(e.get("metrics", {}).items())[:4] if isinstance(v, (int, float)))
    src = f" (from `{e['source']['hub']}`)" if e.get("source") else ""
    return f"| `{e['path']}`{src} | {e.get('domain') or ''} | {parents} | {metrics} |"


def _lineage(e: dict) -> str:
    return f"{e['name']} <- " + (" + ".join(f"{p['weight']:.2f} {p['name']}" for p in e.get("parents", []))
                                 or _no_parents(e))


def _history_line(h: dict) -> str:
    return f"- v{h['version']} {h['action']} {h.get('elm', '')}" + (f": {h['reason']}" if h.get("reason") else "")


def _no_parents(e: dict) -> str:
    """What an ELM without recorded parents descends from: its import source, else the seed."""
    src = e.get("source")
    return f"imported from {src['hub']}@{src['revision'][:12]}" if src else "seed"


def import_(src: str | os.PathLike, out: str | os.PathLike, revision: str | None = None) -> Forest:
    """A forest from the Hub layout: a directory, or a Hub id fetched (safetensors and text
    files only; never a pickle). Every file must match the manifest's sha256."""
    from btm.hub import is_hub_id, split

    out = Path(out)
    if (out / MANIFEST).exists():
        raise ForestError(f"{out}: a forest already exists here; import into a new directory")
    path = Path(src)
    source = None
    if is_hub_id(src):
        from btm.hub import _download

        repo, rev = split(str(src), revision)
        path = _download(repo, rev, FOREST_HUB_PATTERNS)
        source = {"hub": repo, "revision": path.name, "requested": rev}
    elif not (path / MANIFEST).exists():
        raise ForestError(f"{src}: no {MANIFEST}; give an exported forest (a directory or a Hub id)")
    with atomic.replacing(out, out.name + ".importing") as tmp:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(path, tmp, symlinks=False, ignore=shutil.ignore_patterns(*PICKLED, ".git*", ".cache"))
        f = Forest.load(tmp)
        problems = f.verify()
        if problems:
            raise ForestError(f"{src}: files differ from its manifest ({'; '.join(problems[:3])}); nothing imported")
        if source:
            f.manifest["imported_from"] = source
            atomic.write_text(tmp / MANIFEST, json.dumps(f.manifest, indent=2))
    return Forest.load(out)
