"""The Flower ClientApp of federated BTM rounds (`contributor_client.flower:app`): what an
institution's SuperNode runs. Its data never leaves it; it talks to the coordinator over
HTTP with its owner's API token through the same typed API (`Coordinator`) as `elmforest
branch request` and `elmforest submit`, and to the round's ServerApp through Flower with control messages only.

Node config (`flower-supernode --node-config "domain='python' data-dir='/data/python' ..."`):

  domain           the domain this node trains an ELM for (registered at the coordinator)
  data-dir         a domain directory (train.jsonl / valid.jsonl, or .txt files) or a file
  coordinator-url  the coordinator (default: ELMFOREST_URL, else `elmforest login`'s)
  token-file       a file holding the owner's API token (or `token`, or ELMFOREST_TOKEN,
                   else `elmforest login`'s); the ELM is uploaded as the owner's contribution
  work-dir         where the init and the ELM are written (default ~/.cache/elmforest/flower)
  cache-dir        token cache (default: btm's)
  max-steps        an upper bound on the training steps a round may ask of this node
  keep-files       true: keep the init and ELM directories after a successful upload

Message handlers (the protocol is documented in coordinator/federated/protocol.py):

  query         report the node's domain, its data size, its owner and its device
  query.branch  compute the domain posterior over the forest here (the forest's ELMs come down
                one at a time; only the weight vector goes to the coordinator) and request
                a branch init with the owner's token; answer with its id
  train         download the init by the URLs in the message (each file checked against the
                sha256 the coordinator holds for this owner's init), train it on the local
                data with btm's recipe, btm.recipes.train_elm, as `elmforest train` does (GPU
                if there is one), upload the ELM through the contributions API and answer
                with the contribution id and the metrics
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from contributor_client.api import Coordinator
from contributor_client.http import ClientError
from contributor_client.local import set_init_vector

log = logging.getLogger("elmforest.flower")

# the protocol's names (kept equal to coordinator/federated/protocol.py)
NODE, BRANCH, INIT, TRAIN, RESULT, METRICS = "node", "branch", "init", "train", "result", "metrics"

app = ClientApp()
# A SuperNode runs one ClientApp process per message. Where ClientApps share a process (the
# in-process LocalGrid with several workers), their threads load models one at a time: btm's
# load_model holds a lock for it (loading with transformers is not thread-safe), so the
# handlers here hold none of their own.


class NodeConfigError(ValueError):
    pass


@dataclass
class Node:
    domain: str
    data: Path
    url: str
    token: str
    work_dir: Path
    cache_dir: Path | None = None
    max_steps: int | None = None
    keep_files: bool = False

    def client(self) -> Coordinator:
        return Coordinator(self.url, self.token, timeout=120)


def node_settings(context: Context) -> Node:
    """The node's settings from its node config, with the login's defaults."""
    from contributor_client import config

    nc = dict(context.node_config)
    domain, data = node_data(nc)
    creds = config.load()
    max_steps = nc.get("max-steps")
    return Node(domain=domain, data=data, url=str(nc.get("coordinator-url") or creds.url),
                token=node_token(nc, creds.token),
                work_dir=config_path(nc, "work-dir") or Path.home() / ".cache" / "elmforest" / "flower",
                cache_dir=config_path(nc, "cache-dir"), max_steps=int(max_steps) if max_steps else None,
                keep_files=str(nc.get("keep-files", "")).lower() in ("1", "true", "yes"))


def node_data(nc: dict[str, Any]) -> tuple[str, Path]:
    """The node's domain and its data directory (which must exist on this node)."""
    domain = str(nc.get("domain") or "")
    if not domain:
        raise NodeConfigError("this SuperNode has no `domain` in its node config; start it with "
                              "--node-config \"domain='NAME' data-dir='/path/to/data'\"")
    data = config_path(nc, "data-dir")
    if data is None:
        raise NodeConfigError("this SuperNode has no `data-dir` in its node config")
    if not data.exists():
        raise NodeConfigError(f"data-dir {data} does not exist on this node")
    return domain, data


def node_token(nc: dict[str, Any], login_token: str | None) -> str:
    """The owner's API token: from `token-file` (which must exist), else `token`, else the
    login's (ELMFOREST_TOKEN or `elmforest login`)."""
    tf = config_path(nc, "token-file")
    if tf is not None and not tf.is_file():
        raise NodeConfigError(f"token-file {tf} does not exist on this node")
    token = (tf.read_text().strip() if tf is not None else "") or str(nc.get("token") or "") or login_token
    if not token:
        raise NodeConfigError("no API token for the coordinator: set `token-file` in the node config "
                              "(or ELMFOREST_TOKEN, or run `elmforest login` as the node's owner)")
    return token


def config_path(nc: dict[str, Any], key: str) -> Path | None:
    """A path setting of the node config (`~` expanded), or None where it is unset or empty."""
    return Path(str(nc[key])).expanduser() if nc.get(key) else None


def train_source(data: Path) -> Path:
    """The file (or directory) of training documents: a domain directory's train split."""
    from btm.data import split_source

    return split_source(data, ("train",))


def data_size(data: Path) -> tuple[int, int]:
    """(documents, bytes) of the training split, cheaply (lines of JSONL files, .txt files
    as one document each; nothing parsed): only these counts are sent."""
    src = train_source(data)
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
    docs = 0
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                docs += sum(1 for line in fh if line.strip())
        else:
            docs += 1
    return docs, sum(f.stat().st_size for f in files)


def describe(e: BaseException) -> str:
    """What a node says about its own failure: the message of the errors this code raises
    (they name files and settings, never document text), else only the error's type."""
    from btm.errors import BTMError

    if isinstance(e, (ClientError, BTMError, NodeConfigError)):
        return f"{type(e).__name__}: {str(e)[:1000]}"
    return f"{type(e).__name__} (details in the SuperNode's log)"


def reply(msg: Message, records: dict[str, dict[str, Any]], metrics: dict[str, float] | None = None) -> Message:
    content = RecordDict({name: ConfigRecord(values) for name, values in records.items()})
    if metrics:
        content[METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


# ----------------------------------------------------------------------------- handlers


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which domain, how much data, whose node, which device."""
    info: dict[str, Any] = {"domain": str(context.node_config.get("domain") or "")}
    try:
        node = node_settings(context)
        info["owner"] = str(node.client().whoami().username)
        info["documents"], info["bytes"] = data_size(node.data)
        import torch

        info["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        return reply(msg, {NODE: {"ok": True, **info}})
    except Exception as e:
        log.exception("query failed")
        return reply(msg, {NODE: {"ok": False, **info, "error": describe(e)}})


@app.query("branch")
def branch(msg: Message, context: Context) -> Message:
    """The domain posterior over the forest, computed here; then a branch init requested
    with the owner's token (the coordinator computes the average as a job)."""
    try:
        node = node_settings(context)
        ask = msg.content[BRANCH]
        forest, domain = str(ask["forest"]), str(ask["domain"])
        if domain != node.domain:
            raise NodeConfigError(f"asked to branch for domain {domain!r}; this node serves {node.domain!r}")
        b = node.client().request_branch(forest, node.domain, data=node.data, private=True, wait=False,
                                         log=log.info)
        if b.routing_vector is not None:  # computed here; goes into the init when it comes down
            node.work_dir.mkdir(parents=True, exist_ok=True)
            (node.work_dir / f"routing-vector-{int(b.id)}.json").write_text(json.dumps(b.routing_vector))
        return reply(msg, {BRANCH: {"ok": True, "branch-init-id": int(b.id)}})
    except Exception as e:
        log.exception("branch request failed")
        return reply(msg, {BRANCH: {"ok": False, "error": describe(e)}})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Download the init by reference, train on the local data, upload the ELM."""
    try:
        node = node_settings(context)
        result, metrics = train_and_submit(node, dict(msg.content[INIT]), dict(msg.content[TRAIN]))
        return reply(msg, {RESULT: {"ok": True, **result}}, metrics)
    except Exception as e:
        log.exception("training failed")
        return reply(msg, {RESULT: {"ok": False, "error": describe(e)}})


def train_and_submit(node: Node, init: dict[str, Any], settings: dict[str, Any]) -> tuple[dict, dict]:
    """Fetch the init the round names, train it here with btm's recipe (btm.recipes.train_elm,
    as `elmforest train` does), upload the ELM; (the contribution, the training's metrics)."""
    from btm.family import read_card
    from btm.recipes import train_elm
    from btm.train_config import TrainConfig

    init_id, forest, name = int(init["branch-init-id"]), str(init["forest"]), str(init["name"])
    round_id = int(init.get("round-id", 0))
    client = node.client()
    work = node.work_dir / f"round-{round_id}-init-{init_id}"
    init_dir = fetch_init(node, client, init, work / "init")
    steps = int(settings["steps"])
    if node.max_steps:
        steps = min(steps, node.max_steps)
    cfg = TrainConfig.from_record(settings, steps=steps, progress=False)
    t0 = time.perf_counter()
    out = train_elm(init_dir, work / "elm", [train_source(node.data)], cfg, domain=node.domain, name=name,
                    data={"domain": node.domain, "federated_round": round_id}, cache_dir=node.cache_dir)
    seconds = time.perf_counter() - t0
    c = client.submit(out, forest=forest, branch_init_id=init_id, name=name, log=log.info)
    trained = read_card(out).training
    if not node.keep_files:
        shutil.rmtree(work, ignore_errors=True)
        (node.work_dir / f"routing-vector-{init_id}.json").unlink(missing_ok=True)
    metrics = {"loss": float(trained.get("final_loss", float("nan"))), "steps": float(steps),
               "tokens": float(trained.get("tokens", 0)), "seconds": round(seconds, 3)}
    return {"contribution-id": int(c.id), "state": str(c.state), "name": str(c.name)}, metrics


def fetch_init(node: Node, client: Coordinator, init: dict[str, Any], dest: Path) -> Path:
    """The branch init the round's message names, downloaded to `dest` with every file
    sha256-checked, and the routing vector computed here when it asked for it put in its card.
    The init must be this owner's, for this node's domain, with exactly these files: the node
    trusts its coordinator (reached with its owner's token), not the message."""
    init_id, forest = int(init["branch-init-id"]), str(init["forest"])
    files, urls = json.loads(init["files"]), json.loads(init["urls"])
    mine = client.branch_init(init_id)
    if mine.domain != node.domain:
        raise NodeConfigError(f"branch init {init_id} is for domain {mine.domain!r}; this node serves {node.domain!r}")
    if mine.files != files or mine.forest != forest:
        raise NodeConfigError(f"the files the round names for branch init {init_id} differ from the coordinator's")
    init_dir = client.download_files(files, same_origin(urls, mine.urls), dest, log=log.info)
    vector = node.work_dir / f"routing-vector-{init_id}.json"
    if vector.exists():
        set_init_vector(init_dir, json.loads(vector.read_text()))
    return init_dir


def same_origin(given: dict[str, str], coordinator: dict[str, str]) -> dict[str, str]:
    """The round's download URLs, each only if it points where the coordinator's own URL for
    that file does (its store); otherwise the coordinator's. A round message cannot make a
    node fetch from anywhere else."""
    from urllib.parse import urlsplit

    def origin(u: str) -> tuple[str, str]:
        x = urlsplit(u)
        return x.scheme, x.netloc

    out = {}
    for name, url in coordinator.items():
        msg_url = given.get(name)
        if isinstance(msg_url, str) and origin(msg_url) == origin(url):
            out[name] = msg_url
        else:
            log.warning("the round's URL for %s does not point at the coordinator's store; using the coordinator's", name)
            out[name] = url
    return out
