"""Models by Hugging Face Hub id: wherever a model directory is expected, `org/name`,
`org/name@revision` (or `--revision`) works too. The model is fetched with
`huggingface_hub.snapshot_download` (weights as safetensors, config and tokenizer files only;
never a pickle), from the local cache when HF_HUB_OFFLINE=1. What was fetched is recorded:
the repository, the revision asked for and the commit it resolved to.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from btm.errors import BTMError
from btm.model_files import HUB_PATTERNS, PICKLE_SUFFIXES, WEIGHTS_SUFFIX

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class Resolved:
    path: Path  # a local model directory
    # for a Hub model {"hub", "revision" (the commit), "requested", "files": {name: sha256}}; None for a directory
    source: dict[str, Any] | None


def is_hub_id(spec: str | os.PathLike) -> bool:
    return not Path(spec).exists() and bool(HUB_ID.match(str(spec)))


def split(spec: str, revision: str | None = None) -> tuple[str, str]:
    repo, _, rev = str(spec).partition("@")
    if rev and revision and rev != revision:
        raise BTMError(f"{spec}: two revisions given ({rev!r} and --revision {revision!r}); give one")
    return repo, revision or rev or "main"


def resolve(spec: str | os.PathLike, revision: str | None = None, files: list[str] | None = None) -> Resolved:
    """A local directory as it is, or a Hub model fetched into (or found in) the Hub cache."""
    if Path(spec).exists():
        if revision:
            raise BTMError(f"{spec} is a local directory; --revision is for Hub models (org/name)")
        return Resolved(Path(spec), None)
    if not HUB_ID.match(str(spec)):
        raise BTMError(f"{spec}: no such directory, and not a Hugging Face Hub id (org/name or org/name@revision)")
    repo, rev = split(str(spec), revision)
    path = _download(repo, rev, files or HUB_PATTERNS)
    if files is None:
        _require_safetensors(path, repo, rev)
    from btm.hashing import sha256_file

    files_sha = {f.name: sha256_file(f) for f in sorted(path.iterdir()) if f.is_file()}
    return Resolved(path, {"hub": repo, "revision": path.name, "requested": rev, "files": files_sha})


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """The Hugging Face Hub cache, as huggingface_hub finds it (HF_HUB_CACHE, HF_HOME, ~/.cache)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                     "huggingface")
    return Path(home) / "hub"


def add_to_cache(model_dir: str | os.PathLike, repo: str, revision: str = "main",
                 cache: str | os.PathLike | None = None) -> str:
    """Put a local directory (a model, or an exported forest with its folders) into the Hub
    cache as `repo` at `revision`, laid out as a download would leave it (blobs, a snapshot of
    links, the ref), so Hub ids resolve offline: for machines that cannot reach the Hub, and
    for tests. Returns the commit id it was given."""
    import hashlib
    import shutil

    from btm.hashing import sha256_file

    src = Path(model_dir)
    digests = {f.relative_to(src).as_posix(): sha256_file(f) for f in sorted(src.rglob("*")) if f.is_file()}
    commit = hashlib.sha1("\n".join(f"{n} {h}" for n, h in digests.items()).encode()).hexdigest()
    root = Path(cache or cache_dir()) / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for name, digest in digests.items():
        blob = root / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(src / name, blob)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return commit


def _download(repo: str, rev: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:  # (the cache and offline mode read at each call, not once at import)
        return Path(snapshot_download(repo, revision=rev, allow_patterns=patterns, cache_dir=cache_dir(),
                                      local_files_only=_offline()))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub cannot be reached"
        raise BTMError(
            f"{repo}@{rev} is not in the Hugging Face cache ({cache_dir()}) and {why}: fetch it where the Hub is "
            f"reachable (`hf download {repo} --revision {rev}`) and copy that cache here (HF_HOME), or unset "
            "HF_HUB_OFFLINE") from None
    except RevisionNotFoundError:
        raise BTMError(f"{repo} has no revision {rev!r}; see its branches, tags and commits on the Hub") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise BTMError(f"{repo}: no such model on the Hub, or it is private or gated (log in with "
                       "`hf auth login` if you have access)") from None


def _require_safetensors(path: Path, repo: str, rev: str) -> None:
    if any(path.glob(f"*{WEIGHTS_SUFFIX}")):
        return
    pickled = [f for f in _repo_files(repo, path.name, path) if f.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise BTMError(
            f"{repo}@{rev} has its weights only as pickles ({', '.join(sorted(pickled)[:3])}): elmforest never loads "
            "a pickle (loading one can run any code). Use a revision with safetensors weights, or convert them "
            "where you trust the file and load that directory")
    raise BTMError(f"{repo}@{rev} has no weights (no *.safetensors); is it a model repository?")


def _repo_files(repo: str, commit: str, snapshot: Path) -> list[str]:
    """The repository's file names at a commit: from the Hub, or (offline) the cache's listing."""
    from huggingface_hub import get_cached_repo_tree, list_repo_files

    if not _offline():
        try:
            return list(list_repo_files(repo, revision=commit))
        except Exception:  # noqa: BLE001 - offline after all: fall back to what the cache knows
            pass
    try:
        return [f.path for f in get_cached_repo_tree(repo, revision=commit, cache_dir=cache_dir())]
    except Exception:  # noqa: BLE001
        return [p.name for p in snapshot.iterdir()]


def describe(source: dict[str, Any] | None) -> str:
    """Where a model came from, in a few words: org/name@commit (requested revision)."""
    if not source or not source.get("hub"):
        return "a local directory"
    return f"{source['hub']}@{source['revision'][:12]}" + (
        f" ({source['requested']})" if source.get("requested") not in (None, source["revision"]) else "")
