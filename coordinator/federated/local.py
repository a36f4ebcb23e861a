"""Federated rounds on one machine, without a SuperLink and without Ray: `LocalGrid` is a
Flower `Grid` whose nodes are ClientApps called in this process (on a pool of `workers`
threads), each with its own node config, as `flower-supernode --node-config` would give it.

With one worker, the default, nodes take turns (one message at a time, as on one machine
with one accelerator; pass `workers` for more), so a phase's time-out covers every node's
turn.

Every message crosses a real serialisation boundary (Flower's protobuf form, both ways),
so what a node receives and sends is exactly what a SuperLink would carry; `wire` keeps
those bytes for inspection. `drop` makes a node ignore messages of some types, to play a
straggler.
"""

from __future__ import annotations

import importlib
import itertools
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


def load_object(ref: str) -> Any:
    """`module:attribute`, as in a Flower App's components."""
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _wire(msg: Message) -> bytes:
    return message_to_proto(msg).SerializeToString()


def _unwire(b: bytes) -> Message:
    return message_from_proto(ProtoMessage.FromString(b))


class LocalGrid(Grid):
    """A Grid over in-process ClientApps; node ids are 1001, 1002, ... in the order of
    `node_configs`."""

    _ids = itertools.count(1)

    def __init__(self, client_app, node_configs: list[dict[str, Any]], run_config: dict[str, Any] | None = None,
                 run_id: int | None = None, workers: int = 1, drop: dict[int, set[str]] | None = None):
        self.client_app = load_object(client_app) if isinstance(client_app, str) else client_app
        self.nodes = {1000 + i: dict(cfg) for i, cfg in enumerate(node_configs, 1)}
        self.run_config = dict(run_config or {})
        self.run_id = run_id or (int(time.time()) * 1000 + next(self._ids))
        self.drop = drop or {}
        self.states = {n: RecordDict() for n in self.nodes}
        self.wire: list[tuple[str, int, str, bytes]] = []  # (direction, node, message type, bytes)
        self._replies: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="node")
        self._run = None
        # this process plays the SuperLink: messages it creates come from the SuperLink node
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = self.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    # ------------------------------------------------------------------ Grid

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self.nodes:
                ids.append("")
                continue
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            b = _wire(msg)
            with self._lock:
                self.wire.append(("to-node", node, msg.metadata.message_type, b))
            ids.append(mid)
            if msg.metadata.message_type not in self.drop.get(node, set()):
                self._pool.submit(self._deliver, node, b)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        with self._lock:
            for mid in message_ids:
                b = self._replies.pop(mid, None)
                if b is not None:
                    out.append(_unwire(b))
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages)) - {""}
        end = None if timeout is None else time.monotonic() + timeout
        out: list[Message] = []
        while pending and (end is None or time.monotonic() < end):
            got = list(self.pull_messages(pending))
            out += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                time.sleep(0.05)
        return out

    # ------------------------------------------------------------------ the nodes

    def _deliver(self, node: int, b: bytes) -> None:
        msg = _unwire(b)
        ctx = Context(run_id=self.run_id, node_id=node, node_config=self.nodes[node], state=self.states[node],
                      run_config=self.run_config)
        try:
            reply = self.client_app(msg, ctx)
        except Exception as e:  # what a SuperNode does when its ClientApp raises
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(e)}:<'{e}'>"),
                            reply_to=msg)
        rb = _wire(reply)
        with self._lock:
            self.wire.append(("to-server", node, msg.metadata.message_type, rb))
            self._replies[msg.metadata.message_id] = rb

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def simulate(round_id: int, node_configs: list[dict[str, Any]], settings, client_app: str | Any,
             drop: dict[int, set[str]] | None = None) -> dict:
    """Run round `round_id` with the ServerApp's driver over in-process nodes; returns the
    round's summary. `settings` are the coordinator's (its database and object store)."""
    from coordinator.federated.server import run_round

    grid = LocalGrid(client_app, node_configs, {"round-id": round_id}, drop=drop)
    try:
        return run_round(grid, round_id, settings, flower_run_id=f"local-{grid.run_id}")
    finally:
        grid.close()
