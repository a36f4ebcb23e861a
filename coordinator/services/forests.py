"""Forests and their immutable versions: creation from a seed, manifests, publishing."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from btm.forest import FORMAT
from btm.model_files import CONFIG, WEIGHTS_PREFIX, is_weights_file
from coordinator.errors import BadRequest, Conflict, NotFound, Unprocessable
from coordinator.materialize import model_dir
from coordinator.models import (
    Baseline,
    Contribution,
    Forest,
    ForestVersion,
    State,
    User,
    VersionMember,
)
from coordinator.names import SLUG
from coordinator.services import cache, uploads
from coordinator.services.lifecycle import transition
from coordinator.services.users import require_maintainer
from coordinator.storage import Storage, blob_key

REQUIRED_SEED_FILES = (CONFIG, "tokenizer.json")


def get(db: Session, name: str) -> Forest:
    f = db.scalar(select(Forest).where(Forest.name == name))
    if f is None:
        raise NotFound(f"unknown forest {name!r}")
    return f


def list_(db: Session) -> list[Forest]:
    return list(db.scalars(select(Forest).order_by(Forest.name)))


def version(db: Session, forest: Forest, number: int | None = None) -> ForestVersion:
    n = forest.current_version if number is None else number
    v = db.scalar(select(ForestVersion).where(ForestVersion.forest_id == forest.id, ForestVersion.number == n))
    if v is None:
        raise NotFound(f"forest {forest.name!r} has no version {n}")
    return v


def manifest_of(db: Session, v: ForestVersion) -> dict:
    """A version's manifest, from this process's cache (versions are immutable)."""
    return cache.manifests.get(v.id, lambda: db.scalar(select(ForestVersion.manifest).where(ForestVersion.id == v.id)))


def versions(db: Session, forest: Forest) -> list[ForestVersion]:
    return list(db.scalars(select(ForestVersion).where(ForestVersion.forest_id == forest.id)
                           .order_by(ForestVersion.number.desc())))


def version_numbers(db: Session, forest: Forest) -> list[int]:
    """The version numbers, newest first, without loading their manifests."""
    return list(db.scalars(select(ForestVersion.number).where(ForestVersion.forest_id == forest.id)
                           .order_by(ForestVersion.number.desc())))


def members(db: Session, v: ForestVersion) -> list[Contribution]:
    q = (select(Contribution).join(VersionMember, VersionMember.contribution_id == Contribution.id)
         .where(VersionMember.version_id == v.id).order_by(Contribution.id))
    return list(db.scalars(q))


def create(db: Session, storage: Storage, settings, user: User, name: str, files: dict[str, str],
           description: str = "") -> Forest:
    """Register a seed LM (its files already uploaded) as the root of a new forest."""
    require_maintainer(user)
    if not SLUG.match(name):
        raise BadRequest("forest names are 2-64 lowercase letters, digits, '_' or '-'")
    if db.scalar(select(Forest).where(Forest.name == name)):
        raise Conflict(f"forest {name!r} already exists")
    missing = [f for f in REQUIRED_SEED_FILES if f not in files]
    if missing or not any(f.startswith(WEIGHTS_PREFIX) and is_weights_file(f) for f in files):
        raise BadRequest(f"a seed needs config.json, tokenizer.json and model.safetensors; missing {missing or ['model.safetensors']}")
    _require_model_files(db, user, files)
    from btm.family import family_id, load_config
    from btm.safetensors_io import open_weights
    from btm.tokenizer import load_tokenizer, tokenizer_sha256

    d = model_dir(storage, settings.work_dir, files)
    try:
        config, tok = load_config(d), load_tokenizer(d)
        open_weights(d)
    except Exception as e:  # noqa: BLE001 - whatever the loaders raise on files that are no model
        raise Unprocessable(f"the seed's files are not a loadable model: {e}") from None
    f = Forest(name=name, description=description, family=family_id(config, tok), config=config.to_dict(),
               tokenizer_sha256=tokenizer_sha256(tok), seed_files=files, created_by_id=user.id, current_version=1)
    db.add(f)
    db.flush()
    _write_version(db, storage, f, 1, [], user, "seed registered", history=[])
    return f


def add_baseline(db: Session, storage: Storage, settings, user: User, forest: str, name: str, files: dict[str, str],
                 description: str = "") -> Baseline:
    """Register a model of the forest's family (e.g. the compute-matched dense LM) that every
    version's leaderboard scores next to the forest. Registering the same files again is a no-op."""
    from transformers import AutoConfig

    from btm.family import architecture, load_config
    from btm.tokenizer import load_tokenizer, tokenizer_sha256
    from coordinator.models import Baseline

    require_maintainer(user)
    f = get(db, forest)
    if not SLUG.match(name) or name.startswith(("ensemble", "average")):
        raise BadRequest("a baseline's name is 2-64 lowercase letters, digits, '_' or '-', not ensemble*/average*")
    old = db.scalar(select(Baseline).where(Baseline.forest_id == f.id, Baseline.name == name))
    if old is not None:
        if old.files == files:
            return old
        raise Conflict(f"forest {forest!r} already has a different baseline named {name!r}")
    _require_model_files(db, user, files)
    d = model_dir(storage, settings.work_dir, files)
    try:
        cfg, tok = load_config(d), load_tokenizer(d)
    except Exception as e:  # noqa: BLE001 - whatever the loaders raise on files that are no model
        raise Unprocessable(f"the baseline's files are not a loadable model: {e}") from None
    if architecture(cfg) != architecture(AutoConfig.for_model(**f.config)) or tokenizer_sha256(tok) != f.tokenizer_sha256:
        raise Unprocessable("a baseline must be of the forest's family (same architecture and tokenizer)")
    b = Baseline(forest_id=f.id, name=name, description=description, files=files)
    _name_artifacts(db, files, f"baseline {name} of forest {forest}")
    db.add(b)
    db.flush()
    return b


def _name_artifacts(db: Session, files: dict[str, str], what: str) -> None:
    from coordinator.models import Artifact

    for fname, sha in files.items():
        art = db.get(Artifact, sha)
        if art is not None and is_weights_file(fname):
            art.origin = what


def _require_model_files(db: Session, user: User, files: dict[str, str]) -> None:
    """Every file of a model the caller registers must be one the caller uploaded."""
    if len(files) > 64:
        raise BadRequest(f"a model directory of {len(files)} files? at most 64 (config, tokenizer, weights, card)")
    for fname, sha in files.items():
        if "/" in fname or fname.startswith(".") or not fname:
            raise BadRequest(f"file name {fname!r}: plain names only, as in a model directory")
        purposes = ("weights",) if is_weights_file(fname) else ("model-file",)
        uploads.require_own(db, user, sha, purposes, fname)


def baselines(db: Session, f: Forest) -> list[Baseline]:
    return list(db.scalars(select(Baseline).where(Baseline.forest_id == f.id).order_by(Baseline.name)))


def manifest(db: Session, f: Forest, number: int, elms: list[Contribution], history: list[dict]) -> dict:
    return {
        "format": FORMAT,
        "name": f.name,
        "version": number,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "family": f.family,
        "model_type": f.config.get("model_type"),
        "tokenizer_sha256": f.tokenizer_sha256,
        "seed": {"name": "seed", "path": "seed", "files": f.seed_files},
        "elms": [
            {
                "name": c.name,
                "domain": c.domain.name,
                "path": f"elms/{c.name}",
                "files": c.files,
                "parents": (c.branch_init.parents or []) if c.branch_init else [],
                **({"source": c.source} if c.source else {}),
                # its evaluation, less the review queue's preview of the merge (that forest is gone)
                "metrics": {k: x for k, x in (c.evaluation or {}).items() if k != "merge_preview"},
                "training": c.training,
                "contribution_id": c.id,
                "owner": c.owner.username,
                # for the centroid router (btm.routing); an ELM merged before vectors existed has none
                **({"routing_vector": c.routing_vector} if c.routing_vector is not None else {}),
            }
            for c in elms
        ],
        "history": history,
    }


def _write_version(db: Session, storage: Storage, f: Forest, number: int, elms: list[Contribution], user: User | None,
                   note: str, history: list[dict], publish_key: str | None = None) -> ForestVersion:
    m = manifest(db, f, number, elms, history)
    raw = json.dumps(m, indent=2, sort_keys=True).encode()
    uploads.put_small(db, storage, raw, "manifest")  # the store keeps every manifest too
    v = ForestVersion(forest_id=f.id, number=number, manifest=m, manifest_sha256=hashlib.sha256(raw).hexdigest(),
                      note=note, created_by_id=user.id if user else None, publish_key=publish_key)
    db.add(v)
    db.flush()
    for c in elms:
        db.add(VersionMember(version_id=v.id, contribution_id=c.id))
    return v


def publish(db: Session, storage: Storage, f: Forest, actor: User | None, add: list[int] | None = None,
            remove: list[int] | None = None, note: str = "", publish_key: str | None = None) -> ForestVersion:
    """current members - removed + approved additions -> a new version, in one transaction:
    a crash before commit leaves the previous version current and every state as it was."""
    if publish_key and (done := _published_by(db, publish_key)) is not None:
        return done  # a retried job: already published
    current = version(db, f)
    now = members(db, current)
    remove = list(remove or [])
    _refuse_non_members(f, current, now, remove)
    added = _approved(db, f, add)
    if not added and not remove:
        raise BadRequest("nothing to publish: no approved contributions and nothing to remove")
    staying = [c for c in now if c.id not in remove]
    removed = [c for c in now if c.id in remove]
    _refuse_taken_names(staying, added)
    number = current.number + 1
    history = _history(current, number, added, removed, note)
    v = _write_version(db, storage, f, number, staying + added, actor, note, history, publish_key)
    _merge_and_remove(db, f, number, added, removed, actor, note)
    f.current_version = number
    db.flush()
    return v


def _published_by(db: Session, publish_key: str) -> ForestVersion | None:
    """The version a publish with this key already made (a retried job), if any."""
    return db.scalar(select(ForestVersion).where(ForestVersion.publish_key == publish_key))


def _refuse_non_members(f: Forest, current: ForestVersion, now: list[Contribution], remove: list[int]) -> None:
    """Only members of the current version can be removed."""
    ids = {c.id for c in now}
    unknown = [i for i in remove if i not in ids]
    if unknown:
        raise BadRequest(f"contributions {unknown} are not in version {current.number} of {f.name!r}")


def _refuse_taken_names(staying: list[Contribution], added: list[Contribution]) -> None:
    """An ELM's name is one member's in a version: each addition's must be free of the
    members that stay and of the additions before it."""
    names = {c.name for c in staying}
    for c in added:
        if c.name in names:
            raise Conflict(f"the forest already has an ELM named {c.name!r}; remove it first or rename the contribution")
        names.add(c.name)


def _history(current: ForestVersion, number: int, added: list[Contribution], removed: list[Contribution],
             note: str) -> list[dict]:
    """The manifest's history of the new version: the current one's, then this publish's
    additions and removals."""
    at = datetime.now(UTC).isoformat(timespec="seconds")
    history = list(current.manifest.get("history", []))
    history += [{"version": number, "action": "add", "elm": c.name, "contribution_id": c.id, "at": at} for c in added]
    history += [{"version": number, "action": "remove", "elm": c.name, "contribution_id": c.id, "at": at,
                 "reason": note} for c in removed]
    return history


def _merge_and_remove(db: Session, f: Forest, number: int, added: list[Contribution], removed: list[Contribution],
                      actor: User | None, note: str) -> None:
    """The additions become merged and the removed members removed, as of version `number`."""
    for c in added:
        transition(db, c, State.merged, actor, f"merged into {f.name} v{number}")
    for c in removed:
        transition(db, c, State.removed, actor, note or f"removed in {f.name} v{number}")


def _approved(db: Session, f: Forest, ids: list[int] | None) -> list[Contribution]:
    """The contributions a publish adds: `ids` (each must be an approved contribution of
    `f`), or every approved one of `f`."""
    if ids is None:
        return list(db.scalars(select(Contribution).where(Contribution.forest_id == f.id,
                                                         Contribution.state == State.approved).order_by(Contribution.id)))
    found = [db.get(Contribution, i) for i in ids]
    bad = [i for i, c in zip(ids, found, strict=True) if c is None or c.forest_id != f.id or c.state != State.approved]
    if bad:
        raise BadRequest(f"contributions {bad} are not approved contributions of {f.name!r}")
    return found


def file_urls(storage: Storage, files: dict[str, str]) -> dict[str, str]:
    return {name: storage.download_url(blob_key(sha), name) for name, sha in files.items()}


def version_download(db: Session, storage: Storage, v: ForestVersion) -> dict:
    """The manifest plus a download URL for every file, by path inside the forest directory."""
    m = manifest_of(db, v)
    urls = {}
    for entry in [m["seed"], *m["elms"]]:
        for name, url in file_urls(storage, entry["files"]).items():
            urls[f"{entry['path']}/{name}"] = url
    return {"manifest": m, "files": urls}
