from __future__ import annotations

from fastapi import APIRouter, status

from coordinator.api.deps import DB, Contributor, SettingsDep, StorageDep
from coordinator.schemas import CompleteIn, Error, UploadDone, UploadIn, UploadOut
from coordinator.services import uploads

router = APIRouter(prefix="/uploads", tags=["uploads"],
                   responses={400: {"model": Error}, 401: {"model": Error}, 403: {"model": Error},
                              404: {"model": Error}, 409: {"model": Error}, 413: {"model": Error},
                              422: {"model": Error}, 429: {"model": Error}})


@router.post("", status_code=status.HTTP_201_CREATED, response_model=UploadOut)
def start_upload(body: UploadIn, user: Contributor, db: DB, storage: StorageDep, settings: SettingsDep):
    """Start a (multipart) upload: PUT each part's bytes (exactly its `length`) to its URL,
    then complete. Every upload carries its own bytes; unfinished ones expire."""
    up = uploads.start(db, storage, settings, user, body.purpose, body.filename, body.sha256, body.size)
    # committed here, on this thread: on SQLite the transaction holds the one writer's place from
    # its first write, and twenty uploads starting at once would otherwise each hold it across
    # the hand-overs to the threads that check the answer and end the session
    db.commit()
    return uploads.describe(storage, up)


@router.get("/{upload_id}", response_model=UploadOut)
def get_upload(upload_id: str, user: Contributor, db: DB, storage: StorageDep):
    """Which parts have arrived (to resume an interrupted upload), with fresh URLs."""
    return uploads.resume(db, storage, user, upload_id)


@router.post("/{upload_id}/complete", response_model=UploadDone)
def complete_upload(upload_id: str, body: CompleteIn, user: Contributor, db: DB, storage: StorageDep,
                    settings: SettingsDep):
    """Assemble the parts, check the sha256 and the file's kind on the server. Safe to call again."""
    return uploads.complete(db, storage, settings, user, upload_id)


@router.delete("/{upload_id}", status_code=status.HTTP_204_NO_CONTENT)
def abort_upload(upload_id: str, user: Contributor, db: DB, storage: StorageDep):
    """Give up an unfinished upload; what arrived is deleted."""
    uploads.abort(db, storage, user, upload_id)
