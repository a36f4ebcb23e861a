"""Every malicious or broken upload is rejected with a clear reason and no side effects:
nothing is unpickled, nothing is assembled or published, the forest is unchanged."""

import json
import struct

import pytest
import torch
from helpers import CORPUS
from live import Coordinator, add_domain, wait_state

from btm.safetensors_io import iter_tensors, open_weights, save_state_dict
from contributor_client.http import sha256_file


@pytest.fixture(scope="module")
def env(tmp_path_factory, seed_dir):
    c = Coordinator(tmp_path_factory.mktemp("untrusted"), {})
    admin = c.user("admin", "admin")
    admin.create_forest("ff", seed_dir)
    alice = c.user("alice")
    add_domain(alice, "python", CORPUS)
    b = alice.post("/branch-inits", {"forest": "ff", "domain": "python", "method": "seed"})
    b = alice.wait(lambda: alice.get(f"/branch-inits/{b['id']}"), lambda x: x["status"] == "ready")
    from btm.tokenizer import load_tokenizer, tokenizer_sha256

    yield {"c": c, "alice": alice, "branch": b, "cfg": json.loads((seed_dir / "config.json").read_text()),
           "tok_sha": tokenizer_sha256(load_tokenizer(seed_dir)),
           "state": dict(iter_tensors(open_weights(seed_dir)))}
    c.stop()


def contribute(env, path, name):
    alice = env["alice"]
    r = alice.post("/contributions", {"forest": "ff", "branch_init_id": env["branch"]["id"], "name": name,
                                      "sha256": sha256_file(path), "size": path.stat().st_size,
                                      "config": env["cfg"], "tokenizer_sha256": env["tok_sha"]})
    if not r["upload"]["exists"]:
        alice.put_parts(path, r["upload"])
    alice.post(f"/contributions/{r['contribution']['id']}/complete", {})
    return wait_state(alice, r["contribution"]["id"], {"rejected", "evaluated"})


def write(tmp_path, name, state):
    d = tmp_path / name
    save_state_dict(state, d)
    return d / "model.safetensors"


def pickle_file(tmp_path, env):
    p = tmp_path / "pickle.safetensors"
    torch.save(env["state"], p)  # a zip of pickles under a safetensors name
    return p


def huge_header(tmp_path, env):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}}).encode()
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    return p


def huge_length(tmp_path, env):
    p = tmp_path / "len.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 62) + b"{}" + b"\0" * 64)
    return p


def truncated(tmp_path, env):
    p = write(tmp_path, "trunc", env["state"])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    return p


def wrong_shape(tmp_path, env):
    s = dict(env["state"])
    k = next(k for k in s if s[k].dim() == 2)
    s[k] = torch.zeros(s[k].shape[0], s[k].shape[1] + 1)
    return write(tmp_path, "shape", s)


def wrong_dtype(tmp_path, env):
    return write(tmp_path, "dtype", {k: v.half() for k, v in env["state"].items()})


def missing_tensor(tmp_path, env):
    s = dict(env["state"])
    s.pop(next(iter(s)))
    return write(tmp_path, "missing", s)


def extra_tensor(tmp_path, env):
    return write(tmp_path, "extra", {**env["state"], "backdoor.weight": torch.zeros(4)})


def nan_weights(tmp_path, env):
    s = {k: v.clone() for k, v in env["state"].items()}
    next(iter(s.values())).view(-1)[3] = float("nan")
    return write(tmp_path, "nan", s)


def identical_to_init(tmp_path, env):
    return write(tmp_path, "same", env["state"])


def worse_than_init(tmp_path, env):
    g = torch.Generator().manual_seed(0)
    return write(tmp_path, "worse", {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in env["state"].items()})


CASES = [
    (pickle_file, "pickle"),
    (huge_header, "truncated or corrupt"),
    (huge_length, "not a safetensors file"),
    (truncated, "truncated or corrupt"),
    (wrong_shape, "has shape"),
    (wrong_dtype, "the forest's family uses F32"),
    (missing_tensor, "missing ["),
    (extra_tensor, "extra ['backdoor.weight']"),
    (nan_weights, "NaN or Inf"),
    (identical_to_init, "identical to the branch init"),
    (worse_than_init, "is not better than its branch init"),
]


@pytest.mark.parametrize("make, reason", CASES, ids=[m.__name__ for m, _ in CASES])
def test_bad_upload_is_rejected_with_a_reason(env, tmp_path, make, reason):
    c = contribute(env, make(tmp_path, env), make.__name__.replace("_", "-"))
    assert c["state"] == "rejected"
    last = c["history"][-1]
    assert reason in last["reason"], last
    detail = c["validation"] or c["evaluation"]
    assert detail is not None
    # no side effects: nothing assembled for download, no new version
    assert env["alice"].http.get(f"/contributions/{c['id']}/download").status_code == 404 or c["evaluation"]
    assert env["alice"].forest("ff")["current_version"] == 1


def test_hash_mismatch_is_refused_at_upload(env, tmp_path):
    p = write(tmp_path, "ok", {k: v + 0.01 for k, v in env["state"].items()})
    alice = env["alice"]
    r = alice.post("/contributions", {"forest": "ff", "branch_init_id": env["branch"]["id"], "name": "liar",
                                      "sha256": "0" * 64, "size": p.stat().st_size, "config": env["cfg"],
                                      "tokenizer_sha256": env["tok_sha"]})
    alice.put_parts(p, r["upload"])
    resp = alice.http.post(f"/contributions/{r['contribution']['id']}/complete", json={})
    assert resp.status_code == 400 and "does not match" in resp.json()["error"]["message"]
    c = alice.get(f"/contributions/{r['contribution']['id']}")
    assert c["state"] == "uploading"  # nothing was kept; the contributor can upload the right file
    assert not (env["c"].data_dir / "artifacts" / "blobs" / "sha256" / "00" / ("0" * 64)).exists()


def test_a_valid_file_whose_first_byte_looks_like_a_pickle_is_accepted(env, tmp_path):
    """A safetensors file starts with its header's length, so about one in 32 starts with
    0x80 (a pickle's first byte): only files that fail as safetensors are called pickles."""
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in env["state"].items()}
    for k in range(400):
        save_state_dict(state, tmp_path / "w", {"pad": "x" * k})
        p = tmp_path / "w" / "model.safetensors"
        if p.read_bytes()[:1] == b"\x80":
            break
    assert p.read_bytes()[:1] == b"\x80"
    c = contribute(env, p, "first-byte")
    assert c["validation"]["ok"], c["history"][-1]
