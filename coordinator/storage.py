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
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlencode, urlparse

from btm import atomic
from coordinator.crash import crash_point

CHUNK = 8 * 1024 * 1024


def blob_key(sha256: str) -> str:
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


class StorageError(Exception):
    pass


class UploadGone(StorageError):
    """The multipart upload no longer exists: completed (assembled), aborted or expired."""


class PartsMissing(StorageError):
    def __init__(self, numbers: list[int]):
        super().__init__(f"parts {numbers[:10]} have not arrived")
        self.numbers = numbers


_writers: list = []


WRITE_BYTES = 1 << 20  # a part's bytes are written this much at a time


def _disk_writers():
    """Threads for part writes, apart from the request threads (made in the server's loop)."""
    import anyio

    if not _writers:
        _writers.append(anyio.CapacityLimiter(8))
    return _writers[0]


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
        with atomic.replacing(dest, atomic.unique_tmp_name(dest)) as tmp, open(tmp, "wb") as f:
            for c in self.iter_chunks(key):
                f.write(c)

    @contextmanager
    def local_copy(self, key: str, scratch: Path, hasher=None) -> Iterator[Path]:
        """The object as a local file for as long as the block runs (a download, removed after).
        With `hasher` (a hashlib object) every byte is hashed on the way: one read for both."""
        tmp = Path(scratch) / f"copy-{uuid.uuid4().hex}"
        if hasher is None:
            self.get_file(key, tmp)
        else:
            with open(tmp, "wb") as f:
                for c in self.iter_chunks(key):
                    hasher.update(c)
                    f.write(c)
        try:
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    @abstractmethod
    def read_range(self, key: str, start: int, n: int) -> bytes:
        """At most `n` bytes of the object from `start` (a header, never the whole object)."""

    @contextmanager
    def local_head(self, key: str, scratch: Path, head: int) -> Iterator[Path]:
        """A local stand-in for the object, for checks that read only its first `head` bytes
        (a safetensors header): a file of the object's size holding those bytes, the rest a
        hole that is never read. The object's bytes are not downloaded."""
        size = self.size(key)
        if size is None:
            raise StorageError(f"no object {key}")
        tmp = Path(scratch) / f"head-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(self.read_range(key, 0, min(head, size)))
            f.truncate(size)
        try:
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

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
    def part_url(self, key: str, upload_id: str, part_number: int, length: int) -> str:
        """A URL that accepts exactly `length` bytes as part `part_number`."""

    @abstractmethod
    def list_parts(self, key: str, upload_id: str) -> list[dict]:
        """The parts that have arrived; UploadGone once the multipart upload is no more."""

    @abstractmethod
    def complete_multipart(self, key: str, upload_id: str, lengths: list[int], hasher=None) -> bool:
        """Assemble parts 1..n (part i of lengths[i-1] bytes) into `key`. Idempotent: once the
        object is assembled (a crash may have cut the call short at any point after that),
        calling it again checks the object's size, removes what is left of the parts, and
        returns. Returns True when every byte of the object passed through `hasher` (a hashlib
        object, may be None) on its way into it, in order: the store assembled it itself and
        hashed it while writing; False when it did not (an object assembled before, or by a
        store the bytes never pass through), and a caller that wants the hash reads it."""

    def check_parts(self, key: str, upload_id: str, lengths: list[int]) -> dict[int, dict]:
        """The uploaded parts, once each has arrived with exactly its length."""
        have = {p["part_number"]: p for p in self.list_parts(key, upload_id)}
        missing = [i for i in range(1, len(lengths) + 1) if i not in have]
        if missing:
            raise PartsMissing(missing)
        for i, n in enumerate(lengths, 1):
            if have[i]["size"] != n:
                raise StorageError(f"part {i} has {have[i]['size']} bytes; it must have exactly {n}")
        extra = sorted(set(have) - set(range(1, len(lengths) + 1)))
        if extra:
            raise StorageError(f"parts {extra[:5]} are not parts of this upload")
        return have

    @abstractmethod
    def abort_multipart(self, key: str, upload_id: str) -> None: ...

    @abstractmethod
    def multipart_ids(self) -> list[tuple[str, str, float]]:
        """(key, upload id, started at as a Unix time) of every unfinished multipart upload."""

    @abstractmethod
    def stale_temporaries(self, older_than: float) -> list[Path]:
        """Temporary files a crash left behind, older than `older_than` seconds."""


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

    @contextmanager
    def local_copy(self, key, scratch, hasher=None):
        if hasher is not None:
            for c in self.iter_chunks(key):
                hasher.update(c)
        yield self.path(key)

    @contextmanager
    def local_head(self, key, scratch, head):
        if not self.exists(key):
            raise StorageError(f"no object {key}")
        yield self.path(key)

    def read_range(self, key, start, n):
        with open(self.path(key), "rb") as f:
            f.seek(start)
            return f.read(n)

    @staticmethod
    def _read(path: Path, chunk: int = CHUNK) -> Iterator[bytes]:
        """Every byte of a stored file, in chunks: the one way this store reads an object or a
        part whole (so that a test can count the full reads)."""
        with open(path, "rb") as f:
            while b := f.read(chunk):
                yield b

    def size(self, key):
        p = self.path(key)
        return p.stat().st_size if p.is_file() else None

    def put_file(self, key, path):
        dst = self.path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        atomic.copy_file(path, dst, tmp_name=atomic.unique_tmp_name(dst))

    def iter_chunks(self, key, chunk=CHUNK):
        p = self.path(key)
        if not p.is_file():
            raise StorageError(f"no object {key}")
        yield from self._read(p, chunk)

    def get_file(self, key, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic.copy_file(self.path(key), dest, tmp_name=atomic.unique_tmp_name(dest))

    def delete(self, key):
        p = self.path(key)
        p.unlink(missing_ok=True)
        for leftover in (".assembling", ".lock"):  # what an assembly cut short by a crash leaves
            p.with_name(p.name + leftover).unlink(missing_ok=True)

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

    def part_url(self, key, upload_id, part_number, length):
        return self._signed(f"parts/{upload_id}/{part_number}", f"put:{upload_id}:{part_number}:{length}",
                            {"length": length})

    async def write_part(self, upload_id: str, part_number: int, body: AsyncIterator[bytes], length: int) -> dict:
        """Stream a PUT body to the part file, refusing a byte more or less than `length` (what
        the signed URL allows). (No ETag: parts are checked by length, the whole by sha256.)"""
        d = self._mp_dir(upload_id)
        if not d.is_dir():
            raise StorageError("no such upload (completed, expired or aborted); ask the coordinator for a new one")
        import anyio

        part = d / f"part-{part_number:05d}"
        n = 0
        with atomic.replacing(part, atomic.unique_tmp_name(part)) as tmp:
            with open(tmp, "wb") as f:
                held: list[bytes] = []
                async for chunk in body:
                    n += len(chunk)
                    if n > length:
                        raise StorageError(f"part {part_number} is larger than its {length} bytes")
                    held.append(chunk)
                    if sum(map(len, held)) >= WRITE_BYTES:
                        # the disk write on a thread: a slow disk must not stall every other request
                        # (a MiB at a time: one hand-over per MiB, not one per chunk the socket gave)
                        await anyio.to_thread.run_sync(f.write, b"".join(held), limiter=_disk_writers())
                        held.clear()
                if held:
                    await anyio.to_thread.run_sync(f.write, b"".join(held), limiter=_disk_writers())
            if n != length:
                raise StorageError(f"part {part_number} has {n} bytes; it must have exactly {length}")
        return {"part_number": part_number, "etag": None, "size": n}

    def list_parts(self, key, upload_id):
        d = self._mp_dir(upload_id)
        if not d.is_dir():
            raise UploadGone("no such upload (completed, expired or aborted)")
        out = []
        for p in sorted(d.glob("part-?????")):
            out.append({"part_number": int(p.name[5:]), "size": p.stat().st_size, "etag": None})
        return out

    def complete_multipart(self, key, upload_id, lengths, hasher=None):
        import fcntl

        d = self._mp_dir(upload_id)
        dst = self.path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        # one assembler per object at a time (a client retrying while the first try still runs)
        with open(dst.with_name(dst.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                # the object appears whole (a rename), and only from these parts: once it is
                # there, the parts (all, some or none of them left) are done with
                hashed = False
                if self.size(key) != sum(lengths):
                    if not d.is_dir():
                        raise StorageError("the upload's parts are gone and nothing was assembled; start the upload "
                                           "again")
                    self._assemble(key, upload_id, lengths, hasher)
                    hashed = hasher is not None
                    crash_point("complete:replaced")
                shutil.rmtree(d, ignore_errors=True)
                return hashed
            finally:
                dst.with_name(dst.name + ".lock").unlink(missing_ok=True)

    def _assemble(self, key: str, upload_id: str, lengths: list[int], hasher=None) -> None:
        """The parts, checked, into the object: whole or not at all (a rename). One pass over
        the bytes, which `hasher` sees on the way (the object's sha256 costs no read of its own)."""
        self.check_parts(key, upload_id, lengths)
        d, dst = self._mp_dir(upload_id), self.path(key)
        parts = [d / f"part-{n:05d}" for n in range(1, len(lengths) + 1)]
        if len(lengths) == 1:  # one part is the whole object: hash it, move it, no copy
            if hasher is not None:
                for c in self._read(parts[0]):
                    hasher.update(c)
            os.replace(parts[0], dst)
            return
        tmp = dst.with_name(dst.name + ".assembling")  # one name: a retry after a crash overwrites it
        with open(tmp, "wb") as out:
            for part in parts:
                for c in self._read(part):
                    if hasher is not None:
                        hasher.update(c)
                    out.write(c)
        crash_point("complete:assembling")
        os.replace(tmp, dst)

    def multipart_ids(self) -> list[tuple[str, str, float]]:
        root = self.root / ".multipart"
        out = []
        for d in root.iterdir() if root.is_dir() else []:
            if d.is_dir():
                key = d / "key"
                out.append((key.read_text() if key.exists() else "", d.name, d.stat().st_mtime))
        return out

    def stale_temporaries(self, older_than: float) -> list[Path]:
        """Temporary files a crash left behind (assembling, copying), older than `older_than` s."""
        cutoff = time.time() - older_than
        return [p for p in self.root.rglob("*") if p.is_file() and p.name.endswith((".tmp", ".assembling"))
                and p.stat().st_mtime < cutoff]

    def abort_multipart(self, key, upload_id):
        shutil.rmtree(self._mp_dir(upload_id), ignore_errors=True)


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

    def read_range(self, key, start, n):
        if n <= 0:
            return b""
        return self.client.get_object(Bucket=self.bucket, Key=self.k(key),
                                      Range=f"bytes={start}-{start + n - 1}")["Body"].read()

    def get_file(self, key, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(dest, atomic.unique_tmp_name(dest)) as tmp:
            self.client.download_file(self.bucket, self.k(key), str(tmp))

    def delete(self, key):
        self.client.delete_object(Bucket=self.bucket, Key=self.k(key))

    def move(self, src, dst):
        self.client.copy({"Bucket": self.bucket, "Key": self.k(src)}, self.bucket, self.k(dst))
        crash_point("move:copied")
        self.delete(src)

    def download_url(self, key, filename=None):
        params = {"Bucket": self.bucket, "Key": self.k(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        return self.signer.generate_presigned_url("get_object", Params=params, ExpiresIn=self.ttl)

    def create_multipart(self, key):
        return self.client.create_multipart_upload(Bucket=self.bucket, Key=self.k(key))["UploadId"]

    def part_url(self, key, upload_id, part_number, length):
        # ContentLength is signed: the store refuses a body of any other size
        return self.signer.generate_presigned_url(
            "upload_part",
            Params={"Bucket": self.bucket, "Key": self.k(key), "UploadId": upload_id, "PartNumber": part_number,
                    "ContentLength": length},
            ExpiresIn=self.ttl,
        )

    def list_parts(self, key, upload_id):
        from botocore.exceptions import ClientError

        out = []
        kw = {"Bucket": self.bucket, "Key": self.k(key), "UploadId": upload_id}
        while True:
            try:
                r = self.client.list_parts(**kw)
            except ClientError as e:
                if e.response["Error"]["Code"] == "NoSuchUpload":
                    raise UploadGone("no such upload (completed, expired or aborted)") from None
                raise
            out += [{"part_number": p["PartNumber"], "size": p["Size"], "etag": p["ETag"]} for p in r.get("Parts", [])]
            if not r.get("IsTruncated"):
                return out
            kw["PartNumberMarker"] = r["NextPartNumberMarker"]

    def complete_multipart(self, key, upload_id, lengths, hasher=None):
        """Assembled in the store, where the server never sees the bytes: returns False (the
        caller reads the object once to hash it)."""
        from botocore.exceptions import ClientError

        try:
            have = self.check_parts(key, upload_id, lengths)
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.k(key), UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": i, "ETag": have[i]["etag"]}
                                           for i in range(1, len(lengths) + 1)]},
            )
        except (UploadGone, ClientError) as e:  # completed before (a retry), or by a concurrent call just now
            if isinstance(e, ClientError) and e.response["Error"]["Code"] != "NoSuchUpload":
                raise
            if self.size(key) != sum(lengths):
                raise StorageError("the upload's parts are gone and nothing was assembled; start the upload "
                                   "again") from None
        return False

    def abort_multipart(self, key, upload_id):
        from botocore.exceptions import ClientError

        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.k(key), UploadId=upload_id)
        except ClientError as e:
            if e.response["Error"]["Code"] != "NoSuchUpload":
                raise

    def multipart_ids(self) -> list[tuple[str, str, float]]:
        out, kw = [], {"Bucket": self.bucket, "Prefix": self.k("uploads/")}
        strip = len(self.prefix) + 1 if self.prefix else 0
        while True:
            r = self.client.list_multipart_uploads(**kw)
            out += [(u["Key"][strip:], u["UploadId"], u["Initiated"].timestamp()) for u in r.get("Uploads", [])]
            if not r.get("IsTruncated"):
                return out
            kw.update(KeyMarker=r["NextKeyMarker"], UploadIdMarker=r["NextUploadIdMarker"])

    def stale_temporaries(self, older_than: float) -> list:
        return []  # S3 writes are atomic: nothing half-written is left behind


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
