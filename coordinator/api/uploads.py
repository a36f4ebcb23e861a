from __future__ import annotations

from fastapi import APIRouter, status

from coordinator.api.deps import DB, Contributor, SettingsDep, StorageDep
from coordinator.schemas import ArtifactOut, CompleteIn, Error, UploadIn, UploadOut
from coordinator.services import uploads

router = APIRouter(prefix="/uploads", tags=["uploads"],
                   responses={400: {"model": Error}, 401: {"model": Error}, 403: {"model": Error},
                              404: {"model": Error}, 413: {"model": Error}, 422: {"model": Error}})


@router.post("", status_code=status.HTTP_201_CREATED, response_model=UploadOut)
def start_upload(body: UploadIn, user: Contributor, db: DB, storage: StorageDep, settings: SettingsDep):
    """Start a (multipart) upload: PUT each part's bytes to its URL, then complete.
    A file the store already holds (same sha256) needs no upload: `exists` is true."""
    return uploads.start(db, storage, settings, user, body.purpose, body.filename, body.sha256, body.size)


@router.get("/{upload_id}", response_model=UploadOut)
def get_upload(upload_id: str, user: Contributor, db: DB, storage: StorageDep):
    """Which parts have arrived (to resume an interrupted upload), with fresh URLs."""
    return uploads.resume(db, storage, user, upload_id)


@router.post("/{upload_id}/complete", response_model=ArtifactOut)
def complete_upload(upload_id: str, body: CompleteIn, user: Contributor, db: DB, storage: StorageDep):
    """Assemble the parts and check the sha256 on the server."""
    parts = [p.model_dump() for p in body.parts] if body.parts else None
    return uploads.complete(db, storage, user, upload_id, parts)


@router.delete("/{upload_id}", status_code=status.HTTP_204_NO_CONTENT)
def abort_upload(upload_id: str, user: Contributor, db: DB, storage: StorageDep):
    uploads.abort(db, storage, user, upload_id)
