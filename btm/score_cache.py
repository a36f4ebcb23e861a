"""A content-addressed cache of scores: one model's log-likelihoods of one domain's blocks.

Scoring (a forward pass of every model over every domain) is what evaluation costs; the
scores of a model on a domain depend only on the model's files and the token blocks, so they
are kept under

    scores/<sha256 of (format, model fingerprint, blocks fingerprint)>

where the model fingerprint is the sha256 of its config and weights files (the ELM's sha256 in
a manifest) and the blocks fingerprint the sha256 of the domain's tokenised test and
development blocks (so it changes with the held-out data, the tokenizer, the block size and
the number of blocks). A new forest version then scores only the ELMs it has not seen.

An entry is a JSON header line, then the test log-probs (N, T) float32 and the development
log-likelihoods (M,) float64, little-endian. Nothing read back is trusted: the header must name
the same key, format and shapes the caller expects, the payload must have exactly that length
and the sha256 the header records; anything else (a missing, truncated, corrupted or
wrong-shaped entry) reads as absent, and the caller scores again and overwrites it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from btm import atomic
from btm.model_files import CONFIG, WEIGHTS_PREFIX, WEIGHTS_SUFFIX

FORMAT = "elmforest.scores/1"


class ScoreStore(Protocol):
    """Where entries live: bytes by key (a directory here, the coordinator's artifact store there)."""

    def read(self, key: str) -> bytes | None: ...

    def write(self, key: str, data: bytes) -> None: ...


class DirStore:
    """Entries as files under a directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(p, atomic.unique_tmp_name(p)) as tmp:
            Path(tmp).write_bytes(data)


def is_scored_file(name: str) -> bool:
    """The files whose bytes decide a model's scores: its config and weights."""
    return name == CONFIG or (name.startswith(WEIGHTS_PREFIX) and WEIGHTS_SUFFIX in name)


def files_fingerprint(files: dict[str, str]) -> str:
    """A model's fingerprint from {file name: sha256} (a manifest entry's files)."""
    picked = sorted((n, s) for n, s in files.items() if is_scored_file(n))
    return hashlib.sha256(json.dumps(picked).encode()).hexdigest()


def dir_fingerprint(model_dir: str | os.PathLike) -> str:
    """A model directory's fingerprint (hashes its config and weights files)."""
    from btm.hashing import sha256_file

    d = Path(model_dir)
    return files_fingerprint({f.name: sha256_file(f) for f in d.iterdir() if f.is_file() and is_scored_file(f.name)})


def blocks_fingerprint(test: torch.Tensor, dev: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (test, dev):
        a = np.ascontiguousarray(t.numpy().astype("<i8"))
        h.update(json.dumps(list(a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def entry_key(model: str, blocks: str) -> str:
    return "scores/" + hashlib.sha256(f"{FORMAT}\n{model}\n{blocks}".encode()).hexdigest()


def encode(key: str, test: torch.Tensor, dev: np.ndarray | None) -> bytes:
    t = np.ascontiguousarray(test.numpy().astype("<f4"))
    d = np.ascontiguousarray((np.zeros(0) if dev is None else np.asarray(dev)).astype("<f8"))
    payload = t.tobytes() + d.tobytes()
    header = {"format": FORMAT, "key": key, "test_shape": list(t.shape), "dev_shape": list(d.shape),
              "sha256": hashlib.sha256(payload).hexdigest()}
    return json.dumps(header).encode() + b"\n" + payload


def decode(data: bytes | None, key: str, test_shape: tuple[int, int],
           dev_rows: int | None) -> tuple[torch.Tensor, np.ndarray | None] | None:
    """The entry's (test, dev) if it is whole and of the expected shapes, else None.
    dev_rows None: the development scores are not wanted (any entry serves)."""
    if not data:
        return None
    head, sep, payload = data.partition(b"\n")
    try:
        h = json.loads(head)
        ts, ds = tuple(int(x) for x in h["test_shape"]), tuple(int(x) for x in h["dev_shape"])
    except (ValueError, KeyError, TypeError):
        return None
    ok = (sep and h.get("format") == FORMAT and h.get("key") == key and ts == tuple(test_shape) and len(ds) == 1
          and (dev_rows is None or ds[0] == dev_rows)
          and len(payload) == 4 * ts[0] * ts[1] + 8 * ds[0]
          and hashlib.sha256(payload).hexdigest() == h.get("sha256"))
    if not ok:
        return None
    n = 4 * ts[0] * ts[1]
    test = torch.from_numpy(np.frombuffer(payload[:n], dtype="<f4").reshape(ts).astype(np.float32))
    dev = np.frombuffer(payload[n:], dtype="<f8").astype(np.float64) if dev_rows is not None else None
    return test, dev
