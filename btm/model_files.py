"""The files of a model directory, by name: what each one is, which of them make up the
published model, and which are training state that stays where it was written.

A model directory (a plain Hugging Face directory) holds the config (config.json), the
weights (model.safetensors, or model-<i>-of-<n>.safetensors shards with an index), the
tokenizer files and the model card (README.md). Training leaves its state there too
(checkpoint/, metrics.jsonl; a branch init may carry optimizer.safetensors), and atomic
writes leave `*.tmp` names while they run: neither is copied into a forest, hashed into its
manifest or exported with it.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG = "config.json"
CARD = "README.md"  # the model card (front matter with the elmforest facts)

WEIGHTS_SUFFIX = ".safetensors"
WEIGHTS_PREFIX = "model"
WEIGHTS_FILE = "model.safetensors"  # unsharded weights
WEIGHTS_INDEX = "model.safetensors.index.json"  # the index of sharded weights
WEIGHTS_GLOB = f"{WEIGHTS_PREFIX}*{WEIGHTS_SUFFIX}*"  # the weights and their index, single or sharded

TOKENIZER_PREFIX = "tokenizer"
# the files that decide a saved tokenizer (hashed together to recognise one seen before)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# names of the files that go with the config into a model whose weights are written anew
AUX_PREFIXES = (TOKENIZER_PREFIX, "special_tokens", "vocab", "merges", "generation_config")

OPTIMIZER = "optimizer.safetensors"  # optimizer state carried into a branch init
# training state in a model directory: never part of the published model
TRAINING_STATE = frozenset({"checkpoint", "checkpoint.tmp", "checkpoint.old", "metrics.jsonl", OPTIMIZER})
TMP_SUFFIX = ".tmp"  # an atomic write in progress

# what is fetched of a model repository on the Hub: weights only as safetensors
HUB_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", CONFIG, "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", CARD,
]
# what is fetched of an exported forest on the Hub (its model directories included)
FOREST_HUB_PATTERNS = ["*.json", "*.md", "*.txt", "*.py", "*.safetensors", "*.model"]  # *.py: the model's code
# weights files in pickle formats, never loaded (loading a pickle can run any code)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def max_positions(config) -> int | None:
    """The context length a model's config.json gives, in any family (transformers maps each
    family's own name, e.g. GPT-2's n_positions, to max_position_embeddings)."""
    return getattr(config, "max_position_embeddings", None)


def is_model_file(name: str) -> bool:
    """A file of the published model (not training state, not a write in progress)."""
    return name not in TRAINING_STATE and not name.endswith(TMP_SUFFIX)


def is_aux_file(name: str) -> bool:
    """The config, or a tokenizer or generation file: what a model whose weights are written
    anew takes from its source."""
    return name == CONFIG or name.startswith(AUX_PREFIXES)


def is_weights_file(name: str) -> bool:
    """A safetensors file (weights, or a carried optimizer state)."""
    return Path(name).suffix == WEIGHTS_SUFFIX


def is_upload_file(name: str) -> bool:
    """A file the contributor client uploads of a model directory: JSON files (config,
    tokenizer, index), safetensors files and the card; no hidden files."""
    return not name.startswith(".") and (Path(name).suffix in (".json", WEIGHTS_SUFFIX) or name == CARD)


# ----------------------------------------------------------------------------- a forest directory
# forest.json (the current manifest), versions/<n>.json (every version's), and one model
# directory per entry of the manifest (the seed's and each ELM's `path`)

MANIFEST = "forest.json"
VERSIONS = "versions"


def manifest_models(manifest: dict) -> list[tuple[str, dict[str, str]]]:
    """Where each model of a forest's manifest lives in its directory, with its files:
    (directory, {file name: sha256}) for the seed and every ELM."""
    return [(e["path"], e["files"]) for e in [manifest["seed"], *manifest["elms"]]]


def write_manifest(root: Path, manifest: dict) -> None:
    """A forest directory's manifest files: versions/<version>.json, then forest.json (a
    directory with forest.json is whole)."""
    from btm import atomic  # here: an exported forest carries this file without btm

    (root / VERSIONS).mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=2)
    atomic.write_text(root / VERSIONS / f"{manifest['version']}.json", text)
    atomic.write_text(root / MANIFEST, text)
