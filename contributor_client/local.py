"""What the client computes on the contributor's machine, with btm and no HTTP: a small
sample of their text, the domain posterior of that text over ELMs scored here, the routing
vector of the text under the forest's seed, an init's card, the hashes of a model's files.
`Coordinator` (api.py) moves the models and the numbers; the text stays here."""

from __future__ import annotations

import json
from pathlib import Path

from btm.hashing import sha256_file
from btm.model_files import is_upload_file


def sample_file(data: Path, max_bytes: int, out: Path) -> Path:
    """A small JSONL sample of a data directory or file (its validation split if it has one)."""
    from btm.data import read_documents, split_source

    src = split_source(data, ("valid", "train"))
    n = 0
    with open(out, "w") as f:
        for doc in read_documents(src):
            line = json.dumps({"text": doc}) + "\n"
            if n + len(line.encode()) > max_bytes and n:
                break
            f.write(line)
            n += len(line.encode())
    if n == 0:
        from btm.errors import DataError

        raise DataError(f"{data}: no text to sample")
    return out


def sample_blocks(tokenizer_dir: Path, data: Path, block_size: int = 256, max_blocks: int = 100):
    """Blocks of the contributor's text (its validation split if it has one), tokenized with
    the forest's tokenizer, to score under each ELM."""
    from btm.data import encode_texts, eval_blocks, read_documents, split_source
    from btm.tokenizer import load_tokenizer

    tokens = encode_texts(load_tokenizer(tokenizer_dir), read_documents(split_source(data, ("valid", "train"))))
    return eval_blocks(tokens, min(block_size, max(8, len(tokens) - 1)), max_blocks)


def logliks(elm_dir: Path, blocks):
    """Each block's log-likelihood under one ELM (a column of the posterior's matrix)."""
    from btm.posterior import sequence_logliks

    return sequence_logliks([elm_dir], blocks)[:, 0]


def posterior(names: list[str], columns: list) -> dict[str, float]:
    """The domain posterior (btm's cached prior) from each ELM's column of log-likelihoods."""
    import numpy as np

    from btm.posterior import cached_prior

    prior = cached_prior(np.stack(columns, axis=1))
    return {n: float(p) for n, p in zip(names, prior, strict=True)}


def routing_vector(seed_dir: Path, data: Path) -> list[float]:
    """The new ELM's routing vector (btm.routing): the seed's mean last hidden state over the text."""
    from btm.recipes import routing_vector as vector

    return vector(seed_dir, data)


def set_init_vector(init_dir: Path, vector: list[float]) -> None:
    """Keep a routing vector in an init's card (`origin`): `elmforest train` carries it into
    the ELM, and `submit` sends it."""
    from btm.family import read_card, write_card

    card = read_card(init_dir)
    card.origin = {**(card.origin or {}), "routing_vector": [float(x) for x in vector]}
    write_card(init_dir, card)


def local_files(model_dir: Path) -> dict[str, str]:
    """A model directory's files that an upload sends (not its training state): {name: sha256}."""
    return {f.name: sha256_file(f) for f in sorted(Path(model_dir).iterdir()) if f.is_file() and is_upload_file(f.name)}
