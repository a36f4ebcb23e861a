"""Artifact storage on S3 through boto3, against moto's server on loopback: multipart
uploads through presigned URLs (the bytes never touch the API process), presigned
downloads, the server-side hash check; and the whole flow on an S3-backed coordinator."""

import hashlib
import os
from urllib.parse import urlparse

import httpx
import pytest
from live import Coordinator, MotoS3, run_contribution_flow

from coordinator.storage import S3Storage


@pytest.fixture(scope="module")
def moto():
    m = MotoS3()
    yield m
    m.stop()


def test_presigned_multipart_upload_and_download(moto, tmp_path):
    s = S3Storage("unit", "pre/fix", moto.url, "us-east-1", "testing", "testing", ttl=600)
    s.ensure_bucket()
    data = os.urandom(5 * 1024 * 1024) + os.urandom(1000)  # two parts (S3's minimum part is 5 MiB)
    uid = s.create_multipart("uploads/x")
    chunks = [data[: 5 << 20], data[5 << 20 :]]
    for i, chunk in enumerate(chunks, 1):
        url = s.part_url("uploads/x", uid, i, len(chunk))
        assert urlparse(url).port == moto.port  # straight to the store
        r = httpx.put(url, content=chunk)
        assert r.status_code == 200
    assert [p["part_number"] for p in s.list_parts("uploads/x", uid)] == [1, 2]
    s.complete_multipart("uploads/x", uid, [len(c) for c in chunks])
    s.complete_multipart("uploads/x", uid, [len(c) for c in chunks])  # a retried complete is a no-op
    assert s.sha256("uploads/x") == (hashlib.sha256(data).hexdigest(), len(data))
    s.move("uploads/x", "blobs/y")
    assert not s.exists("uploads/x") and s.size("blobs/y") == len(data)
    assert httpx.get(s.download_url("blobs/y", "y.bin")).content == data
    s.get_file("blobs/y", tmp_path / "y")
    assert (tmp_path / "y").read_bytes() == data
    listed = s.client.list_objects_v2(Bucket=s.bucket, Prefix="pre/fix/blobs/").get("Contents", [])
    assert [o["Key"] for o in listed] == ["pre/fix/blobs/y"]  # under the storage's prefix
    s.delete("blobs/y")
    assert not s.exists("blobs/y")


def test_contribution_flow_on_s3(moto, tmp_path_factory, seed_dir, tok, cache_dir, tmp_path):
    c = Coordinator(tmp_path_factory.mktemp("s3coord"), moto.env("elmforest"))
    try:
        r = run_contribution_flow(c, seed_dir, tok, cache_dir, tmp_path, forest="s3")
        d = r["admin"].get("/forests/s3/download")
        assert all(urlparse(u).port == moto.port for u in d["files"].values())
        assert not (c.data_dir / "artifacts").exists()  # nothing stored locally
    finally:
        c.stop()


def test_the_sweeper_aborts_orphans_but_not_an_upload_being_created(moto, tmp_path):
    """moto reports one fixed start date for every multipart upload; the sweeper must still
    keep one whose row is not committed yet (started just now, per the time in its key), and
    abort one that no upload row has claimed for over ten minutes."""
    import time

    from coordinator.db import session_scope
    from coordinator.migrate import upgrade
    from coordinator.services import uploads
    from coordinator.settings import Settings

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    s = S3Storage("sweep", "", moto.url, "us-east-1", "testing", "testing", ttl=600)
    s.ensure_bucket()
    fresh = s.create_multipart(f"uploads/{int(time.time())}-new")
    s.create_multipart(f"uploads/{int(time.time()) - 3600}-old")
    s.create_multipart("uploads/no-stamp")  # the store's date (2010 on moto) is all there is
    with session_scope(url) as db:
        out = uploads.sweep(db, s, Settings(data_dir=tmp_path))
    assert out["orphan_parts"] == 2
    assert [mp for _, mp, _ in s.multipart_ids()] == [fresh]


def test_the_header_checks_download_nothing_but_the_header(moto, tmp_path):
    """Validation on S3 reads an upload's header through a local stand-in (the header, then a
    hole to the object's size) and its tensors from one streamed read; nothing is downloaded
    whole and the multipart assembly (in the store) hashes nothing."""
    import torch

    from btm.safetensors_io import read_header, save_state_dict, stream_tensors

    state = {"a": torch.randn(300, 300), "b": torch.arange(10), "c": torch.zeros(0)}
    save_state_dict(state, tmp_path / "m")
    data = (tmp_path / "m" / "model.safetensors").read_bytes()
    s = S3Storage("heads", "", moto.url, "us-east-1", "testing", "testing", ttl=600)
    s.ensure_bucket()
    uid = s.create_multipart("uploads/w")
    assert httpx.put(s.part_url("uploads/w", uid, 1, len(data)), content=data).status_code == 200
    assert s.complete_multipart("uploads/w", uid, [len(data)], hashlib.sha256()) is False  # not seen: not hashed
    got: list[int] = []
    get_object = s.client.get_object

    def counted(**kw):
        r = get_object(**kw)
        got.append(r["ContentLength"])
        return r

    s.client.get_object = counted
    head = 8 + int.from_bytes(data[:8], "little")
    with s.local_head("uploads/w", tmp_path, head) as stand_in:
        assert stand_in.stat().st_size == len(data) and got == [head]
        h = read_header(stand_in)  # the reference library accepts the stand-in as the file
        tensors = dict(stream_tensors(h, s.iter_chunks("uploads/w")))
    assert got == [head, len(data)]  # the header, then one read of the whole
    assert all(torch.equal(tensors[k], v) for k, v in state.items())
