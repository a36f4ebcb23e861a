"""The coordinator's held-out blocks: exactly N at the start for the cached prior, and the
blocks it scores after them, never the same text."""

import hashlib
from types import SimpleNamespace

from btm.data import encode_texts, eval_blocks, read_documents
from coordinator.services.domains import held_out_blocks, too_short


def test_the_prior_takes_exactly_n_blocks_and_they_are_never_scored(tmp_path, tok, corpus_dir):
    src = corpus_dir / "python" / "test.jsonl"
    data = src.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    blob = tmp_path / "blobs" / sha[:2] / sha  # where the coordinator caches a stored file
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    d = SimpleNamespace(name="python", role=SimpleNamespace(value="train"), eval_data_sha256=sha)
    settings = SimpleNamespace(work_dir=tmp_path, eval_block_size=64, posterior_prior_blocks=10, eval_scored_blocks=16)
    b = held_out_blocks(None, settings, d, tok)
    every = eval_blocks(encode_texts(tok, read_documents(src)), 64)
    assert b.dev.shape[0] == 10 and b.test.shape[0] == 16
    assert (b.dev == every[:10]).all() and (b.test == every[10:26]).all()  # consecutive, disjoint
    settings.posterior_prior_blocks = every.shape[0]  # nothing left to score
    assert held_out_blocks(None, settings, d, tok) is None
    msg = too_short(settings, d)
    assert f"first {every.shape[0]} blocks" in msg and "ELMFOREST_POSTERIOR_PRIOR_BLOCKS" in msg
