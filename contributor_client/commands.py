"""The contributor's workflow as functions over the HTTP client and btm: request a branch
init (with a sample, or privately: the posterior and the routing vector computed here) and
download it, submit a trained ELM (resumable upload) and follow it, download forests,
averaged models and MoE exports; for maintainers, register a seed or a baseline, import an
existing checkpoint and tune an MoE export's routers. Training itself is btm's (`elmforest
train`). The CLI, the demo and the Flower ClientApp are thin layers over these."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from btm.model_files import CONFIG, TOKENIZER_PREFIX, WEIGHTS_FILE, is_upload_file
from contributor_client.http import Client, ClientError, sha256_file

Log = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


# ----------------------------------------------------------------------------- samples


def sample_file(data: Path, max_bytes: int, out: Path) -> Path:
    """A small JSONL sample of a data directory or file (its validation split if it has one)."""
    from btm.data import read_documents, split_source

    src = split_source(data, ("valid", "train"))
    n = 0
    with open(out, "w") as f:
        for doc in read_documents(src):
            line = json.dumps({"text": doc}) + "\n"
            if n + len(line.encode()) > max_bytes and n:
                break
            f.write(line)
            n += len(line.encode())
    if n == 0:
        from btm.errors import DataError

        raise DataError(f"{data}: no text to sample")
    return out


# ----------------------------------------------------------------------------- forests


def download_files(client: Client, files: dict[str, str], urls: dict[str, str], dest: Path, log: Log = _quiet) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name, sha in files.items():
        p = dest / name
        if p.exists() and sha256_file(p) == sha:
            continue
        log(f"downloading {name}")
        client.download(urls[name], p, sha)
    return dest


def download_forest(client: Client, forest: str, dest: Path, version: int | None = None, log: Log = _quiet) -> Path:
    """A published version as a btm forest directory (forest.json, seed/, elms/<name>/)."""
    d = client.get(f"/forests/{forest}/download", version=version)
    m = d["manifest"]
    for entry in [m["seed"], *m["elms"]]:
        urls = {name: d["files"][f"{entry['path']}/{name}"] for name in entry["files"]}
        download_files(client, entry["files"], urls, dest / entry["path"], log)
    (dest / "forest.json").write_text(json.dumps(m, indent=2))
    (dest / "versions").mkdir(exist_ok=True)
    (dest / "versions" / f"{m['version']}.json").write_text(json.dumps(m, indent=2))
    return dest


def private_routing_vector(client: Client, forest: str, data: Path, work: Path, log: Log = _quiet) -> list[float]:
    """The new ELM's routing vector (btm.routing), computed here: the forest's seed comes down
    (one model, removed again after) and its mean last hidden state over the contributor's text
    is what goes to the coordinator, with the ELM; the text stays here."""
    from btm.recipes import routing_vector

    d = client.get(f"/forests/{forest}/download")
    files = d["manifest"]["seed"]["files"]
    seed = download_files(client, files, {k: d["files"][f"seed/{k}"] for k in files}, work / "seed", log)
    log("computing the routing vector of your text under the forest's seed")
    try:
        return routing_vector(seed, data)
    finally:
        shutil.rmtree(seed, ignore_errors=True)


def set_init_vector(init_dir: Path, vector: list[float]) -> None:
    """Keep a routing vector in an init's card (`origin`): `elmforest train` carries it into
    the ELM, and `submit` sends it."""
    from btm.family import read_card, write_card

    card = read_card(init_dir)
    card.origin = {**(card.origin or {}), "routing_vector": [float(x) for x in vector]}
    write_card(init_dir, card)


def private_posterior(client: Client, forest: str, data: Path, work: Path, block_size: int = 256,
                      max_blocks: int = 100, log: Log = _quiet) -> tuple[dict[str, float], int]:
    """The domain posterior over the current version's ELMs, computed here: the ELMs come
    down one at a time (memory and disk of one ELM) and only the weights go back."""
    import numpy as np

    from btm.data import encode_texts, eval_blocks, read_documents, split_source
    from btm.posterior import cached_prior, sequence_logliks
    from btm.tokenizer import load_tokenizer

    d = client.get(f"/forests/{forest}/download")
    m = d["manifest"]
    if not m["elms"]:
        return {}, m["version"]
    seed = m["seed"]
    tok_files = {k: v for k, v in seed["files"].items() if k.startswith(TOKENIZER_PREFIX) or k == CONFIG}
    tok_dir = download_files(client, tok_files, {k: d["files"][f"seed/{k}"] for k in tok_files}, work / "tokenizer", log)
    tok = load_tokenizer(tok_dir)
    tokens = encode_texts(tok, read_documents(split_source(data, ("valid", "train"))))
    blocks = eval_blocks(tokens, min(block_size, max(8, len(tokens) - 1)), max_blocks)
    cols = []
    for e in m["elms"]:
        log(f"scoring the sample under {e['name']}")
        edir = work / "elm"
        shutil.rmtree(edir, ignore_errors=True)
        download_files(client, e["files"], {k: d["files"][f"{e['path']}/{k}"] for k in e["files"]}, edir)
        cols.append(sequence_logliks([edir], blocks)[:, 0])
        shutil.rmtree(edir, ignore_errors=True)
    prior = cached_prior(np.stack(cols, axis=1))
    return {e["name"]: float(p) for e, p in zip(m["elms"], prior, strict=True)}, m["version"]


def local_files(model_dir: Path) -> dict[str, str]:
    return {f.name: sha256_file(f) for f in sorted(Path(model_dir).iterdir()) if f.is_file() and is_upload_file(f.name)}


def register_seed(client: Client, name: str, seed_dir: Path, description: str = "", progress=None) -> tuple[dict, bool]:
    """Register a seed as the root of forest `name`; (forest, created). Running it again with
    the same seed is a no-op, so a restarted cluster job registers its seed exactly once."""
    try:
        f = client.forest(name)
    except ClientError as e:
        if e.status != 404:
            raise
        return client.create_forest(name, seed_dir, description, progress), True
    seed = client.get(f"/forests/{name}/versions/1")["seed"]["files"]
    if seed != local_files(seed_dir):
        raise ClientError(f"forest {name!r} already exists with another seed; choose another name")
    return f, False


def register_baseline(client: Client, forest: str, name: str, model_dir: Path, description: str = "",
                      progress=None) -> dict:
    files = client.upload_model(model_dir, progress)
    return client.post(f"/forests/{forest}/baselines", {"name": name, "description": description, "files": files})


# ----------------------------------------------------------------------------- branch, train, submit


def request_branch(client: Client, forest: str, domain: str, data: Path | None = None, private: bool = False,
                   method: str = "posterior", wait: bool = True, log: Log = _quiet, max_sample_bytes: int = 1 << 20) -> dict:
    """Ask for a branch init. With `data` and `private`, the posterior and the ELM's routing
    vector are computed here (no text is sent); the vector comes back as the answer's
    "routing_vector" (this client's addition), which `download_init` keeps in the init's card."""
    body: dict = {"forest": forest, "domain": domain, "method": method}
    vector = None
    if data is not None and private:
        with tempfile.TemporaryDirectory() as td:
            vector = private_routing_vector(client, forest, data, Path(td), log)
            post = private_posterior(client, forest, data, Path(td), log=log)[0] if method in ("posterior", "argmax") else {}
        if post:
            body["posterior"] = post
    elif data is not None and method in ("posterior", "argmax"):
        with tempfile.TemporaryDirectory() as td:
            s = sample_file(data, max_sample_bytes, Path(td) / "sample.jsonl")
            body["sample_sha256"] = client.upload(s, "sample")["sha256"]
    b = client.post("/branch-inits", body)
    if wait and b["status"] == "requested":
        log(f"branch init {b['id']} is being computed")
        b = client.wait(lambda: client.get(f"/branch-inits/{b['id']}"), lambda x: x["status"] != "requested")
    if b["status"] == "failed":
        raise ClientError(f"the coordinator could not compute branch init {b['id']}: {b['error']}")
    if vector is not None:
        b["routing_vector"] = vector
    return b


def download_init(client: Client, branch: dict, dest: Path, log: Log = _quiet) -> Path:
    """The init's files; its card's `origin` names the forest, version and branch init (and
    the routing vector computed here, for a private request), and `elmforest train` carries
    it into the ELM, so `submit` knows what it was trained from."""
    out = download_files(client, branch["files"], branch["urls"], dest, log)
    if branch.get("routing_vector") is not None:
        set_init_vector(out, branch["routing_vector"])
    return out


def submit(client: Client, elm_dir: Path, forest: str | None = None, branch_init_id: int | None = None,
           name: str | None = None, progress: Callable[[int, int], None] | None = None, log: Log = _quiet) -> dict:
    """Upload a trained ELM (resumable: run it again after an interruption and it continues
    from the last part that arrived)."""
    from btm.family import read_card
    from btm.tokenizer import load_tokenizer, tokenizer_sha256

    elm_dir = Path(elm_dir)
    weights = elm_dir / WEIGHTS_FILE
    if not weights.exists():
        raise ClientError(f"{elm_dir}: no model.safetensors; train the ELM first (`elmforest train`)")
    card = read_card(elm_dir)
    info = card.origin or {}
    forest = forest or info.get("forest")
    branch_init_id = branch_init_id or info.get("branch_init_id")
    if not forest or not branch_init_id:
        raise ClientError(f"{elm_dir}: which branch init was this trained from? pass --forest and --branch-init")
    sha = sha256_file(weights)
    body = {
        "forest": forest, "branch_init_id": branch_init_id, "forest_version": info.get("version"),
        "name": name, "sha256": sha, "size": weights.stat().st_size,
        "config": json.loads((elm_dir / CONFIG).read_text()),
        "tokenizer_sha256": tokenizer_sha256(load_tokenizer(elm_dir)),
        "training": {**card.training, "data": card.data},
    }
    if info.get("routing_vector") is not None and info.get("forest") == forest:  # computed where it was trained privately
        body["routing_vector"] = info["routing_vector"]
    return _upload(client, weights, "/contributions", body, elm_dir / ".elmforest-submit.json", progress, log)


def import_checkpoint(client: Client, forest: str, source: str, domain: str, name: str | None = None,
                      revision: str | None = None, progress: Callable[[int, int], None] | None = None,
                      log: Log = _quiet) -> dict:
    """For maintainers: bring an existing checkpoint (a local directory, or a Hub id
    `org/name[@rev]` fetched through huggingface_hub) into a forest as the ELM of `domain`.
    It is validated like a contribution and evaluated against the forest's seed."""
    from btm.family import read_card
    from btm.hub import resolve
    from btm.tokenizer import load_tokenizer, tokenizer_sha256

    r = resolve(source, revision)
    weights = r.path / WEIGHTS_FILE
    if not weights.exists():
        raise ClientError(f"{source}: no single model.safetensors (sharded or missing weights); an import uploads "
                          "one file: save the model with save_pretrained(..., max_shard_size='1000GB') first")
    where = r.source or {"path": str(Path(source).resolve()),
                         "files": {f.name: sha256_file(f) for f in sorted(r.path.iterdir()) if f.is_file()}}
    card = read_card(r.path)
    body = {
        "domain": domain, "name": name, "sha256": where["files"][WEIGHTS_FILE], "size": weights.stat().st_size,
        "config": json.loads((r.path / CONFIG).read_text()),
        "tokenizer_sha256": tokenizer_sha256(load_tokenizer(r.path)),
        "source": {k: where[k] for k in ("hub", "revision", "requested", "path", "files") if k in where},
        "training": {**card.training, "data": card.data} if card.training or card.data else {},
    }
    from contributor_client.config import config_dir

    # the resume state lives with the client, not in the (possibly read-only) Hub cache
    state = config_dir() / "imports" / f"{forest}-{body['sha256'][:16]}.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    return _upload(client, weights, f"/forests/{forest}/imports", body, state, progress, log)


def _upload(client: Client, weights: Path, create: str, body: dict, state_path: Path, progress, log: Log) -> dict:
    """Declare an ELM at `create`, then send its weights in parts (resumable: run it again
    after an interruption and it continues from the last part that arrived; `state_path`
    remembers which contribution it was)."""
    sha = body["sha256"]
    try:
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
    except ValueError:
        state = {}
    if state.get("sha256") != sha or state.get("url") != client.url:
        state = {}
    if not state.get("contribution_id"):
        r = client.post(create, body)
        state = {"contribution_id": r["contribution"]["id"], "sha256": sha, "url": client.url}
        state_path.write_text(json.dumps(state))
        up = r["upload"]
        log(f"contribution {state['contribution_id']} created; uploading {weights.stat().st_size:,} bytes")
    else:
        c = client.get(f"/contributions/{state['contribution_id']}")
        if c["state"] != "uploading":
            state_path.unlink(missing_ok=True)
            return c
        up = client.get(f"/contributions/{state['contribution_id']}/upload")
        log(f"resuming the upload of contribution {state['contribution_id']} ({len(up['parts_done'])} parts already sent)")
    client.put_parts(weights, up, progress)
    c = client.complete(f"/contributions/{state['contribution_id']}/complete")
    state_path.unlink(missing_ok=True)
    return c


SETTLED = {"evaluated", "rejected", "approved", "declined", "merged", "removed", "abandoned"}


def follow(client: Client, cid: int, until: set[str] | None = None, timeout: float = 3600,
           on_change: Callable[[dict], None] | None = None) -> dict:
    """Poll a contribution until it reaches one of `until`, or until the job working on it
    fails (then it waits for a maintainer's retry or its owner's decision, not for us)."""
    until = until or SETTLED
    seen = {"state": None}

    def poll(x):
        if x["state"] != seen["state"]:
            seen["state"] = x["state"]
            if on_change:
                on_change(x)

    def settled(x) -> bool:
        return x["state"] in until or (x.get("job") or {}).get("status") == "failed"

    return client.wait(lambda: client.get(f"/contributions/{cid}"), settled, timeout=timeout, on_poll=poll)


def download_average(client: Client, forest: str, method: str, domain: str | None, dest: Path,
                     version: int | None = None, log: Log = _quiet) -> Path:
    a = client.post(f"/forests/{forest}/averages", {"method": method, "domain": domain}, version=version)
    if a["status"] == "requested":
        log("the averaged model is being built")
        a = client.wait(lambda: client.get(f"/forests/{forest}/averages/{a['id']}"), lambda x: x["status"] != "requested")
    if a["status"] == "failed":
        raise ClientError(f"the coordinator could not build the averaged model: {a['error']}")
    return download_files(client, a["files"], a["urls"], dest, log)


def moe_export(client: Client, forest: str, version: int | None = None, experts_per_token: int | None = None,
               backbone: str = "uniform", domain: str | None = None, log: Log = _quiet) -> dict:
    """A version's MoE export with these options (default: the current version), built by the
    coordinator if it is new; waits until it is ready."""
    m = client.post(f"/forests/{forest}/moe", {"experts_per_token": experts_per_token, "backbone": backbone,
                                               "domain": domain}, version=version)
    return _ready(client, forest, m, "the MoE export", log)


def _ready(client: Client, forest: str, m: dict, what: str, log: Log) -> dict:
    if m["status"] == "requested":
        log(f"{what} (MoE {m['id']}) is being built")
        m = client.wait(lambda: client.get(f"/forests/{forest}/moe/{m['id']}"), lambda x: x["status"] != "requested")
    if m["status"] == "failed":
        raise ClientError(f"the coordinator could not build {what} (MoE {m['id']}): {m['error']}")
    return m


def download_moe(client: Client, forest: str, dest: Path, version: int | None = None,
                 experts_per_token: int | None = None, backbone: str = "uniform", domain: str | None = None,
                 moe_id: int | None = None, log: Log = _quiet) -> dict:
    """A version as one native mixture-of-experts model in `dest` (each file checked against
    its sha256), or the MoE export or tuning `moe_id`. Returns its description."""
    if moe_id is not None:
        m = _ready(client, forest, client.get(f"/forests/{forest}/moe/{moe_id}"), "the MoE model", log)
    else:
        m = moe_export(client, forest, version, experts_per_token, backbone, domain, log)
    download_files(client, m["files"], m["urls"], dest, log)
    return m


def tune_router(client: Client, forest: str, steps: int, version: int | None = None, whole: bool = False,
                batch_size: int = 8, block_size: int = 128, lr: float = 1e-3, experts_per_token: int | None = None,
                backbone: str = "uniform", domain: str | None = None, moe_id: int | None = None,
                log: Log = _quiet) -> dict:
    """For maintainers: tune the routers of a version's MoE export (made first if need be, or
    the export `moe_id`) on the coordinator; waits until the tuned model is ready."""
    parent = (_ready(client, forest, client.get(f"/forests/{forest}/moe/{moe_id}"), "the MoE export", log)
              if moe_id is not None else moe_export(client, forest, version, experts_per_token, backbone, domain, log))
    t = client.post(f"/forests/{forest}/moe/{parent['id']}/tune", {"steps": steps, "whole": whole,
                                                                   "batch_size": batch_size,
                                                                   "block_size": block_size, "lr": lr})
    return _ready(client, forest, t, "the router tuning", log)


# ----------------------------------------------------------------------------- values


def values(client: Client, forest: str, version: int | None = None, contributors: bool = False,
           wait: float = 0, log: Log = _quiet) -> dict:
    """A version's values (default: the current one): per ELM and domain, or per contributor with
    the wanted domains. With `wait` seconds, a 409 (not evaluated yet, values being computed)
    is waited out; otherwise it is raised with what to wait for."""
    import time

    version = version or client.get(f"/forests/{forest}")["current_version"]
    path = f"/forests/{forest}/versions/{version}/values" + ("/contributors" if contributors else "")
    end = time.monotonic() + wait
    while True:
        try:
            return client.get(path)
        except ClientError as e:
            if e.status != 409 or time.monotonic() > end:
                raise
            log(str(e))
            time.sleep(2)


def values_table(rep: dict) -> str:
    """Plain-text tables of a version's values: per ELM the leave-one-out change (%) and the
    Shapley value (nats per token, ± standard error) on each domain, and their means."""
    doms = rep["domains"]
    w = max([12, *(len(e["name"]) for e in rep["elms"])])
    head = f"{'ELM':<{w}} " + " ".join(f"{d['name'][:16]:>16}" for d in doms) + f" {'mean':>9}"
    cell = {(x["elm"], d["name"]): x for d in doms for x in d["elms"]}
    lines = [f"forest {rep['forest']} v{rep['version']}: leave-one-out (ppl without / ppl with - 1) and Shapley "
             f"value (nats/token over the seed, {rep['permutations']} orderings, ± s.e.)", "", head]
    for e in rep["elms"]:
        row = []
        for d in doms:
            x = cell.get((e["name"], d["name"]))
            row.append(f"{x['loo'] * 100:+6.2f}% {x['shapley']:+.3f}" if x else f"{'':>16}")
        lines.append(f"{e['name']:<{w}} " + " ".join(f"{c:>16}" for c in row)
                     + f" {e['shapley_mean']:+9.4f}")
    lines.append(f"{'forest ppl':<{w}} " + " ".join(f"{d['forest_ppl']:>16.2f}" for d in doms))
    lines.append(f"{'seed ppl':<{w}} " + " ".join(f"{d['seed_ppl']:>16.2f}" for d in doms))
    lines.append(f"{'improvement':<{w}} " + " ".join(f"{d['improvement']:>+16.4f}" for d in doms))
    return "\n".join(lines)


def contributors_table(rep: dict) -> str:
    lines = [f"forest {rep['forest']} v{rep['version']}: each contributor's ELMs together (mean over domains)", "",
             f"{'contributor':<20} {'ELMs':>4} {'Shapley':>10} {'leave-one-out':>14}"]
    for c in rep["contributors"]:
        lines.append(f"{c['name']:<20} {len(c['elms']):>4} {c['shapley_mean']:>+10.4f} {c['loo_mean'] * 100:>+13.2f}%")
    if rep["wanted"]:
        lines += ["", "wanted domains (where the forest is weakest against the baseline):"]
        for x in rep["wanted"]:
            lines.append(f"  {x['domain']:<20} forest {x['forest_ppl']:.2f} vs {x['baseline']} {x['baseline_ppl']:.2f}"
                         + ("  (behind)" if x["behind"] else ""))
    return "\n".join(lines)


def preview_table(p: dict) -> str:
    lines = [f"merging contribution {p['contribution_id']} into version {p['forest_version']} "
             f"(own domain {p['own_domain']}):", "", f"{'domain':<20} {'before':>9} {'after':>9} {'change':>9}"]
    for dn, x in sorted(p["domains"].items(), key=lambda kv: (kv[0] != p["own_domain"], kv[0])):
        lines.append(f"{dn:<20} {x['before_ppl']:>9.2f} {x['after_ppl']:>9.2f} {x['change'] * 100:>+8.2f}%")
    return "\n".join(lines)
