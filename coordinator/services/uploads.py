"""Uploads of any size: start (get part URLs), resume (which parts arrived), complete
(server-side sha256 check, then the blob becomes a content-addressed Artifact)."""

from __future__ import annotations

import math
import re
import uuid

from sqlalchemy.orm import Session

from coordinator.errors import BadRequest, Forbidden, NotFound, TooLarge
from coordinator.models import Artifact, Upload, User
from coordinator.storage import Storage, blob_key

SHA = re.compile(r"^[0-9a-f]{64}$")
PURPOSES = ("weights", "sample", "eval-data", "model-file")


def limit_for(settings, purpose: str) -> int:
    return {
        "weights": settings.max_upload_bytes,
        "sample": settings.max_sample_bytes,
        "eval-data": settings.max_eval_data_bytes,
        "model-file": settings.max_upload_bytes,
    }[purpose]


def check_declared(settings, purpose: str, sha256: str, size: int) -> None:
    if purpose not in PURPOSES:
        raise BadRequest(f"unknown upload purpose {purpose!r}; one of {', '.join(PURPOSES)}")
    if not SHA.match(sha256 or ""):
        raise BadRequest("sha256 must be 64 lowercase hex digits (the file's SHA-256)")
    if size <= 0:
        raise BadRequest("size must be a positive number of bytes; empty files cannot be uploaded")
    lim = limit_for(settings, purpose)
    if size > lim:
        raise TooLarge(f"a {purpose} upload may be at most {lim} bytes; this one declares {size}")


def artifact_exists(db: Session, storage: Storage, sha256: str) -> bool:
    return db.get(Artifact, sha256) is not None and storage.exists(blob_key(sha256))


def start(db: Session, storage: Storage, settings, user: User, purpose: str, filename: str, sha256: str,
          size: int) -> dict:
    check_declared(settings, purpose, sha256, size)
    if artifact_exists(db, storage, sha256):
        return {"exists": True, "sha256": sha256, "size": size, "upload_id": None, "parts": []}
    key = f"uploads/{uuid.uuid4().hex}"
    # S3 allows at most 10,000 parts: grow the part size for very large files
    part_size = max(settings.part_size, math.ceil(size / 10_000))
    backend = storage.create_multipart(key)
    up = Upload(id=uuid.uuid4().hex, user_id=user.id, purpose=purpose, filename=filename[:255], sha256=sha256,
                size=size, part_size=part_size, backend_upload_id=backend, key=key)
    db.add(up)
    db.flush()
    return describe(storage, up)


def describe(storage: Storage, up: Upload, done: list[dict] | None = None) -> dict:
    n = math.ceil(up.size / up.part_size)
    have = {p["part_number"] for p in (done or [])}
    return {
        "exists": False,
        "upload_id": up.id,
        "sha256": up.sha256,
        "size": up.size,
        "part_size": up.part_size,
        "status": up.status,
        "parts": [
            {"part_number": i, "url": storage.part_url(up.key, up.backend_upload_id, i), "done": i in have}
            for i in range(1, n + 1)
        ],
        "parts_done": sorted(have),
    }


def get(db: Session, user: User, upload_id: str) -> Upload:
    up = db.get(Upload, upload_id)
    if up is None or up.user_id != user.id:
        raise NotFound(f"no upload {upload_id} of yours")
    return up


def resume(db: Session, storage: Storage, user: User, upload_id: str) -> dict:
    up = get(db, user, upload_id)
    if up.status != "open":
        raise BadRequest(f"upload {upload_id} is {up.status}; start a new one")
    return describe(storage, up, storage.list_parts(up.key, up.backend_upload_id))


def complete(db: Session, storage: Storage, user: User, upload_id: str, parts: list[dict] | None = None) -> Artifact:
    """Assemble the parts, hash the result in the store, and keep it only if it is what the
    client declared. A mismatch deletes what arrived and the upload record."""
    up = get(db, user, upload_id)
    if up.status != "open":
        raise BadRequest(f"upload {upload_id} is {up.status}")
    have = storage.list_parts(up.key, up.backend_upload_id)
    need = math.ceil(up.size / up.part_size)
    missing = sorted(set(range(1, need + 1)) - {p["part_number"] for p in have})
    if missing:
        raise BadRequest(f"parts {missing[:10]} have not arrived; PUT them and complete again",
                         missing_parts=missing)
    storage.complete_multipart(up.key, up.backend_upload_id, parts or have)
    sha, n = storage.sha256(up.key)
    if sha != up.sha256 or n != up.size:
        storage.delete(up.key)
        db.delete(up)
        db.commit()  # the failed upload is gone for good, whatever the caller does next
        raise BadRequest(
            f"the uploaded file does not match what was declared (sha256 {sha[:16]}..., {n} bytes; declared "
            f"{up.sha256[:16]}..., {up.size} bytes); nothing was kept: check the file and upload it again"
        )
    kind = {"weights": "weights", "sample": "sample", "eval-data": "eval-data"}.get(up.purpose, "file")
    if storage.exists(blob_key(sha)):
        storage.delete(up.key)
    else:
        storage.move(up.key, blob_key(sha))
    art = db.get(Artifact, sha) or Artifact(sha256=sha, size=n, kind=kind)
    db.add(art)
    up.status = "complete"
    db.flush()
    return art


def abort(db: Session, storage: Storage, user: User, upload_id: str) -> None:
    up = get(db, user, upload_id)
    if up.status == "open":
        storage.abort_multipart(up.key, up.backend_upload_id)
    db.delete(up)


def put_small(db: Session, storage: Storage, data: bytes, kind: str) -> Artifact:
    """Store bytes the service produced itself (manifests, configs, cards) as a blob."""
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    if not storage.exists(blob_key(sha)):
        storage.put_bytes(blob_key(sha), data)
    art = db.get(Artifact, sha)
    if art is None:
        art = Artifact(sha256=sha, size=len(data), kind=kind)
        db.add(art)
        db.flush()
    return art


def put_file(db: Session, storage: Storage, path, kind: str) -> Artifact:
    from btm.hashing import sha256_file

    sha = sha256_file(path)
    if not storage.exists(blob_key(sha)):
        storage.put_file(blob_key(sha), path)
    art = db.get(Artifact, sha)
    if art is None:
        art = Artifact(sha256=sha, size=path.stat().st_size, kind=kind)
        db.add(art)
        db.flush()
    return art


def put_dir(db: Session, storage: Storage, directory) -> dict[str, str]:
    """Every file of a model directory as an artifact: {file name: sha256}."""
    return {p.name: put_file(db, storage, p, "weights" if p.suffix == ".safetensors" else "file").sha256
            for p in sorted(directory.iterdir()) if p.is_file()}


def require_artifact(db: Session, sha256: str, what: str) -> Artifact:
    a = db.get(Artifact, sha256)
    if a is None:
        raise BadRequest(f"no uploaded {what} with sha256 {sha256}; upload it first (POST /api/v1/uploads)")
    return a


def owner_check(up: Upload, user: User) -> None:
    if up.user_id != user.id:
        raise Forbidden("this upload belongs to someone else")
