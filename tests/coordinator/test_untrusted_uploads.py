"""Hostile files, made from a real ELM of a forest: every one is refused with a reason the
contributor can act on, nothing is unpickled, and nothing of it stays stored or downloadable."""

import json
import pickle
import struct

import pytest
import torch
from helpers import CORPUS
from live import Coordinator, add_domain, contribute, holds, stored_bytes, wait_state

from btm.safetensors_io import iter_tensors, open_weights, save_state_dict
from contributor_client import commands
from contributor_client.http import sha256_file


@pytest.fixture(scope="module")
def env(tmp_path_factory, seed_dir, tok, cache_dir):
    """A forest with one merged ELM (python, alice's) and a branch init for mallory."""
    tmp = tmp_path_factory.mktemp("untrusted")
    c = Coordinator(tmp / "coord", {})
    admin = c.user("admin", "admin")
    admin.create_forest("ff", seed_dir)
    alice, mallory = c.user("alice"), c.user("mallory")
    add_domain(alice, "python", CORPUS)
    elm = contribute(c, alice, "ff", "python", tok, cache_dir, tmp)
    admin.post(f"/contributions/{elm['id']}/approve", {"reason": "ok"})
    admin.finish(admin.post("/forests/ff/publish", {"note": "python"}), "publish")
    elm_dir = commands.download_forest(mallory, "ff", tmp / "public") / "elms" / "python"  # public, as on the web
    add_domain(mallory, "kjv_bible", CORPUS)
    b = commands.request_branch(mallory, "ff", "kjv_bible", method="posterior", data=CORPUS / "kjv_bible")
    init = commands.download_init(mallory, b, tmp / "init")
    from btm.tokenizer import load_tokenizer, tokenizer_sha256

    yield {"c": c, "mallory": mallory, "branch": b, "elm_dir": elm_dir, "init": init,
           "cfg": json.loads((seed_dir / "config.json").read_text()),
           "tok_sha": tokenizer_sha256(load_tokenizer(seed_dir)),
           "state": dict(iter_tensors(open_weights(elm_dir)))}
    c.stop()


def submit_file(env, path, name, sha256=None):
    m = env["mallory"]
    r = m.post("/contributions", {"forest": "ff", "branch_init_id": env["branch"]["id"], "name": name,
                                  "sha256": sha256 or sha256_file(path), "size": path.stat().st_size,
                                  "config": env["cfg"], "tokenizer_sha256": env["tok_sha"]})
    m.put_parts(path, r["upload"])
    resp = m.http.post(f"/contributions/{r['contribution']['id']}/complete", json={})
    if resp.status_code != 200:
        return r["contribution"]["id"], resp
    return r["contribution"]["id"], wait_state(m, r["contribution"]["id"], {"rejected", "evaluated"})


def write(tmp_path, name, state, metadata=None):
    save_state_dict(state, tmp_path / name, metadata)
    return tmp_path / name / "model.safetensors"


def raw(tmp_path, name, header: dict, body: bytes):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    p = tmp_path / f"{name}.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + body)
    return p


def trained(env, scale=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in env["state"].items()}


def layout_of(env, state):
    """(header, body) of a well-formed file of `state`, to bend into malformed ones."""
    header, body, off = {}, b"", 0
    for k, v in state.items():
        b = v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        body += b
        off += len(b)
    return header, body


def torch_zip(tmp_path, env):
    p = tmp_path / "zip.safetensors"
    torch.save(env["state"], p)  # a zip of pickles under a safetensors name
    return p


def legacy_pickle(tmp_path, env):
    p = tmp_path / "legacy.safetensors"
    p.write_bytes(pickle.dumps({k: v.tolist() for k, v in list(env["state"].items())[:2]}, protocol=2))
    return p


def huge_shape(tmp_path, env):
    return raw(tmp_path, "huge", {"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}},
               b"\0" * 64)


def huge_header(tmp_path, env):
    p = tmp_path / "len.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 62) + b"{}" + b"\0" * 64)
    return p


def not_json(tmp_path, env):
    p = tmp_path / "nj.safetensors"
    p.write_bytes(struct.pack("<Q", 16) + b"this is not json" + b"\0" * 16)
    return p


def truncated(tmp_path, env):
    p = write(tmp_path, "trunc", trained(env))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    return p


def trailing_bytes(tmp_path, env):
    p = write(tmp_path, "trail", trained(env))
    with open(p, "ab") as f:
        f.write(b"\0" * 1024)  # room for a second payload no loader reads
    return p


def gap(tmp_path, env):
    header, body = layout_of(env, trained(env))
    names = list(header)
    for k in names[1:]:  # every tensor after the first moves 64 bytes on
        header[k]["data_offsets"] = [o + 64 for o in header[k]["data_offsets"]]
    first = header[names[0]]["data_offsets"][1]
    return raw(tmp_path, "gap", header, body[:first] + b"\0" * 64 + body[first:])


def overlap(tmp_path, env):
    header, body = layout_of(env, trained(env))
    names = list(header)
    a, b = header[names[0]], header[names[1]]
    b0, b1 = b["data_offsets"]
    n = b1 - b0
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + n]  # inside the first tensor's bytes
    for k in names[2:]:
        header[k]["data_offsets"] = [o - n for o in header[k]["data_offsets"]]
    return raw(tmp_path, "overlap", header, body[:b0] + body[b1:])


def duplicate_names(tmp_path, env):
    header, body = layout_of(env, trained(env))
    first = next(iter(header))
    text = json.dumps(header)
    text = text[:-1] + f', "{first}": ' + json.dumps(header[first]) + "}"  # the first name again
    h = text.encode()
    h += b" " * (-len(h) % 8)
    p = tmp_path / "dup.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + body)
    return p


def wrong_shape(tmp_path, env):
    s = trained(env)
    k = next(k for k in s if s[k].dim() == 2)
    s[k] = torch.zeros(s[k].shape[0], s[k].shape[1] + 1)
    return write(tmp_path, "shape", s)


def wrong_dtype(tmp_path, env):
    return write(tmp_path, "dtype", {k: v.half() for k, v in trained(env).items()})


def missing_tensor(tmp_path, env):
    s = trained(env)
    s.pop(next(iter(s)))
    return write(tmp_path, "missing", s)


def extra_tensor(tmp_path, env):
    return write(tmp_path, "extra", {**trained(env), "backdoor.weight": torch.zeros(4)})


def nan_weights(tmp_path, env):
    s = trained(env)
    next(iter(s.values())).view(-1)[3] = float("nan")
    return write(tmp_path, "nan", s)


def inf_weights(tmp_path, env):
    s = trained(env)
    list(s.values())[-1].view(-1)[0] = float("inf")
    return write(tmp_path, "inf", s)


def identical_to_init(tmp_path, env):
    # the init's tensors in a file of our own (other bytes, same numbers)
    return write(tmp_path, "same", dict(iter_tensors(open_weights(env["init"]))), {"note": "re-saved"})


def copy_of_a_merged_elm(tmp_path, env):
    p = tmp_path / "copy.safetensors"
    p.write_bytes((env["elm_dir"] / "model.safetensors").read_bytes())
    return p


def worse_than_init(tmp_path, env):
    return write(tmp_path, "worse", trained(env, scale=0.5, seed=3))


CASES = [
    (torch_zip, "is a pickle (or a zip of pickles"),
    (legacy_pickle, "is a pickle"),
    (huge_shape, "truncated: the header describes 4398046511104 bytes"),
    (huge_header, "announce a header of 4611686018427387904 bytes"),
    (not_json, "header is not valid"),
    (truncated, "truncated: the header describes"),
    (trailing_bytes, "1024 bytes after the last tensor"),
    (gap, "a gap of 64 bytes before tensor"),
    (overlap, "overlaps the tensor before it"),
    (duplicate_names, "twice"),
    (wrong_shape, "has shape"),
    (wrong_dtype, "the forest's family uses F32"),
    (missing_tensor, "missing ["),
    (extra_tensor, "extra ['backdoor.weight']"),
    (nan_weights, "NaN or Inf"),
    (inf_weights, "NaN or Inf"),
    (identical_to_init, "identical to its branch init"),
    (copy_of_a_merged_elm, "byte for byte the same file as ELM python (contribution 1, merged)"),
    (worse_than_init, "is not better than its branch init"),
]


@pytest.mark.parametrize("make, reason", CASES, ids=[m.__name__ for m, _ in CASES])
def test_hostile_file_is_refused_with_a_reason_and_leaves_nothing(env, tmp_path, make, reason):
    c = env["c"]
    before = stored_bytes(c)
    bad = make(tmp_path, env)
    cid, x = submit_file(env, bad, make.__name__.replace("_", "-"))
    assert x["state"] == "rejected"
    last = x["history"][-1]
    assert reason in last["reason"], last
    assert str(c.data_dir) not in json.dumps(x), "a server path in what the contributor sees"
    if x["validation"] and not x["validation"]["ok"]:
        assert last["reason"].startswith(f"model.safetensors of contribution {cid}") or "branch init" in reason
    # rejected means gone: nothing stored, nothing to download, nothing published
    assert stored_bytes(c) == before
    if make is not copy_of_a_merged_elm:  # (that one's bytes are the merged ELM's, which stay)
        assert not holds(c, bad), "the rejected bytes are still somewhere on the coordinator"
    assert env["mallory"].http.get(f"/contributions/{cid}/download").status_code == 404
    assert x["files"] is None
    assert env["mallory"].forest("ff")["current_version"] == 2


def test_other_family_config_is_refused_at_declaration(env, tmp_path):
    m = env["mallory"]
    other = {**env["cfg"], "num_hidden_layers": env["cfg"]["num_hidden_layers"] + 1}
    r = m.http.post("/contributions", json={"forest": "ff", "branch_init_id": env["branch"]["id"], "name": "fam",
                                            "sha256": "a" * 64, "size": 100, "config": other,
                                            "tokenizer_sha256": env["tok_sha"]})
    assert r.status_code == 422 and "family" in r.json()["error"]["message"]


def test_hash_mismatch_is_refused_at_upload(env, tmp_path):
    c = env["c"]
    p = write(tmp_path, "ok", trained(env, seed=5))
    before = stored_bytes(c)
    cid, resp = submit_file(env, p, "liar", sha256="0" * 64)
    assert resp.status_code == 400 and "does not match" in resp.json()["error"]["message"]
    x = env["mallory"].get(f"/contributions/{cid}")
    assert x["state"] == "uploading"  # nothing was kept; the contributor can upload the right file
    assert stored_bytes(c) == before


def test_a_valid_file_whose_first_byte_looks_like_a_pickle_is_accepted(env, tmp_path):
    """A safetensors file starts with its header's length, so about one in 32 starts with
    0x80 (a pickle's first byte): only files that fail as safetensors are called pickles."""
    state = trained(env, seed=1)
    for k in range(400):
        p = write(tmp_path, "w", state, {"pad": "x" * k})
        if p.read_bytes()[:1] == b"\x80":
            break
    assert p.read_bytes()[:1] == b"\x80"
    _, x = submit_file(env, p, "first-byte")
    assert x["validation"]["ok"], x["history"][-1]


@pytest.mark.parametrize("tail, reason", [
    ("", None),
    ('{"text": "ok"}\n{"text": \n', "not valid JSON"),
    ('{"text": "a\u0000b"}\n', "NUL"),
    ('{"words": "no text"}\n', 'a "text" string'),
])
def test_a_large_text_file_is_checked_in_a_process_of_its_own_with_the_same_verdict(tmp_path, tail, reason):
    """Over ASIDE_BYTES a sample's check runs in `python -m btm.textcheck` (the API's
    interpreter is not held meanwhile): the same verdict, with the line it names, as in-process."""
    from btm.data import check_text_file
    from btm.errors import DataError
    from coordinator.services import uploads

    path = tmp_path / "big.jsonl"
    line = json.dumps({"text": "lorem ipsum dolor sit amet " * 40}) + "\n"
    path.write_text(line * (uploads.ASIDE_BYTES // len(line) + 10) + tail)
    assert path.stat().st_size > uploads.ASIDE_BYTES
    if reason is None:
        uploads.check_text_aside(path, "big.jsonl")
        return
    with pytest.raises(DataError) as here:
        check_text_file(path, "big.jsonl")
    with pytest.raises(DataError) as aside:
        uploads.check_text_aside(path, "big.jsonl")
    assert str(aside.value) == str(here.value) and reason in str(aside.value), str(aside.value)
