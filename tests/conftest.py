"""Shared fixtures: a tiny tokenizer, seed and forest trained on the demo corpus that ships
with the project (so the suite needs nothing outside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import CORPUS, TRAIN_DOMAINS, streams, tiny_train_config


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    return CORPUS


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("token-cache")
    os.environ["ELMFOREST_CACHE"] = str(d.parent)
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from btm.data import Corpus
    from btm.tokenizer import iter_balanced_texts, train_bpe

    c = Corpus(CORPUS)
    out = tmp_path_factory.mktemp("tokenizer")
    tok = train_bpe(iter_balanced_texts({n: c[n].documents("train") for n in TRAIN_DOMAINS}, 100_000), 512)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    from btm.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def seed_dir(tmp_path_factory, tok, cache_dir) -> Path:
    from btm.data import BlockSampler
    from btm.family import Card, new_model, preset_config
    from btm.train import train

    out = tmp_path_factory.mktemp("seed") / "seed"
    model = new_model(preset_config("tiny", tok), seed=0)
    train(model, tok, BlockSampler(streams(tok, cache_dir, TRAIN_DOMAINS), 64), tiny_train_config(30), out,
          Card(name="seed", kind="seed"))
    return out


@pytest.fixture(scope="session")
def forest_dir(tmp_path_factory, tok, cache_dir, seed_dir) -> Path:
    """A forest with three ELMs (python, kjv_bible, postgres_docs), each branched from the seed
    and trained on its own domain."""
    from btm.branch import branch
    from btm.data import BlockSampler
    from btm.family import Card, load_model
    from btm.forest import Forest
    from btm.train import train

    root = tmp_path_factory.mktemp("forest")
    f = Forest.init(root / "forest", seed_dir, "test-forest")
    for d in ["python", "kjv_bible", "postgres_docs"]:
        init, _ = branch(f, root / f"init-{d}", method="seed", domain=d)
        train(load_model(init), tok, BlockSampler(streams(tok, cache_dir, [d]), 64), tiny_train_config(40),
              root / d, Card(name=d, domain=d, parents=[{"name": "seed", "weight": 1.0}]))
        f.add(root / d)
    return root / "forest"
