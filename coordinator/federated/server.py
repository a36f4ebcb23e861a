"""The ServerApp of a federated BTM round (`coordinator.federated.server:app`).

It runs where the coordinator's settings are (ELMFOREST_* as for `elmforest serve` and
`elmforest worker`: it reads and writes the coordinator's database and signs download URLs
of its object store), e.g. next to the SuperLink. One Flower run = one round:

  1. wait for nodes; ask each its domain and data size (query)
  2. decide who trains (coordinator.federated.logic.plan)
  3. each chosen node computes its domain posterior locally and requests its branch init
     from the coordinator with its owner's token (query.branch); the server checks the init
  4. once the coordinator has computed the inits, send each node its own train message:
     the init by reference (download URLs + sha256), the training settings
  5. each node trains, uploads its ELM through the contributions API and answers with the
     contribution id; the server checks it and ties it to the round
  6. finish: succeeded / partial / failed / empty / cancelled

Every phase has its time-out; a node that errs or stays silent is marked and the others go
on. What Flower carries here is a few hundred bytes per node and message.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from coordinator.db import session_scope
from coordinator.errors import ServiceError
from coordinator.federated import logic
from coordinator.federated import protocol as p
from coordinator.models import Round
from coordinator.services import forests as forests_svc
from coordinator.services import rounds

log = logging.getLogger("elmforest.federated")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry point: run the round named by the run config's `round-id`."""
    from coordinator.settings import get_settings

    round_id = int(context.run_config.get("round-id", 0) or 0)
    if round_id <= 0:
        raise ValueError("no round-id in the run config: create the round first and start it with "
                         "`elmforest round start` (or `flwr run ... --run-config round-id=N`)")
    run_round(grid, round_id, get_settings(), flower_run_id=str(context.run_id))


# ----------------------------------------------------------------------------- messages


def records(msg: Message) -> dict[str, dict[str, Any]] | str:
    """A reply as plain data: {record name: {key: value}}, or the error Flower reported."""
    if msg.has_error():
        return f"the node's ClientApp failed (Flower error {msg.error.code}): {msg.error.reason or ''}"
    return {name: dict(rec) for name, rec in msg.content.items()}


def exchange(grid: Grid, messages: dict[int, Message], timeout: float, stop: Callable[[], bool] = lambda: False,
             poll: float = 0.5) -> dict[int, dict[str, dict[str, Any]] | str | None]:
    """Send each node its message and collect the replies until all came or `timeout`
    passed (or `stop()` says the round was cancelled). None: no reply in time."""
    nodes = list(messages)
    ids = list(grid.push_messages([messages[n] for n in nodes]))
    out: dict[int, dict[str, dict[str, Any]] | str | None] = dict.fromkeys(nodes)
    pending = {}
    for n, mid in zip(nodes, ids, strict=False):
        if mid:
            pending[mid] = n
        else:
            out[n] = "the SuperLink did not accept the message for this node"
    end = time.monotonic() + timeout
    while pending and time.monotonic() < end and not stop():
        for reply in grid.pull_messages(list(pending)):
            n = pending.pop(reply.metadata.reply_to_message_id, None)
            if n is not None:
                out[n] = records(reply)
        if pending:
            time.sleep(poll)
    return out


def message(node_id: int, kind: str, recs: dict[str, dict[str, Any]], round_id: int, ttl: float) -> Message:
    content = RecordDict({name: ConfigRecord(values) for name, values in recs.items()})
    return Message(content, node_id, kind, ttl=max(ttl, 1.0), group_id=f"round-{round_id}")


def wait_for_nodes(grid: Grid, cfg: logic.RoundConfig, stop: Callable[[], bool], poll: float = 1.0) -> list[int]:
    end = time.monotonic() + cfg.node_wait_s
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < cfg.min_nodes and time.monotonic() < end and not stop():
        time.sleep(poll)
        nodes = sorted(grid.get_node_ids())
    return nodes


# ----------------------------------------------------------------------------- the round


def run_round(grid: Grid, round_id: int, settings, flower_run_id: str | None = None, poll: float = 0.5) -> dict:
    """Run round `round_id` over the nodes of `grid`; returns the round's summary."""
    from coordinator.storage import make_storage

    url = settings.db_url
    with session_scope(url) as db:
        r = rounds.start(db, round_id, flower_run_id)
        cfg = logic.RoundConfig.from_dict(r.config)
        forest = r.forest.name
    log.info("round %s: forest %s, waiting for nodes", round_id, forest)

    def stop() -> bool:
        with session_scope(url) as db:
            return rounds.is_cancelled(db, round_id)

    def ask(kind: str, recs: dict[int, dict[str, dict[str, Any]]], timeout: float):
        """One message per node, the replies, and whether the round was cancelled meanwhile."""
        replies = exchange(grid, {n: message(n, kind, rec, round_id, timeout) for n, rec in recs.items()},
                           timeout, stop, poll)
        return replies, stop()

    error = None
    try:
        # 1. who is there, and what do they hold?
        node_ids = wait_for_nodes(grid, cfg, stop)
        if not node_ids:
            raise RuntimeError(f"no Flower node connected within {cfg.node_wait_s:g} s")
        replies, _ = ask(p.QUERY, {n: {p.ROUND: {"round-id": round_id, "forest": forest}} for n in node_ids},
                         cfg.query_timeout_s)
        reports = [logic.node_report(str(n), replies[n], cfg.query_timeout_s) for n in node_ids]

        # 2. who trains?
        chosen = _plan(url, round_id, reports, cfg)
        log.info("round %s: %d nodes, %d asked to train", round_id, len(node_ids), len(chosen))
        if not chosen or stop():
            return _finish(url, round_id, None)

        # 3. each node requests its own branch init (its posterior computed locally)
        replies, cancelled = ask(p.BRANCH, {n: {p.BRANCH_REC: {"round-id": round_id, "forest": forest, "domain": d}}
                                            for n, d in chosen.items()}, cfg.branch_timeout_s)
        inits = _collect(url, round_id, replies, cancelled, p.BRANCH_REC, cfg.branch_timeout_s,
                         logic.branch_init_id, "requesting its branch init", "the round was cancelled",
                         lambda db, r, n, init_id, reply: rounds.claim_init(db, r, str(n), init_id),
                         "its branch init was refused")

        # 4. wait for the coordinator to compute the inits, then one train message per node
        ready = _wait_inits(url, round_id, inits, cfg.init_timeout_s, stop, poll)
        if not ready or stop():
            return _finish(url, round_id, None)
        recs = _train_records(url, round_id, forest, cfg, chosen, ready, make_storage(settings))
        log.info("round %s: training on %d nodes", round_id, len(recs))

        # 5. collect the ELMs (uploaded by the nodes as contributions of their owners)
        replies, cancelled = ask(p.TRAIN, recs, cfg.train_timeout_s)
        _collect(url, round_id, replies, cancelled, p.RESULT, cfg.train_timeout_s, logic.contribution_id,
                 "training or uploading", "the round was cancelled (an ELM it still uploads is kept)",
                 lambda db, r, n, cid, reply: rounds.claim_contribution(db, r, str(n), cid, logic.train_metrics(reply)),
                 "its contribution was refused")
    except Exception as e:
        log.exception("round %s failed", round_id)
        error = f"{type(e).__name__}: {e}"
    # 6. finish
    return _finish(url, round_id, error)


def _plan(url: str, round_id: int, reports: list, cfg: logic.RoundConfig) -> dict[int, str]:
    """Decide and record who trains: {node id: its domain}; those are now branching."""
    with session_scope(url) as db:
        r = db.get(Round, round_id)
        decisions = logic.plan(reports, rounds.domain_history(db, r), rounds.trainable_domains(db), cfg.max_attempts)
        rounds.record_plan(db, r, reports, decisions)
        chosen = {int(d.node_id): next(x.domain for x in reports if x.node_id == d.node_id)
                  for d in decisions.values() if d.trains}
        for n in chosen:
            rounds.set_status(db, r, str(n), logic.BRANCHING, "computing its domain posterior, requesting a branch init")
    return chosen


def _collect(url: str, round_id: int, replies: dict, cancelled: bool, record: str, timeout: float,
             extract: Callable[[logic.Outcome], int | None], doing: str, cancelled_why: str,
             claim: Callable[..., None], refused_why: str) -> dict[int, int]:
    """Read each node's reply to a phase: the id it names (a branch init, a contribution) is
    checked and tied to the round by `claim`; a node that failed, stayed silent or named an
    id the coordinator refuses is marked. Returns {node id: the id it named} of those kept."""
    kept: dict[int, int] = {}
    with session_scope(url) as db:
        r = db.get(Round, round_id)
        for n, reply in replies.items():
            o = logic.outcome(reply, record, timeout)
            if reply is None and cancelled:
                o = logic.Outcome("failed", error=cancelled_why)
            got = extract(o)
            if got is None:
                _fail(db, r, n, o, doing)
                continue
            try:
                claim(db, r, n, got, reply)
                kept[n] = got
            except ServiceError as e:
                rounds.set_status(db, r, str(n), logic.FAILED, f"{refused_why}: {e}")
    return kept


def _train_records(url: str, round_id: int, forest: str, cfg: logic.RoundConfig, chosen: dict[int, str],
                   ready: dict[int, dict], storage) -> dict[int, dict[str, dict[str, Any]]]:
    """Each node's train message: its init by reference (signed URLs + sha256), the ELM's
    name and the training settings; the nodes are marked as training."""
    recs = {}
    with session_scope(url) as db:
        r = db.get(Round, round_id)
        taken = rounds.taken_names(db, r)
        for n, b in ready.items():
            name = logic.elm_name(chosen[n], round_id, taken)
            taken.add(name)
            urls = forests_svc.file_urls(storage, b["files"])
            recs[n] = {
                p.INIT: {"round-id": round_id, "forest": forest, "branch-init-id": b["id"], "name": name,
                         "files": json.dumps(b["files"], sort_keys=True), "urls": json.dumps(urls, sort_keys=True)},
                p.TRAIN_REC: cfg.train_record(),
            }
            rounds.set_status(db, r, str(n), logic.TRAINING, f"training {name!r} from branch init {b['id']}")
    return recs


def _fail(db, r, node_id: int, o: logic.Outcome, doing: str) -> None:
    status = logic.TIMED_OUT if o.status == "timed_out" else logic.FAILED
    rounds.set_status(db, r, str(node_id), status, f"{doing}: {o.error}")


def _wait_inits(url: str, round_id: int, inits: dict[int, int], timeout: float, stop: Callable[[], bool],
                poll: float) -> dict[int, dict]:
    """Poll the branch inits until each is ready or failed; the rest time out."""
    ready: dict[int, dict] = {}
    pending = dict(inits)
    end = time.monotonic() + timeout
    while pending:
        with session_scope(url) as db:
            r = db.get(Round, round_id)
            for n, init_id in list(pending.items()):
                state, b = rounds.init_state(db, init_id)
                if state == "ready":
                    ready[n] = {"id": b.id, "files": dict(b.files or {})}
                    del pending[n]
                elif state == "failed":
                    rounds.set_status(db, r, str(n), logic.FAILED,
                                      f"the coordinator could not compute branch init {init_id}: {b.error}")
                    del pending[n]
            if pending and (time.monotonic() > end or stop()):
                for n, init_id in pending.items():
                    rounds.set_status(db, r, str(n), logic.TIMED_OUT,
                                      f"branch init {init_id} was not ready within {timeout:g} s")
                pending = {}
        if pending:
            time.sleep(poll)
    return ready


def _finish(url: str, round_id: int, error: str | None) -> dict:
    with session_scope(url) as db:
        r = rounds.finish(db, round_id, error)
        out = rounds.summary(db, r)
    log.info("round %s: %s %s", round_id, out["status"], out["counts"])
    return out
