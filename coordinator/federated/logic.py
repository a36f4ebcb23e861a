"""A round's decisions as plain functions: no database, no Flower. The ServerApp feeds them
what the nodes said and what the coordinator knows, and records what they decide.

- Which node trains: every node that answered with a registered train domain that has no
  live ELM yet, one node per domain (the one with the most data), unless the domain failed
  `max_attempts` rounds in a row.
- Failures and stragglers: a node that errs or does not answer within a phase's time-out is
  marked failed or timed_out; the others go on, and what they produced is kept. Its domain
  is retried by the next round (attempt + 1).
- The round's status from its nodes' outcomes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from btm.round_config import RoundConfig as RoundConfig  # a round's settings: logic.RoundConfig
from coordinator.names import SLUG

# node states, in the order a node goes through them
QUERIED, SKIPPED, BRANCHING, TRAINING, SUBMITTED, FAILED, TIMED_OUT = (
    "queried", "skipped", "branching", "training", "submitted", "failed", "timed_out")
NODE_STATES = (QUERIED, SKIPPED, BRANCHING, TRAINING, SUBMITTED, FAILED, TIMED_OUT)
UNSUCCESSFUL = (FAILED, TIMED_OUT)

MAX_TEXT = 2000  # characters kept of anything a node says (errors, names)


@dataclass
class NodeReport:
    """A node's answer to the query (or the lack of one)."""

    node_id: str
    replied: bool = True
    domain: str | None = None
    documents: int | None = None
    data_bytes: int | None = None
    owner: str | None = None
    device: str | None = None
    error: str | None = None


@dataclass
class DomainHistory:
    """What earlier rounds and uploads did for a domain of the forest."""

    done: str | None = None  # why it needs no new ELM, e.g. "contribution 12 is evaluated"
    failures: int = 0  # failed or timed-out attempts since its last submitted ELM


@dataclass
class Decision:
    node_id: str
    status: str  # the node's state after planning: queried (it will train), skipped, failed, timed_out
    reason: str = ""
    attempt: int = 0  # for a domain it trains (or failed at): 1 + the domain's earlier failures

    @property
    def trains(self) -> bool:
        return self.status == QUERIED


@dataclass
class Outcome:
    """A node's reply to one phase, checked."""

    status: str  # ok, failed, timed_out
    values: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ----------------------------------------------------------------------------- replies


def clean_text(x: Any, limit: int = MAX_TEXT) -> str:
    """A node's free text (error messages), bounded and without control characters."""
    s = "" if x is None else str(x)
    s = "".join(ch if ch.isprintable() or ch == " " else " " for ch in s)
    return s[:limit]


def _int(x: Any) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int) and 0 <= x < 2**62:
        return x
    if isinstance(x, float) and math.isfinite(x) and 0 <= x < 2**62 and x == int(x):
        return int(x)
    return None


def _float(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def outcome(reply: dict[str, dict[str, Any]] | str | None, record: str, timeout: float) -> Outcome:
    """Check one reply: None (no answer in time), an error string (the node crashed: Flower's
    error reply), or the reply's records {name: {key: value}}. The record `record` must say
    ok=True; otherwise its `error` is the reason."""
    if reply is None:
        return Outcome("timed_out", error=f"no answer within {timeout:g} s")
    if isinstance(reply, str):
        return Outcome("failed", error=clean_text(reply) or "the node's ClientApp failed")
    rec = reply.get(record)
    if not isinstance(rec, dict):
        return Outcome("failed", error=f"malformed reply: no {record!r} record")
    if rec.get("ok") is not True:
        return Outcome("failed", values=rec, error=clean_text(rec.get("error")) or "the node reported a failure")
    return Outcome("ok", values=rec)


def node_report(node_id: str, reply: dict[str, dict[str, Any]] | str | None, timeout: float) -> NodeReport:
    """The query reply as a NodeReport (a failing node may still name its domain)."""
    o = outcome(reply, "node", timeout)
    if o.status == "timed_out":
        return NodeReport(node_id, replied=False, error=o.error)
    v = o.values
    domain = v.get("domain")
    domain = domain if isinstance(domain, str) and SLUG.match(domain) else None
    owner = v.get("owner")
    device = v.get("device")
    return NodeReport(node_id, domain=domain, documents=_int(v.get("documents")), data_bytes=_int(v.get("bytes")),
                      owner=clean_text(owner, 64) if isinstance(owner, str) else None,
                      device=clean_text(device, 32) if isinstance(device, str) else None,
                      error=None if o.ok else o.error)


def branch_init_id(o: Outcome) -> int | None:
    return _int(o.values.get("branch-init-id")) if o.ok else None


def contribution_id(o: Outcome) -> int | None:
    return _int(o.values.get("contribution-id")) if o.ok else None


def train_metrics(reply: dict[str, dict[str, Any]] | str | None) -> dict[str, float]:
    """The numbers of a train reply's "metrics" record (anything else is dropped)."""
    if not isinstance(reply, dict) or not isinstance(reply.get("metrics"), dict):
        return {}
    out = {}
    for k, v in list(reply["metrics"].items())[:32]:
        f = _float(v)
        if isinstance(k, str) and f is not None:
            out[clean_text(k, 32)] = f
    return out


# ----------------------------------------------------------------------------- planning


def plan(reports: list[NodeReport], history: dict[str, DomainHistory], domains: dict[str, str | None],
         max_attempts: int) -> dict[str, Decision]:
    """Decide each node's part in the round.

    `domains` maps each domain the coordinator knows to None (a new ELM may be trained for
    it) or the reason it may not (retired, an evaluation domain, no held-out data)."""
    out: dict[str, Decision] = {}
    candidates: dict[str, list[NodeReport]] = {}
    for r in reports:
        no = _why_not(r, history, domains, max_attempts)
        if no is not None:
            out[r.node_id] = no
        else:
            candidates.setdefault(r.domain, []).append(r)
    for domain, nodes in candidates.items():
        # one ELM per domain and round: the node with the most data (ties: the lower node id)
        nodes.sort(key=lambda r: (-(r.data_bytes or 0), r.node_id))
        first = nodes[0]
        attempt = history.get(domain, DomainHistory()).failures + 1
        out[first.node_id] = Decision(first.node_id, QUERIED, "asked to train" + (
            f" (attempt {attempt}: earlier rounds failed)" if attempt > 1 else ""), attempt=attempt)
        for r in nodes[1:]:
            out[r.node_id] = Decision(r.node_id, SKIPPED, f"domain {domain!r} is trained by node {first.node_id} "
                                      "in this round (it has more data)")
    return out


def _why_not(r: NodeReport, history: dict[str, DomainHistory], domains: dict[str, str | None],
             max_attempts: int) -> Decision | None:
    """Why a node may not train in this round (its decision), or None if it may."""
    if not r.replied:
        return Decision(r.node_id, TIMED_OUT, r.error or "no answer to the query")
    if r.error:
        # a node that names its domain and fails counts as an attempt at that domain
        attempt = history.get(r.domain, DomainHistory()).failures + 1 if r.domain else 0
        return Decision(r.node_id, FAILED, f"the node reported: {r.error}", attempt=attempt)
    if r.domain is None:
        return Decision(r.node_id, FAILED, "the node named no valid domain; set `domain` in its "
                        "node config (--node-config \"domain='name' data-dir='...'\")")
    if r.domain not in domains:
        return Decision(r.node_id, SKIPPED, f"domain {r.domain!r} is not registered at the coordinator "
                        f"(`elmforest domain register {r.domain}`)")
    if domains[r.domain]:
        return Decision(r.node_id, SKIPPED, f"domain {r.domain!r}: {domains[r.domain]}")
    h = history.get(r.domain, DomainHistory())
    if h.done:
        return Decision(r.node_id, SKIPPED, f"domain {r.domain!r} needs no new ELM: {h.done}")
    if h.failures >= max_attempts:
        return Decision(r.node_id, SKIPPED, f"domain {r.domain!r} failed {h.failures} rounds in a row; "
                        "not asked again (start a round with a higher max_attempts to retry)")
    return None


def elm_name(domain: str, round_id: int, taken: set[str]) -> str:
    """The new ELM's name: the domain's, or with the round's number when that is in use."""
    for cand in (domain, f"{domain}-r{round_id}"):
        if cand not in taken:
            return cand[:64]
    n = 2
    while f"{domain}-r{round_id}-{n}" in taken:
        n += 1
    return f"{domain}-r{round_id}-{n}"[:64]


def final_status(node_states: list[str], cancelled: bool = False, error: str | None = None) -> str:
    """The round's status from its nodes' states: succeeded when every node that had work
    uploaded its ELM, partial when some did and some failed or timed out (at any step),
    failed when none did, empty when no node had anything to do."""
    if cancelled:
        return "cancelled"
    submitted = sum(1 for s in node_states if s == SUBMITTED)
    broken = sum(1 for s in node_states if s in UNSUCCESSFUL)
    if not submitted:
        return "empty" if node_states and not broken and not error else "failed"
    return "partial" if broken or error else "succeeded"
