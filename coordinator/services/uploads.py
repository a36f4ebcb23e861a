"""Uploads of any size, each owned by the user who sent its bytes.

start (part URLs, each signed for exactly its length) -> parts PUT to the store -> complete
(assembled and hashed on the server in one pass over the bytes: on local files the hash is
taken as the parts are written into the object, on S3 the assembled object is read once; a
mismatch keeps nothing). Each step of complete leaves
a state that a retry (or the sweeper) finishes after a crash: its crash points (here and in
the storage; see coordinator/crash.py) are where tests kill the server to check that. A
finished upload is what its owner, and only its owner, may refer to by sha256: declaring a
hash attaches nothing, and no answer says whether someone else's file exists. Every byte is bounded: per-purpose sizes, the
bytes a user has in flight, uploads started per hour, and an expiry after which a sweeper
deletes what arrived. Contribution weights stay under their upload's own key until validation
accepts them (see contributions.py); other files are checked for their kind at once and
become content-addressed blobs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from btm.model_files import is_model_file, is_weights_file
from coordinator.crash import crash_point
from coordinator.errors import BadRequest, Conflict, NotFound, TooLarge, Unprocessable
from coordinator.models import Artifact, Upload, User, utcnow
from coordinator.services import limits
from coordinator.storage import PartsMissing, Storage, StorageError, UploadGone, blob_key

PURPOSES = ("weights", "sample", "eval-data", "model-file")
MAX_PARTS = 10_000  # S3's own limit
# an upload is open (parts arriving), stored (contribution weights awaiting validation),
# verified (checked, becoming its blob: a state only a crash makes last) or complete
# (accepted); one that is rejected, expires or is aborted is deleted, bytes and row
OPEN, STORED, VERIFIED, COMPLETE = "open", "stored", "verified", "complete"
IN_FLIGHT = (OPEN, STORED)  # bytes a user holds that nobody has accepted yet
TEXT_FILES = (".md", ".txt")  # model files besides JSON ones (model cards, merges)
SCRATCH = "uploads"  # under the work directory: local copies of uploads being checked

log = logging.getLogger("elmforest")


def limit_for(settings, purpose: str) -> int:
    return {
        "weights": settings.max_upload_bytes,
        "sample": settings.max_sample_bytes,
        "eval-data": settings.max_eval_data_bytes,
        "model-file": settings.max_model_file_bytes,
    }[purpose]


def check_declared(settings, purpose: str, sha256: str, size: int) -> None:
    if purpose not in PURPOSES:
        raise BadRequest(f"unknown upload purpose {purpose!r}; one of {', '.join(PURPOSES)}")
    if not (isinstance(sha256, str) and len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)):
        raise BadRequest("sha256 must be 64 lowercase hex digits (the file's SHA-256)")
    if size <= 0:
        raise BadRequest("size must be a positive number of bytes; empty files cannot be uploaded")
    lim = limit_for(settings, purpose)
    if size > lim:
        raise TooLarge(f"a {purpose} upload may be at most {lim} bytes; this one declares {size}")


def in_flight(db: Session, user: User) -> int:
    return db.scalar(select(func.coalesce(func.sum(Upload.size), 0))
                     .where(Upload.user_id == user.id, Upload.status.in_(IN_FLIGHT))) or 0


def start(db: Session, storage: Storage, settings, user: User, purpose: str, filename: str, sha256: str,
          size: int) -> Upload:
    """A new upload of `size` bytes; every call sends its own bytes (nothing is shortcut by hash)."""
    check_declared(settings, purpose, sha256, size)
    if not user.is_maintainer:
        used = in_flight(db, user)
        if used + size > settings.upload_quota_bytes:
            raise TooLarge(
                f"you have {used} bytes in unfinished uploads and weights awaiting validation; with these {size} "
                f"that is over your {settings.upload_quota_bytes}-byte limit: finish or abandon what is open "
                "(`elmforest status`), or wait for validation")
        limits.check(db, f"upload:{user.id}", settings.uploads_per_hour, "uploads started")
        limits.record(db, f"upload:{user.id}")
    part_size = max(settings.part_size, math.ceil(size / MAX_PARTS))
    key = f"uploads/{int(time.time())}-{uuid.uuid4().hex}"  # its start time: see _started
    up = Upload(id=uuid.uuid4().hex, user_id=user.id, purpose=purpose, filename=Path(filename).name[:255] or "file",
                sha256=sha256, size=size, part_size=part_size, backend_upload_id=storage.create_multipart(key),
                key=key, expires_at=utcnow() + timedelta(hours=settings.upload_ttl_hours))
    db.add(up)
    db.flush()
    return up


def part_lengths(up: Upload) -> list[int]:
    n = math.ceil(up.size / up.part_size)
    return [min(up.part_size, up.size - i * up.part_size) for i in range(n)]


def describe(storage: Storage, up: Upload, done: list[int] | None = None) -> dict:
    have = set(done or [])
    return {
        "upload_id": up.id,
        "sha256": up.sha256,
        "size": up.size,
        "part_size": up.part_size,
        "status": up.status,
        "expires_at": up.expires_at,
        "parts": [
            {"part_number": i, "length": n, "url": storage.part_url(up.key, up.backend_upload_id, i, n),
             "done": i in have}
            for i, n in enumerate(part_lengths(up), 1)
        ] if up.status == OPEN else [],
        "parts_done": sorted(have),
    }


def get(db: Session, user: User, upload_id: str) -> Upload:
    up = db.get(Upload, upload_id)
    if up is None or up.user_id != user.id:
        raise NotFound(f"no upload {upload_id} of yours")
    return up


def _expire_if_due(db: Session, storage: Storage, up: Upload) -> None:
    if up.status == OPEN and up.expires_at is not None and up.expires_at < utcnow():
        delete(db, storage, up)
        db.commit()  # gone for good, whatever the caller does next
        raise Conflict(f"upload {up.id} expired (not completed within its time) and was deleted; start a new one")


def resume(db: Session, storage: Storage, user: User, upload_id: str) -> dict:
    up = get(db, user, upload_id)
    _expire_if_due(db, storage, up)
    if up.status != OPEN:
        again = "; complete it again to finish" if up.status == VERIFIED else ""
        raise Conflict(f"upload {upload_id} is {up.status}; there is nothing left to send{again}")
    done = _arrived(storage, up)
    if done is None:  # a deletion cut short by a crash: finish it
        delete(db, storage, up)
        db.commit()
        raise Conflict(f"upload {upload_id} lost its parts (it was refused or aborted); start a new one")
    return describe(storage, up, done)


def _arrived(storage: Storage, up: Upload) -> list[int] | None:
    """The parts that have arrived whole; all of them once the file is assembled (by a
    complete that a crash cut short: completing again finishes it); None when neither the
    parts nor the file are there."""
    lengths = part_lengths(up)
    everything = list(range(1, len(lengths) + 1))
    if storage.size(up.key) == up.size:
        return everything
    try:
        sizes = {p["part_number"]: p["size"] for p in storage.list_parts(up.key, up.backend_upload_id)}
    except UploadGone:
        # assembled just now by a concurrent complete, or lost
        return everything if storage.size(up.key) == up.size else None
    return [i for i, n in enumerate(lengths, 1) if sizes.get(i) == n]


def complete(db: Session, storage: Storage, settings, user: User, upload_id: str, hold: bool = False) -> Upload:
    """Assemble the parts and hash the result in the store. Idempotent: a retry after a crash
    anywhere finishes the job or says what to do. A file that is not what was declared, or not
    of its purpose's kind, is deleted. With `hold` (contribution weights) the bytes stay under
    the upload's key for validation; otherwise they become a content-addressed blob."""
    up = get(db, user, upload_id)
    if up.status in (STORED, COMPLETE):
        return up
    if up.status == VERIFIED:  # checked before a crash, not yet its blob
        return _keep(db, storage, up)
    _expire_if_due(db, storage, up)
    # what follows (assembling, hashing, checking the file) is slow and needs no database: end
    # the transaction so the connection goes back to the pool meanwhile
    db.commit()
    crash_point("complete:begin")
    hasher = hashlib.sha256()
    hashed = _assemble(db, storage, up, hasher)
    crash_point("complete:assembled")
    sha, n, problem = _inspect(storage, settings, up, hold, hasher if hashed else None)
    crash_point("complete:hashed")
    if sha != up.sha256 or n != up.size:
        _refuse(db, storage, up, BadRequest(
            f"the uploaded file does not match what was declared (sha256 {sha[:16]}..., {n} bytes; declared "
            f"{up.sha256[:16]}..., {up.size} bytes); nothing was kept: check the file and upload it again"))
    if problem:
        _refuse(db, storage, up, Unprocessable(f"{up.filename}: {problem}; nothing was kept"))
    up.completed_at = utcnow()
    if hold:
        up.status = STORED
        db.flush()
        crash_point("complete:recorded")  # committed with the caller's own changes
        return up
    # checked: from here on a crash is finished (by a retry or the sweeper), never undone, so
    # that a blob is never left without its artifact
    up.status = VERIFIED
    db.commit()
    crash_point("complete:verified")
    return _keep(db, storage, up)


def _assemble(db: Session, storage: Storage, up: Upload, hasher) -> bool:
    """Assemble the parts; True when the store hashed every byte (into `hasher`) as it wrote them."""
    try:
        return storage.complete_multipart(up.key, up.backend_upload_id, part_lengths(up), hasher)
    except PartsMissing as e:
        raise BadRequest(f"parts {e.numbers[:10]} have not arrived; PUT them and complete again",
                         missing_parts=e.numbers) from None
    except StorageError as e:  # a part of the wrong size, or parts lost: nothing of it is kept
        _refuse(db, storage, up, BadRequest(f"{e}; nothing was kept: start the upload again"))


def _inspect(storage: Storage, settings, up: Upload, hold: bool, hashed) -> tuple[str, int, str | None]:
    """(sha256, size, why it is not a file of its kind or None) of the assembled upload.
    `hashed`: the hash of the bytes, taken as the store wrote them (local files), else None
    and the object is read once here for it (S3, or an object assembled before a crash).
    Weights held for validation are only hashed here, streamed: no local copy that a crash
    could leave behind (validation checks their header and tensors). Other files are hashed
    on their way to the local copy their kind is checked on: one read for both."""
    if hold:
        if hashed is not None:
            return hashed.hexdigest(), storage.size(up.key) or 0, None
        return *storage.sha256(up.key), None
    scratch = settings.work_dir / SCRATCH  # what a crash leaves here, the sweeper deletes
    scratch.mkdir(parents=True, exist_ok=True)
    h = None if hashed is not None else hashlib.sha256()
    with storage.local_copy(up.key, scratch, h) as path:
        sha, n = (hashed or h).hexdigest(), path.stat().st_size
        return sha, n, check_kind(path, up) if sha == up.sha256 and n == up.size else None


def _refuse(db: Session, storage: Storage, up: Upload, error: Exception) -> NoReturn:
    """Delete the upload, bytes and row, for good; then raise `error`. (Cut short by a crash,
    the next look at the upload finishes the deletion.)"""
    delete(db, storage, up)
    db.commit()
    raise error


def _keep(db: Session, storage: Storage, up: Upload) -> Upload:
    """A verified upload becomes its content-addressed blob, recorded as an artifact.
    Idempotent: the blob is there (moved before a crash) or is made now."""
    origin = f"{up.purpose} uploaded by {db.get(User, up.user_id).username}"
    promote(db, storage, up.key, up.sha256, up.size, up.purpose, origin)
    crash_point("complete:promoted")
    up.status = COMPLETE
    db.flush()
    return up


def check_kind(path: Path, up: Upload) -> str | None:
    """Why a finished upload (its bytes at `path`) is not a file of its purpose's kind, or None."""
    from btm.errors import BTMError
    from btm.safetensors_io import read_header

    try:
        if up.purpose in ("sample", "eval-data"):
            check_text_aside(path, up.filename)
        elif up.purpose == "weights":
            read_header(path, name=up.filename)
        elif up.filename.endswith(".json"):
            with open(path, "rb") as f:
                if not isinstance(json.loads(f.read()), dict):
                    return "a .json model file must hold a JSON object"
        elif up.filename.endswith(TEXT_FILES):
            check_text_aside(path, up.filename, documents=False)
        else:
            return (f"model files are config, tokenizer (.json, .txt) and README files; {up.filename!r} is "
                    "none of these (weights go up with purpose 'weights', as safetensors)")
    except (BTMError, ValueError, UnicodeDecodeError) as e:
        return str(e).removeprefix(f"{up.filename}: ")
    return None


ASIDE_BYTES = 1 << 20  # a text file this large is checked in a process of its own
ASIDE_NICE = 10  # ... at a lower priority than the requests that process answers


def check_text_aside(path: Path, name: str, documents: bool = True) -> None:
    """btm.textcheck.check_text_file, in a process of its own for a large file: parsing every
    line of a 16 MiB sample is a few hundred milliseconds of pure Python, which in the API
    process would hold its interpreter while twenty uploads complete at once, and every
    request would wait behind it. (Here the thread only waits.) That process runs at a lower
    priority (ASIDE_NICE): twenty of them at once take the CPU the requests leave. Raises
    DataError."""
    import subprocess
    import sys

    from btm.errors import DataError
    from btm.textcheck import check_text_file

    if Path(path).stat().st_size < ASIDE_BYTES:
        check_text_file(path, name, documents)
        return
    try:
        r = subprocess.run([sys.executable, "-m", "btm.textcheck", str(path), name, "--nice", str(ASIDE_NICE),
                            *([] if documents else ["--no-documents"])],
                           capture_output=True, text=True, timeout=600, check=True)
        answer = json.loads(r.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        log.warning("checking %s in a process of its own failed (%s); checking it here", name, e)
        check_text_file(path, name, documents)
        return
    if "error" in answer:
        raise DataError(answer["error"])


def promote(db: Session, storage: Storage, key: str, sha256: str, size: int, kind: str, origin: str) -> bool:
    """Make the object at `key` the content-addressed blob of its sha256. Returns False (and
    deletes `key`) when the blob already existed."""
    existed = storage.exists(blob_key(sha256))
    if existed:
        storage.delete(key)
    else:
        storage.move(key, blob_key(sha256))
    try:
        with db.begin_nested():
            db.add(Artifact(sha256=sha256, size=size, kind=kind[:32], origin=origin[:200]))
    except IntegrityError:  # recorded by a concurrent request; the blob is the same bytes
        pass
    return not existed


def delete(db: Session, storage: Storage, up: Upload) -> None:
    """An upload that is not kept (refused, expired, aborted, or its contribution discarded):
    its bytes (assembled object and any parts) and its row go for good."""
    if up.status == OPEN:
        storage.abort_multipart(up.key, up.backend_upload_id)
    if up.status != COMPLETE:  # a complete upload's bytes are a shared blob now, not under its key
        storage.delete(up.key)
    db.delete(up)
    db.flush()


def abort(db: Session, storage: Storage, user: User, upload_id: str) -> None:
    up = get(db, user, upload_id)
    if up.status == STORED:
        raise Conflict(f"upload {upload_id} holds a contribution's weights; abandon the contribution instead")
    if up.status in (VERIFIED, COMPLETE):
        raise Conflict(f"upload {upload_id} is {up.status} (its file was checked); there is nothing to abort")
    delete(db, storage, up)


def require_own(db: Session, user: User, sha256: str, purposes: tuple[str, ...], what: str) -> Upload:
    """A finished upload of `user` with this sha256 and one of `purposes`: what a reference by
    hash may name. Another user's file of the same hash is never enough."""
    up = db.scalar(select(Upload).where(Upload.user_id == user.id, Upload.sha256 == sha256,
                                        Upload.status == COMPLETE, Upload.purpose.in_(purposes)).limit(1))
    if up is None:
        raise BadRequest(f"you have no finished {what} upload with sha256 {sha256}; upload the file first "
                         f"(POST /api/v1/uploads with purpose {purposes[0]!r}, then complete it)")
    return up


def put_small(db: Session, storage: Storage, data: bytes, kind: str, origin: str = "made by the coordinator") -> Artifact:
    """Store bytes the service produced itself (manifests, configs, cards) as a blob."""
    sha = hashlib.sha256(data).hexdigest()
    if not storage.exists(blob_key(sha)):
        storage.put_bytes(blob_key(sha), data)
    return _artifact(db, sha, len(data), kind, origin)


def put_file(db: Session, storage: Storage, path: Path, kind: str, origin: str = "made by the coordinator") -> Artifact:
    from btm.hashing import sha256_file

    sha = sha256_file(path)
    if not storage.exists(blob_key(sha)):
        storage.put_file(blob_key(sha), path)
    return _artifact(db, sha, path.stat().st_size, kind, origin)


def _artifact(db: Session, sha: str, size: int, kind: str, origin: str) -> Artifact:
    art = db.get(Artifact, sha)
    if art is None:
        art = Artifact(sha256=sha, size=size, kind=kind[:32], origin=origin[:200])
        db.add(art)
        db.flush()
    return art


def put_dir(db: Session, storage: Storage, directory: Path, origin: str) -> dict[str, str]:
    """Every file of a model directory the service wrote, as artifacts: {file name: sha256}
    (not the training state a run leaves there, e.g. metrics.jsonl)."""
    return {p.name: put_file(db, storage, p, "weights" if is_weights_file(p.name) else "file", origin).sha256
            for p in sorted(directory.iterdir()) if p.is_file() and is_model_file(p.name)}


def _started(key: str, reported: float) -> float:
    """When a multipart upload began: the later of the store's word and the time in its key.
    Some S3-compatible stores report a fixed date for every upload, which would make one
    whose row is being committed right now look abandoned."""
    stamp = key.rpartition("/")[2].partition("-")[0]
    return max(reported, float(stamp)) if stamp.isdigit() else reported


def sweep(db: Session, storage: Storage, settings) -> dict[str, int]:
    """Expire uploads past their time and finish or delete what a crash left behind: verified
    uploads not yet kept, multipart uploads with no open upload, temporary files. Run
    periodically."""
    n_expired = 0
    for up in list(db.scalars(select(Upload).where(Upload.status == OPEN, Upload.expires_at < utcnow()).limit(500))):
        delete(db, storage, up)
        n_expired += 1
    # a complete still running keeps its upload verified for moments, not minutes
    verified = list(db.scalars(select(Upload).where(Upload.status == VERIFIED,
                                                    Upload.completed_at < utcnow() - timedelta(minutes=10)).limit(100)))
    for up in verified:
        _keep(db, storage, up)
    stale = storage.stale_temporaries(older_than=3600) + _stale_scratch(settings.work_dir / SCRATCH, 3600)
    for p in stale:
        p.unlink(missing_ok=True)
    return {"expired": n_expired, "kept": len(verified), "orphan_parts": _abort_orphans(db, storage),
            "temporaries": len(stale)}


def _abort_orphans(db: Session, storage: Storage) -> int:
    """Abort the multipart uploads no open upload owns (a crash between making one and
    committing its row, or between deleting a row and aborting its parts)."""
    # the store's list first: an upload whose row is not committed yet is missing from open_ids,
    # and the age guard keeps it (a row is committed within seconds of its multipart upload)
    multiparts = storage.multipart_ids()
    open_ids = set(db.scalars(select(Upload.backend_upload_id).where(Upload.status == OPEN)))
    orphans = 0
    for key, mp, started in multiparts:
        if mp not in open_ids and _started(key, started) < time.time() - 600:
            storage.abort_multipart(key, mp)
            orphans += 1
    return orphans


def _stale_scratch(scratch: Path, older_than: float) -> list[Path]:
    """Local copies of uploads (S3) that a crash during their check left behind."""
    cutoff, out = time.time() - older_than, []
    for p in scratch.iterdir() if scratch.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):  # a check just ended and removed it
            if p.is_file() and p.stat().st_mtime < cutoff:
                out.append(p)
    return out
