"""The Flower App that `flwr run` submits to a SuperLink, and its submission.

The App is a directory holding only a pyproject.toml: its components name the installed
elmforest modules (SERVER_APP and CLIENT_APP below, as import strings), so the FAB that travels to the SuperLink and the SuperNodes carries no code. Each side runs
the elmforest it has installed, and SuperLink and SuperNodes run with runtime dependency
installation disabled, so nothing is fetched or installed when a round starts.
(Building the FAB from the repository's own pyproject.toml would bundle the repository.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

APP_NAME = "elmforest-round"
# Import strings, resolved by Flower on each side: the ServerApp runs next to the SuperLink
# with the coordinator's settings, the ClientApp on every contributor's node.
SERVER_APP = "coordinator.federated.server:app"
CLIENT_APP = "contributor_client.flower:app"

PYPROJECT = """\
# A Flower App for elmforest's federated BTM rounds (written by contributor_client/flower_run.py).
# It carries no code: both components are modules of the elmforest package each side has
# installed. Start rounds with `elmforest round start`; see docs/federated.md.
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "{version}"
description = "elmforest: one synchronous Branch-Train-Merge round over Flower nodes"
license = "Apache-2.0"
dependencies = ["elmforest=={version}"]

[tool.flwr.app]
publisher = "elmforest"

[tool.flwr.app.components]
serverapp = "{server_app}"
clientapp = "{client_app}"

[tool.flwr.app.config]
round-id = 0
"""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("elmforest")
    except Exception:  # not installed as a distribution (a source checkout on PYTHONPATH)
        return "0.1.0"


def write_app(dest: Path) -> Path:
    """Write the Flower App directory (its name must be a valid Flower project name)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(PYPROJECT.format(name=APP_NAME, version=_version(), server_app=SERVER_APP,
                                                        client_app=CLIENT_APP))
    return dest


def flwr_executable() -> str:
    here = Path(sys.executable).parent / "flwr"
    return str(here) if here.exists() else (shutil.which("flwr") or "flwr")


class SubmitError(RuntimeError):
    pass


def submit(round_id: int, app_dir: Path, superlink: str | None = None, env: dict[str, str] | None = None,
           timeout: float = 120) -> str:
    """`flwr run APP [SUPERLINK] --run-config round-id=N --format json`; returns the Flower
    run id. SUPERLINK names a connection in the Flower config ($FLWR_HOME/config.toml)."""
    cmd = [flwr_executable(), "run", str(app_dir)]
    if superlink:
        cmd.append(superlink)
    cmd += ["--run-config", f"round-id={int(round_id)}", "--format", "json"]
    run_env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", **(env or {})}
    p = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=timeout, check=False)
    out = p.stdout.strip()
    payload = None
    start = out.find("{")
    if start >= 0:
        try:
            payload = json.loads(out[start:])
        except json.JSONDecodeError:
            payload = None
    if p.returncode != 0 or not payload or not payload.get("success") or not payload.get("run-id"):
        detail = (payload or {}).get("error-message") or (p.stderr or out)[-1500:]
        raise SubmitError(f"`{' '.join(cmd)}` failed: {detail}")
    return str(payload["run-id"])
