"""Where the client keeps its login: ~/.config/elmforest/credentials.json (mode 0600).
ELMFOREST_URL and ELMFOREST_TOKEN override it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from btm import atomic

DEFAULT_URL = "http://127.0.0.1:8000"


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "elmforest"


def credentials_path() -> Path:
    return config_dir() / "credentials.json"


@dataclass
class Credentials:
    url: str
    token: str | None
    username: str | None = None


def load() -> Credentials:
    saved = {}
    p = credentials_path()
    if p.exists():
        try:
            saved = json.loads(p.read_text())
        except json.JSONDecodeError:
            saved = {}
    url = os.environ.get("ELMFOREST_URL") or saved.get("url") or DEFAULT_URL
    token = os.environ.get("ELMFOREST_TOKEN") or saved.get("token")
    return Credentials(url.rstrip("/"), token, saved.get("username"))


def save(url: str, token: str, username: str) -> Path:
    p = credentials_path()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic.replacing(p) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": url.rstrip("/"), "token": token, "username": username}, f, indent=1)
    os.chmod(p, 0o600)
    return p


def forget() -> None:
    credentials_path().unlink(missing_ok=True)
