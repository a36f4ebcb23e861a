"""Artifact storage: one interface, a local directory and S3 (boto3) behind it.

Blobs are content-addressed (`blobs/sha256/ab/abcd...`). Large files go up as multipart
uploads whose parts are PUT to URLs: presigned S3 URLs, or on the local backend signed URLs
served by the API itself (streamed to disk, never held in memory). Either way the client
code path is the same, and on S3 the weights never pass through the API process.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote, urlencode, urlparse

CHUNK = 8 * 1024 * 1024


def blob_key(sha256: str) -> str:
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


class StorageError(Exception):
    pass


class Storage(ABC):
    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int | None: ...

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    def put_bytes(self, key: str, data: bytes) -> None:
        import tempfile

        with tempfile.NamedTemporaryFile(delete=False) as f:
            f.write(data)
        try:
            self.put_file(key, Path(f.name))
        finally:
            os.unlink(f.name)

    @abstractmethod
    def iter_chunks(self, key: str, chunk: int = CHUNK) -> Iterator[bytes]: ...

    def get_file(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + f".{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                for c in self.iter_chunks(key):
                    f.write(c)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_chunks(key))

    def sha256(self, key: str) -> tuple[str, int]:
        """Stream the object and hash it (the server-side check of a declared hash)."""
        h = hashlib.sha256()
        n = 0
        for c in self.iter_chunks(key):
            h.update(c)
            n += len(c)
        return h.hexdigest(), n

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def move(self, src: str, dst: str) -> None: ...

    @abstractmethod
    def download_url(self, key: str, filename: str | None = None) -> str: ...

    # multipart
    @abstractmethod
    def create_multipart(self, key: str) -> str: ...

    @abstractmethod
    def part_url(self, key: str, upload_id: str, part_number: int) -> str: ...

    @abstractmethod
    def list_parts(self, key: str, upload_id: str) -> list[dict]: ...

    @abstractmethod
    def complete_multipart(self, key: str, upload_id: str, parts: list[dict]) -> None: ...

    @abstractmethod
    def abort_multipart(self, key: str, upload_id: str) -> None: ...

    @abstractmethod
    def list_keys(self, prefix: str = "") -> Iterator[str]: ...


# ----------------------------------------------------------------------------- local


class LocalStorage(Storage):
    """A directory. Signed URLs point at the API (`/api/v1/storage/...`)."""

    def __init__(self, root: Path, public_url: str, secret: str, ttl: int = 3600):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.public_url = public_url.rstrip("/")
        self.secret = secret.encode()
        self.ttl = ttl

    def path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if not str(p).startswith(str(self.root.resolve()) + os.sep):
            raise StorageError(f"key {key!r} leaves the storage root")
        return p

    def exists(self, key):
        return self.path(key).is_file()

    def size(self, key):
        p = self.path(key)
        return p.stat().st_size if p.is_file() else None

    def put_file(self, key, path):
        dst = self.path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + f".{uuid.uuid4().hex[:8]}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dst)

    def iter_chunks(self, key, chunk=CHUNK):
        p = self.path(key)
        if not p.is_file():
            raise StorageError(f"no object {key}")
        with open(p, "rb") as f:
            while b := f.read(chunk):
                yield b

    def get_file(self, key, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + f".{uuid.uuid4().hex[:8]}.tmp")
        shutil.copyfile(self.path(key), tmp)
        os.replace(tmp, dest)

    def delete(self, key):
        self.path(key).unlink(missing_ok=True)

    def move(self, src, dst):
        d = self.path(dst)
        d.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path(src), d)

    # signed URLs -----------------------------------------------------------
    def sign(self, what: str, expires: int) -> str:
        return hmac.new(self.secret, f"{what}|{expires}".encode(), hashlib.sha256).hexdigest()

    def verify(self, what: str, expires: int, sig: str) -> bool:
        return expires >= time.time() and hmac.compare_digest(self.sign(what, expires), sig)

    def _signed(self, path: str, what: str, extra: dict | None = None) -> str:
        exp = int(time.time()) + self.ttl
        q = {"expires": exp, "sig": self.sign(what, exp), **(extra or {})}
        return f"{self.public_url}/api/v1/storage/{path}?{urlencode(q)}"

    def download_url(self, key, filename=None):
        return self._signed(f"objects/{quote(key)}", f"get:{key}", {"filename": filename} if filename else None)

    # multipart: parts live in .multipart/<id>/ until completed --------------
    def _mp_dir(self, upload_id: str) -> Path:
        if not upload_id.isalnum():
            raise StorageError("bad upload id")
        return self.root / ".multipart" / upload_id

    def create_multipart(self, key):
        uid = uuid.uuid4().hex
        d = self._mp_dir(uid)
        d.mkdir(parents=True)
        (d / "key").write_text(key)
        return uid

    def part_url(self, key, upload_id, part_number):
        return self._signed(f"parts/{upload_id}/{part_number}", f"put:{upload_id}:{part_number}")

    async def write_part(self, upload_id: str, part_number: int, body: AsyncIterator[bytes], max_bytes: int) -> dict:
        """Stream a PUT body to the part file; returns its ETag (md5, as S3 does)."""
        d = self._mp_dir(upload_id)
        if not d.is_dir():
            raise StorageError("no such upload (completed or aborted)")
        tmp = d / f"part-{part_number:05d}.{uuid.uuid4().hex[:8]}.tmp"
        md5 = hashlib.md5()
        n = 0
        try:
            with open(tmp, "wb") as f:
                async for chunk in body:
                    n += len(chunk)
                    if n > max_bytes:
                        raise StorageError(f"part is larger than the {max_bytes} bytes allowed")
                    md5.update(chunk)
                    f.write(chunk)
            os.replace(tmp, d / f"part-{part_number:05d}")
        finally:
            tmp.unlink(missing_ok=True)
        return {"part_number": part_number, "etag": f'"{md5.hexdigest()}"', "size": n}

    def list_parts(self, key, upload_id):
        d = self._mp_dir(upload_id)
        out = []
        for p in sorted(d.glob("part-?????")):
            out.append({"part_number": int(p.name[5:]), "size": p.stat().st_size, "etag": None})
        return out

    def complete_multipart(self, key, upload_id, parts):
        d = self._mp_dir(upload_id)
        dst = self.path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + f".{uuid.uuid4().hex[:8]}.tmp")
        numbers = sorted(p["part_number"] for p in parts) if parts else [x["part_number"] for x in self.list_parts(key, upload_id)]
        try:
            with open(tmp, "wb") as out:
                for n in numbers:
                    pf = d / f"part-{n:05d}"
                    if not pf.exists():
                        raise StorageError(f"part {n} was never uploaded")
                    with open(pf, "rb") as f:
                        shutil.copyfileobj(f, out, CHUNK)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)

    def abort_multipart(self, key, upload_id):
        shutil.rmtree(self._mp_dir(upload_id), ignore_errors=True)

    def list_keys(self, prefix=""):
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root).as_posix()
            if p.is_file() and not rel.startswith(".multipart/") and rel.startswith(prefix) and not rel.endswith(".tmp"):
                yield rel


# ----------------------------------------------------------------------------- S3


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None, region: str,
                 access_key: str | None, secret_key: str | None, ttl: int = 3600, public_endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config

        cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 5})
        kw = dict(region_name=region, aws_access_key_id=access_key, aws_secret_access_key=secret_key, config=cfg)
        self.client = boto3.client("s3", endpoint_url=endpoint_url, **kw)
        # presigned URLs must name the host clients can reach (e.g. localhost:9000 vs minio:9000)
        self.signer = boto3.client("s3", endpoint_url=public_endpoint_url, **kw) if public_endpoint_url else self.client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.ttl = ttl

    def k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def exists(self, key):
        return self.size(key) is not None

    def size(self, key):
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.k(key))["ContentLength"]
        except ClientError as e:
            if e.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def put_file(self, key, path):
        self.client.upload_file(str(path), self.bucket, self.k(key))

    def iter_chunks(self, key, chunk=CHUNK):
        body = self.client.get_object(Bucket=self.bucket, Key=self.k(key))["Body"]
        yield from body.iter_chunks(chunk)

    def get_file(self, key, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + f".{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.client.download_file(self.bucket, self.k(key), str(tmp))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, key):
        self.client.delete_object(Bucket=self.bucket, Key=self.k(key))

    def move(self, src, dst):
        self.client.copy({"Bucket": self.bucket, "Key": self.k(src)}, self.bucket, self.k(dst))
        self.delete(src)

    def download_url(self, key, filename=None):
        params = {"Bucket": self.bucket, "Key": self.k(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        return self.signer.generate_presigned_url("get_object", Params=params, ExpiresIn=self.ttl)

    def create_multipart(self, key):
        return self.client.create_multipart_upload(Bucket=self.bucket, Key=self.k(key))["UploadId"]

    def part_url(self, key, upload_id, part_number):
        return self.signer.generate_presigned_url(
            "upload_part",
            Params={"Bucket": self.bucket, "Key": self.k(key), "UploadId": upload_id, "PartNumber": part_number},
            ExpiresIn=self.ttl,
        )

    def list_parts(self, key, upload_id):
        out = []
        kw = {"Bucket": self.bucket, "Key": self.k(key), "UploadId": upload_id}
        while True:
            r = self.client.list_parts(**kw)
            out += [{"part_number": p["PartNumber"], "size": p["Size"], "etag": p["ETag"]} for p in r.get("Parts", [])]
            if not r.get("IsTruncated"):
                return out
            kw["PartNumberMarker"] = r["NextPartNumberMarker"]

    def complete_multipart(self, key, upload_id, parts):
        if not parts or any(not p.get("etag") for p in parts):
            parts = self.list_parts(key, upload_id)
        self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=self.k(key), UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": p["part_number"], "ETag": p["etag"]}
                                       for p in sorted(parts, key=lambda p: p["part_number"])]},
        )

    def abort_multipart(self, key, upload_id):
        self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.k(key), UploadId=upload_id)

    def list_keys(self, prefix=""):
        pag = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in pag.paginate(Bucket=self.bucket, Prefix=self.k(prefix)):
            for o in page.get("Contents", []):
                yield o["Key"][strip:]


def make_storage(settings) -> Storage:
    url = settings.artifacts_url
    u = urlparse(url)
    if u.scheme == "file":
        return LocalStorage(Path(u.path), settings.public_url, settings.signing_key(), settings.url_ttl_seconds)
    if u.scheme == "s3":
        return S3Storage(u.netloc, u.path, settings.s3_endpoint_url, settings.s3_region, settings.s3_access_key_id,
                         settings.s3_secret_access_key, settings.url_ttl_seconds,
                         getattr(settings, "s3_public_endpoint_url", None))
    raise StorageError(f"storage URL {url!r}: use file:///path or s3://bucket/prefix")
