"""Helpers for the federated-round tests: node data directories, token files, the text a
round must never let out, a recording TCP proxy, and Flower's processes on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
from helpers import CORPUS
from live import RecordingProxy, free_port, leaks, snippets, stop_groups, wait_port  # noqa: F401 - used by the tests here

BIN = Path(sys.executable).parent
# Flower must stay on loopback and offline: no telemetry, no update check, no installs
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "OMP_NUM_THREADS": "1",
              "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}


def node_data(root: Path, domain: str, broken: bool = False) -> Path:
    """An institution's private data: the domain's train and valid splits (no test split:
    the coordinator's held-out data is the domain's own). `broken`: a train split that is
    not JSONL, so training fails on that node."""
    d = root / domain
    d.mkdir(parents=True, exist_ok=True)
    (d / "valid.jsonl").write_bytes((CORPUS / domain / "valid.jsonl").read_bytes())
    if broken:
        (d / "train.jsonl").write_text("this line is not JSON\n")
    else:
        (d / "train.jsonl").write_bytes((CORPUS / domain / "train.jsonl").read_bytes())
    return d


def token_file(root: Path, name: str, token: str) -> Path:
    p = root / f"{name}.token"
    p.write_text(token + "\n")
    p.chmod(0o600)
    return p


class Flower:
    """A SuperLink and SuperNodes on loopback, insecure, without runtime dependency
    installation; each process (and what it spawns) is stopped at the end."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **env, **FLOWER_ENV, "FLWR_HOME": str(self.home)}
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        p = subprocess.Popen(args, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                             cwd=self.root, start_new_session=True)
        self.procs.append(p)
        return p

    def superlink(self, env: dict[str, str]) -> None:
        p = self.spawn("superlink", [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                                     "--host", "127.0.0.1", "--port", str(self.port),
                                     "--database", str(self.root / "superlink.db")], env)
        wait_port(self.port, 60, p, self.root / "superlink.log")
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')

    def supernode(self, name: str, superlink_port: int, node_config: dict[str, str]) -> None:
        cfg = " ".join(f"{k}={json.dumps(str(v))}" for k, v in node_config.items())
        self.spawn(name, [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{superlink_port}",
                          "--port", str(free_port()), "--node-config", cfg])

    def log(self, name: str) -> str:
        p = self.root / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        family = []
        for p in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                family += psutil.Process(p.pid).children(recursive=True)
        stop_groups(self.procs, grace=15)
        for c in family:  # superexec, serverapp, clientapp processes started in other sessions
            with contextlib.suppress(psutil.NoSuchProcess):
                c.kill()


# a round small enough for a test: ~12 updates of a tiny model, time-outs in seconds
TINY_ROUND = {"steps": 12, "batch_size": 8, "block_size": 64, "lr": 3e-3, "warmup": 0.08}


def setup_federation(coord, seed_dir: Path, members: dict[str, str], forest: str = "fed") -> dict:
    """A forest grown from the seed, a maintainer, and one contributor per domain (each
    registers the domain with its held-out data)."""
    from live import add_domain

    admin = coord.user("admin", "admin")
    maint = coord.user("maint", "maintainer")
    admin.create_forest(forest, seed_dir)
    clients = {}
    for user, domain in members.items():
        clients[user] = coord.user(user)
        add_domain(clients[user], domain, CORPUS)
    return {"admin": admin, "maint": maint, "clients": clients, "forest": forest}
