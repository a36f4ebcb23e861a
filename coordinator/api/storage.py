"""The local backend's signed URLs: part uploads streamed to disk, object downloads streamed
from disk. (On S3 these URLs point at the object store and never reach this process.)"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from coordinator.api.deps import StorageDep
from coordinator.errors import BadRequest, Forbidden, NotFound
from coordinator.storage import LocalStorage, StorageError

router = APIRouter(prefix="/storage", tags=["storage"], include_in_schema=False)


def _local(storage) -> LocalStorage:
    if not isinstance(storage, LocalStorage):
        raise NotFound("this coordinator stores artifacts in S3; use the presigned URLs it gives")
    return storage


@router.put("/parts/{upload_id}/{part_number}")
async def put_part(upload_id: str, part_number: int, request: Request, storage: StorageDep,
                   expires: int = Query(...), sig: str = Query(...), length: int = Query(..., ge=0)):
    """A part's bytes, exactly `length` of them (the signature covers the length)."""
    s = _local(storage)
    if not s.verify(f"put:{upload_id}:{part_number}:{length}", expires, sig):
        raise Forbidden("this upload URL is invalid or has expired; ask the coordinator for fresh URLs")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) != length:
        raise BadRequest(f"part {part_number} must have exactly {length} bytes; the request declares {declared}")
    try:
        part = await s.write_part(upload_id, part_number, request.stream(), length)
    except StorageError as e:
        raise BadRequest(str(e)) from None
    return {"part_number": part["part_number"], "etag": part["etag"], "size": part["size"]}


@router.get("/objects/{key:path}")
def get_object(key: str, storage: StorageDep, expires: int = Query(...), sig: str = Query(...),
               filename: str | None = None):
    s = _local(storage)
    if not s.verify(f"get:{key}", expires, sig):
        raise Forbidden("this download URL is invalid or has expired; ask the coordinator for a fresh one")
    try:
        path = s.path(key)
    except StorageError:
        raise NotFound("no such object") from None
    if not path.is_file():
        raise NotFound("no such object")
    return FileResponse(path, filename=filename, media_type="application/octet-stream")
