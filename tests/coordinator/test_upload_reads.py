"""How often an upload's bytes are read on their way from the parts a contributor PUT to
the state `validated`, on the local backend: once as the parts are written into the object
(hashed on the way), once by the tensor checks. Every full read of a stored object or part
goes through LocalStorage._read, which this test counts; the header checks read the header
alone, and nothing else reads the weights whole."""

import json

import torch
from helpers import CORPUS
from live import Coordinator, add_domain
from sqlalchemy import select

from btm.safetensors_io import iter_tensors, open_weights, save_state_dict
from btm.tokenizer import load_tokenizer, tokenizer_sha256
from contributor_client import commands
from contributor_client.http import sha256_file
from coordinator.models import Contribution, State, Upload, User
from coordinator.services import contributions
from coordinator.storage import LocalStorage, make_storage

PART = 64 * 1024  # small parts: the object is assembled from several


def test_an_upload_is_read_twice_on_its_way_to_validated(tmp_path, seed_dir, monkeypatch):
    c = Coordinator(tmp_path / "coord", {"ELMFOREST_PART_SIZE": str(PART)})
    try:
        admin, mallory = c.user("admin", "admin"), c.user("mallory")
        admin.create_forest("reads", seed_dir)
        add_domain(mallory, "python", CORPUS)
        b = commands.request_branch(mallory, "reads", "python", method="posterior", data=CORPUS / "python")
        init = commands.download_init(mallory, b, tmp_path / "init")
        g = torch.Generator().manual_seed(0)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in iter_tensors(open_weights(init))}
        save_state_dict(state, tmp_path / "elm")
        weights = tmp_path / "elm" / "model.safetensors"
        size = weights.stat().st_size
        r = mallory.post("/contributions", {
            "forest": "reads", "branch_init_id": b["id"], "name": "counted", "sha256": sha256_file(weights),
            "size": size, "config": json.loads((seed_dir / "config.json").read_text()),
            "tokenizer_sha256": tokenizer_sha256(load_tokenizer(seed_dir))})
        cid, parts = r["contribution"]["id"], r["upload"]["parts"]
        assert len(parts) > 1
        mallory.put_parts(weights, r["upload"])  # written by the server (not read): the parts

        reads: list[tuple[str, int]] = []  # (the file read whole, how many bytes)
        read = LocalStorage._read

        def counted(path, chunk=8 << 20):
            n = 0
            try:
                for b_ in read(path, chunk):
                    n += len(b_)
                    yield b_
            finally:
                reads.append((str(path), n))

        monkeypatch.setattr(LocalStorage, "_read", staticmethod(counted))
        settings = c.settings
        storage = make_storage(settings)
        with c.db() as db:  # what the API's complete and then the validate job do, in this process
            user = db.scalar(select(User).where(User.username == "mallory"))
            up_key = db.get(Upload, db.get(Contribution, cid).upload_id).key
            up_id = db.get(Upload, db.get(Contribution, cid).upload_id).backend_upload_id
            contributions.complete_upload(db, storage, settings, user, cid)
            db.commit()
            report = contributions.validate(db, storage, settings, cid)
            db.commit()
            assert report.get("ok"), report
            assert db.get(Contribution, cid).state == State.validated
        mine = [(p, n) for p, n in reads if up_id in p or p == str(storage.path(up_key))]
        # 1. the write pass: complete assembles the object from its parts, hashing every
        #    byte on the way (each part read once as it is written into the object)
        assert [n for p, n in mine if up_id in p] == [p["length"] for p in parts]
        # 2. the tensor checks (no NaN or Inf, differs from the branch init): one read of the object
        assert [n for p, n in mine if up_id not in p] == [size]
        assert sum(n for _, n in mine) == 2 * size  # two full reads in all; no hash or copy of its own
    finally:
        c.stop()
