"""Model directories, token caches, blocks and batches."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from btm.data import BlockSampler, Corpus, eval_blocks, tokenize_file
from btm.errors import DataError, FamilyError, WeightsError
from btm.family import Card, new_model, preset_config, read_card, save_elm
from btm.safetensors_io import open_weights, read_header


def test_elm_directory_loads_in_transformers_and_generates(tmp_path, tok):
    model = new_model(preset_config("tiny", tok), seed=1)
    card = Card(name="py", domain="python", parents=[{"name": "seed", "weight": 1.0}], metrics={"ppl": 12.5})
    save_elm(model, tok, tmp_path / "py", card)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "py")
    t = AutoTokenizer.from_pretrained(tmp_path / "py")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    out = loaded.generate(**t("def f(", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 3
    # the card travels in the weights' metadata and in the README
    got = read_card(tmp_path / "py")
    assert got.domain == "python" and got.parents == card.parents and got.family
    readme = (tmp_path / "py" / "README.md").read_text()
    assert "python" in readme and "| seed | 1.0000 |" in readme


def test_sharded_save_loads_in_transformers(tmp_path, tok):
    model = new_model(preset_config("tiny", tok), seed=2)
    save_elm(model, tok, tmp_path / "m", Card(name="m"), max_shard_bytes=64_000)
    idx = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_token_cache_is_written_once_and_reused(tmp_path, tok, corpus_dir):
    src = corpus_dir / "python" / "valid.jsonl"
    a = tokenize_file(src, tok, tmp_path)
    files = sorted(tmp_path.rglob("*.bin"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = tokenize_file(src, tok, tmp_path)
    assert files[0].stat().st_mtime_ns == mtime
    assert np.array_equal(a, b)
    bos = tok.bos_token_id
    n_docs = sum(1 for line in open(src) if line.strip())
    assert a[0] == bos and int((a == bos).sum()) >= n_docs


def test_corrupted_token_cache_is_a_clear_error(tmp_path, tok, corpus_dir):
    tokenize_file(corpus_dir / "go" / "valid.jsonl", tok, tmp_path)
    f = next(tmp_path.rglob("*.bin"))
    with open(f, "r+b") as fh:
        fh.seek(10)
        fh.write(b"\xff\xff")
    with pytest.raises(DataError, match=f"{f}.*corrupted.*delete"):
        tokenize_file(corpus_dir / "go" / "valid.jsonl", tok, tmp_path)
    with open(f, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(DataError, match="corrupted"):
        tokenize_file(corpus_dir / "go" / "valid.jsonl", tok, tmp_path)


def test_missing_domain_empty_file_and_bad_lines(tmp_path, tok):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.jsonl").write_text("")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train.jsonl").write_text('{"text": "ok"}\nnot json\n')
    c = Corpus(tmp_path)
    with pytest.raises(DataError, match="no domain directory 'zzz'.*a, b"):
        c["zzz"]
    with pytest.raises(DataError, match=r"a/train.jsonl: no text"):
        tokenize_file(c["a"].split_path("train"), tok, tmp_path / "cache")
    with pytest.raises(DataError, match=r"b/train.jsonl:2: expected a JSON object"):
        tokenize_file(c["b"].split_path("train"), tok, tmp_path / "cache")
    with pytest.raises(DataError, match="no valid split"):
        c["a"].split_path("valid")
    # nothing half-written is left in the cache
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    with pytest.raises(DataError, match="corpus directory not found"):
        Corpus(tmp_path / "nope")


def test_corpus_roles_from_roles_json_or_readme(tmp_path, corpus_dir):
    c = Corpus(corpus_dir)
    assert c.names("eval") == ["go"] and "python" in c.names("train")
    d = tmp_path / "c"
    shutil.copytree(corpus_dir / "go", d / "go")
    (d / "README.md").write_text("| role | domain |\n| --- | --- |\n| eval | go | Go source |\n")
    assert Corpus(d).names("eval") == ["go"]


def test_txt_splits_and_document_directories(tmp_path, tok):
    (tmp_path / "notes" / "train").mkdir(parents=True)
    (tmp_path / "notes" / "train" / "a.txt").write_text("first document " * 50)
    (tmp_path / "notes" / "train" / "b.txt").write_text("second document " * 50)
    (tmp_path / "notes" / "valid.txt").write_text("held out " * 50)
    c = Corpus(tmp_path)
    assert list(c["notes"].documents("valid")) == ["held out " * 50]
    toks = tokenize_file(c["notes"].split_path("train"), tok, tmp_path / "cache")
    assert int((toks == tok.bos_token_id).sum()) == 2


def test_blocks_and_batches(tok, cache_dir, corpus_dir):
    toks = tokenize_file(corpus_dir / "kjv_bible" / "valid.jsonl", tok, cache_dir)
    b = eval_blocks(toks, 32)
    assert b.shape[1] == 33
    # consecutive blocks overlap by exactly one token so every target is scored once
    assert torch.equal(b[0, -1], b[1, 0])
    s = BlockSampler([toks, toks[: len(toks) // 2]], 32, seed=3)
    g = s.batch(7, 8)
    assert torch.equal(g, s.batch(7, 8))  # a pure function of the step
    assert not torch.equal(g, s.batch(8, 8))
    # two ranks take complementary halves of the same global batch
    assert torch.equal(torch.cat([s.batch(7, 8, 0, 2), s.batch(7, 8, 1, 2)]), g)
    with pytest.raises(DataError, match="fewer than one training block"):
        BlockSampler([toks[:10]], 32)


def test_truncated_or_pickled_weights_are_refused_before_reading(tmp_path, tok):
    model = new_model(preset_config("tiny", tok))
    save_elm(model, tok, tmp_path / "m", Card(name="m"))
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        read_header(f)
    torch.save({"w": torch.zeros(3)}, tmp_path / "m" / "model.safetensors")  # a pickle in disguise
    with pytest.raises(WeightsError, match="is a pickle.*nothing was unpickled"):
        open_weights(tmp_path / "m")
    with pytest.raises(FamilyError, match="unknown preset"):
        preset_config("huge", tok)


def _raw(header: dict, body: bytes) -> bytes:
    import json
    import struct

    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


A = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
LAYOUTS = {
    # a file two readers could read two ways is refused, naming the file and the defect
    "trailing": (_raw({"a": A}, b"\0" * 24), "8 bytes after the last tensor"),
    "gap": (_raw({"a": A, "b": {"dtype": "F32", "shape": [2], "data_offsets": [20, 28]}}, b"\0" * 28),
            "a gap of 4 bytes before tensor 'b'"),
    "overlap": (_raw({"a": A, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16),
                "tensor 'b' overlaps the tensor before it by 8 bytes"),
    "duplicate name": (b"", "names tensor 'a' twice"),
    "huge shape": (_raw({"a": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}},
                        b"\0" * 64), "truncated: the header describes 4398046511104 bytes"),
    "huge header": (b"\xff" * 8 + b"{}", "announce a header of"),
    "not json": (b"\x08" + b"\0" * 7 + b"notjson!", "header is not valid"),
    "size mismatch": (_raw({"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, b"\0" * 16),
                      "takes 16 bytes but its shape [5] of F32 needs 20"),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_the_safetensors_library_decides_and_the_defect_is_named(tmp_path, case):
    raw, words = LAYOUTS[case]
    if case == "duplicate name":
        h = b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
        h += b" " * (-len(h) % 8)
        raw = len(h).to_bytes(8, "little") + h + b"\0" * 16
    f = tmp_path / "w.safetensors"
    f.write_bytes(raw)
    with pytest.raises(WeightsError) as e:
        read_header(f, name="your model.safetensors")
    assert str(e.value).startswith("your model.safetensors: ") and words in str(e.value), str(e.value)
    assert str(tmp_path) not in str(e.value)
