"""Corpora, token caches and fixed-length blocks.

A corpus is a directory with one sub-directory per domain, each holding train/valid/test
splits as `<split>.jsonl` ({"text": ...} per line), `<split>.txt` (one document) or a
`<split>/` directory of `.txt` files (one document each). Each split is tokenised once into
a flat token file (a memmap) with BOS before every document; training then reads
fixed-length blocks that run across document boundaries.

Batches are a pure function of (seed, step): resuming at step s replays exactly the batches
an uninterrupted run would have seen, and under DDP each rank takes its own rows of the same
global batch, so 2 processes see what 1 process sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from btm import atomic
from btm.errors import DataError
from btm.hashing import sha256_file
from btm.textcheck import check_text_file  # noqa: F401 - part of this module's API
from btm.tokenizer import bos_id, tokenizer_sha256

SPLITS = ("train", "valid", "test")
CACHE_FORMAT = "elmforest.tokens/1"
DEFAULT_CACHE = Path(os.environ.get("ELMFOREST_CACHE", Path.home() / ".cache" / "elmforest")) / "tokens"


# --------------------------------------------------------------------------- documents


def read_documents(path: str | os.PathLike) -> Iterator[str]:
    """Documents of one split: a .jsonl file, a .txt file, or a directory of .txt/.jsonl files."""
    path = Path(path)
    if path.is_dir():
        yield from _read_directory(path)
        return
    if not path.exists():
        raise DataError(f"{path}: file not found")
    kind = path.suffix or _sniff_blob_kind(path)
    if kind == ".jsonl":
        yield from _read_jsonl(path)
    elif kind == ".txt":
        yield from _read_txt(path)
    else:
        raise DataError(f"{path}: unsupported file type (use .jsonl with {{\"text\"}} or .txt)")


def _read_directory(path: Path) -> Iterator[str]:
    """The documents of every .txt/.jsonl file under `path`, in sorted path order."""
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
    if not files:
        raise DataError(f"{path}: directory holds no .txt or .jsonl files")
    for f in files:
        yield from read_documents(f)


def _sniff_blob_kind(path: Path) -> str:
    """A content-addressed blob has no suffix: JSON lines if it starts like one, else plain text."""
    with open(path, "rb") as f:
        return ".jsonl" if f.read(64).lstrip().startswith(b"{") else ".txt"


def _read_jsonl(path: Path) -> Iterator[str]:
    """The non-empty "text" of each line; blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            text = _jsonl_text(path, lineno, line)
            if text:
                yield text


def _jsonl_text(path: Path, lineno: int, line: str) -> str:
    """The "text" string of one JSON line; errors name the file and line."""
    try:
        text = json.loads(line)["text"]
    except (json.JSONDecodeError, KeyError, TypeError):  # TypeError: a list, string, number or null
        raise DataError(
            f"{path}:{lineno}: expected a JSON object with a \"text\" field per line"
        ) from None
    if not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: \"text\" must be a string")
    return text


def _read_txt(path: Path) -> Iterator[str]:
    """The whole file as one document (none if empty); bad bytes are replaced, not fatal."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text:
        yield text


@dataclass(frozen=True)
class Domain:
    name: str
    path: Path
    role: str | None = None  # "train", "eval" or unknown

    def split_path(self, split: str) -> Path:
        for cand in (self.path / f"{split}.jsonl", self.path / f"{split}.txt", self.path / split):
            if cand.exists():
                return cand
        raise DataError(
            f"{self.path}: domain {self.name!r} has no {split} split "
            f"(expected {split}.jsonl, {split}.txt or a {split}/ directory)"
        )

    def has_split(self, split: str) -> bool:
        try:
            self.split_path(split)
            return True
        except DataError:
            return False

    def documents(self, split: str) -> Iterator[str]:
        return read_documents(self.split_path(split))


def split_source(path: str | os.PathLike, splits: Sequence[str] = ("valid", "train")) -> Path:
    """The documents a data source stands for: a domain directory's first split of `splits`
    that it has (`<split>.jsonl`, `<split>.txt` or a `<split>/` directory), else the path as
    given (a file, or a directory of documents)."""
    path = Path(path)
    if path.is_dir():
        dom = Domain(path.name, path)
        for split in splits:
            if dom.has_split(split):
                return dom.split_path(split)
    return path


class Corpus:
    """A directory of domains. Roles (train/eval) come from `roles.json` ({domain: role}) or
    from a markdown table in the README with `| train | name |` rows, when either is present."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: corpus directory not found")
        roles = self._read_roles()
        self.domains: dict[str, Domain] = {}
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            dom = Domain(d.name, d, roles.get(d.name))
            if any(dom.has_split(s) for s in SPLITS):
                self.domains[d.name] = dom
        if not self.domains:
            raise DataError(
                f"{self.root}: no domains found; a corpus holds <domain>/train.jsonl "
                "(and valid/test) for each domain"
            )

    def _read_roles(self) -> dict[str, str]:
        if (self.root / "roles.json").exists():
            return json.loads((self.root / "roles.json").read_text())
        roles = {}
        readme = self.root / "README.md"
        if readme.exists():
            for m in re.finditer(r"^\|\s*(train|eval)\s*\|\s*([\w.-]+)\s*\|", readme.read_text(), re.M):
                roles[m.group(2)] = m.group(1)
        return roles

    def __getitem__(self, name: str) -> Domain:
        if name not in self.domains:
            raise DataError(
                f"{self.root}: no domain directory {name!r}; domains here: {', '.join(self.domains)}"
            )
        return self.domains[name]

    def names(self, role: str | None = None) -> list[str]:
        return [n for n, d in self.domains.items() if role is None or d.role == role]


# --------------------------------------------------------------------------- token cache


def _source_digest(path: Path) -> str:
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\0" + sha256_file(f).encode())
        return h.hexdigest()
    return sha256_file(path)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_documents(tok, docs: Iterable[str], batch: int = 512) -> Iterator[np.ndarray]:
    """Token id arrays, BOS + document, in chunks of `batch` documents."""
    bos = bos_id(tok)
    backend = tok.backend_tokenizer
    dt = token_dtype(len(tok))
    chunk: list[str] = []

    def flush() -> np.ndarray:
        encs = backend.encode_batch(chunk, add_special_tokens=False)
        parts = []
        for e in encs:
            parts.append(np.array([bos], dtype=dt))
            parts.append(np.asarray(e.ids, dtype=dt))
        return np.concatenate(parts)

    for d in docs:
        chunk.append(d)
        if len(chunk) == batch:
            yield flush()
            chunk = []
    if chunk:
        yield flush()


def encode_texts(tok, docs: Iterable[str]) -> np.ndarray:
    parts = list(encode_documents(tok, docs))
    if not parts:
        return np.zeros(0, dtype=token_dtype(len(tok)))
    return np.concatenate(parts)


def tokenize_file(source: str | os.PathLike, tok, cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Tokenise a split once and return its tokens as a read-only memmap.

    The cache key is (tokenizer content, source content), so a changed file or tokenizer
    gets a new cache entry. Writes go to a temporary file renamed into place, and the
    sidecar records the token count and a checksum that every load verifies.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: file not found")
    cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    tok_sha = tokenizer_sha256(tok)
    key = hashlib.sha256(
        f"{CACHE_FORMAT}|{tok_sha}|{bos_id(tok)}|{_source_digest(source)}".encode()
    ).hexdigest()[:24]
    out = cache_dir / key[:2] / f"{key}.bin"
    meta_path = out.with_suffix(".json")
    dt = token_dtype(len(tok))
    if not out.exists() or not meta_path.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        n_tokens = n_docs = 0
        with atomic.replacing(out, f"{out.name}.{os.getpid()}.tmp") as tmp:
            with open(tmp, "wb") as f:
                for arr in encode_documents(tok, read_documents(source)):
                    b = arr.tobytes()
                    f.write(b)
                    h.update(b)
                    n_tokens += arr.size
                    n_docs += int((arr == bos_id(tok)).sum())
                f.flush()
                os.fsync(f.fileno())
            if n_tokens == 0:
                raise DataError(f"{source}: no text in this split (the file is empty)")
        meta = {
            "format": CACHE_FORMAT,
            "source": str(source),
            "tokenizer_sha256": tok_sha,
            "dtype": dt.name,
            "n_tokens": n_tokens,
            "n_documents": n_docs,
            "sha256": h.hexdigest(),
        }
        atomic.write_text(meta_path, json.dumps(meta, indent=1), f"{meta_path.name}.{os.getpid()}.tmp")
    return load_token_file(out)


def load_token_file(path: str | os.PathLike, verify: bool = True) -> np.ndarray:
    path = Path(path)
    meta_path = path.with_suffix(".json")
    fix = f"delete {path} and {meta_path.name} and run again to re-tokenise"
    try:
        meta = json.loads(meta_path.read_text())
        dt = np.dtype(meta["dtype"])
        n = int(meta["n_tokens"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise DataError(f"token cache {path} has a missing or corrupted sidecar: {fix}") from None
    size = path.stat().st_size if path.exists() else -1
    if size != n * dt.itemsize:
        raise DataError(
            f"token cache {path} is corrupted ({size} bytes, expected {n * dt.itemsize}): {fix}"
        )
    if verify and sha256_file(path) != meta.get("sha256"):
        raise DataError(f"token cache {path} is corrupted (checksum mismatch): {fix}")
    return np.memmap(path, dtype=dt, mode="r", shape=(n,))


# --------------------------------------------------------------------------- blocks and batches


def eval_blocks(tokens: np.ndarray, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """Non-overlapping blocks of block_size+1 tokens (inputs + shifted targets); every
    target token is scored exactly once. Shape (N, block_size + 1), int64."""
    n = (len(tokens) - 1) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n <= 0:
        raise DataError(
            f"{len(tokens)} tokens is too few for one block of {block_size}; use more text or a smaller block"
        )
    idx = np.arange(n)[:, None] * block_size + np.arange(block_size + 1)[None, :]
    return torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))


@dataclass
class BlockSampler:
    """Random fixed-length blocks from one or more token streams.

    With several streams (a mixture) the rows of each global batch cycle through the
    streams in turn, so every domain gets the same share of every batch (a balanced
    mixture) whatever its size.
    """

    streams: Sequence[np.ndarray]
    block_size: int
    seed: int = 0

    def __post_init__(self):
        for i, s in enumerate(self.streams):
            if len(s) < self.block_size + 2:
                raise DataError(
                    f"stream {i} has {len(s)} tokens, fewer than one training block of "
                    f"{self.block_size + 1}: add text or lower --block-size"
                )

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Rows [rank*b, (rank+1)*b) of global batch `step`, b = batch_size // world."""
        if batch_size % world:
            raise ValueError(f"global batch {batch_size} is not divisible by {world} processes")
        rng = np.random.default_rng([self.seed, step])
        n = len(self.streams)
        rows = np.arange(step * batch_size, (step + 1) * batch_size) % n
        u = rng.random(batch_size)
        per = batch_size // world
        lo, hi = rank * per, (rank + 1) * per
        T = self.block_size + 1
        out = np.empty((per, T), dtype=np.int64)
        for i in range(lo, hi):
            s = self.streams[rows[i]]
            start = int(u[i] * (len(s) - T + 1))
            out[i - lo] = s[start : start + T]
        return torch.from_numpy(out)
