"""Model directories and forests on local disk, assembled from content-addressed blobs.

Jobs run btm code, which works on directories. Blobs are downloaded once into a cache
(`<cache>/blobs/<first two hex digits>/<sha256>`, the cache being the jobs' work directory,
data_dir/work) and hard-linked into directories (copied where a link is impossible), so a
forest of n ELMs sharing one tokenizer stores that tokenizer once and re-assembling a
directory costs no copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from btm import atomic
from btm.model_files import MANIFEST, manifest_models, write_manifest
from coordinator.storage import Storage, blob_key


def blob(storage: Storage, cache: Path, sha256: str) -> Path:
    p = cache / "blobs" / sha256[:2] / sha256
    if not p.exists():
        storage.get_file(blob_key(sha256), p)
    return p


def _link(src: Path, dst: Path) -> None:
    atomic.copy_file(src, dst, link=True, tmp_name=atomic.unique_tmp_name(dst))


def model_dir(storage: Storage, cache: Path, files: dict[str, str]) -> Path:
    """A directory holding `files` ({filename: sha256}); the same files give the same path."""
    key = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:24]
    d = cache / "models" / key
    done = d / ".complete"
    if done.exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    for name, sha in files.items():
        if "/" in name or name.startswith("."):
            raise ValueError(f"file name {name!r} in a model directory")
        _link(blob(storage, cache, sha), d / name)
    done.write_text("")
    return d


def forest_dir(storage: Storage, cache: Path, manifest: dict) -> Path:
    """A btm forest directory (forest.json, seed/, elms/<name>/) for a published manifest."""
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:24]
    root = cache / "forests" / key
    if (root / MANIFEST).exists():
        return root
    tmp = cache / "forests" / atomic.unique_tmp_name(root)
    tmp.mkdir(parents=True)
    for path, files in manifest_models(manifest):
        d = tmp / path
        d.mkdir(parents=True, exist_ok=True)
        for name, sha in files.items():
            _link(blob(storage, cache, sha), d / name)
    write_manifest(tmp, manifest)
    try:
        os.replace(tmp, root)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def forget(cache: Path, sha256: str) -> None:
    """Drop a blob from this machine's cache, and every model directory that links it (its
    bytes were rejected: nothing may read them again)."""
    p = cache / "blobs" / sha256[:2] / sha256
    if not p.exists():
        return
    ino = p.stat().st_ino
    for d in (cache / "models").glob("*") if (cache / "models").is_dir() else []:
        if any(f.is_file() and f.stat().st_ino == ino for f in d.iterdir()):
            shutil.rmtree(d, ignore_errors=True)
    p.unlink(missing_ok=True)
