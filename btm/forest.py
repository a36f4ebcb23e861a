"""A forest on disk: the seed, the ELMs, and a manifest that versions them.

    forest/
      forest.json          the current manifest
      versions/<n>.json    every version's manifest (the current one too), each written once
      seed/                the seed LM (an HF directory)
      elms/<name>/         one HF directory per ELM

Adding or removing an ELM writes a new version; removal records who and why. The manifest
holds each ELM's domain, parents with weights, metrics and the sha256 of every file, so a
forest can be verified and shipped as content-addressed files.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from btm import atomic
from btm.errors import ForestError
from btm.family import Card, check_family, family_id, load_config, read_card
from btm.hashing import sha256_file
from btm.model_files import MANIFEST, is_model_file, write_manifest
from btm.tokenizer import load_tokenizer, tokenizer_sha256

FORMAT = "elmforest.forest/1"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def model_files(model_dir: Path) -> dict[str, str]:
    """{file name: sha256} of the files that make up a model directory."""
    out = {}
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and is_model_file(f.name):
            out[f.name] = sha256_file(f)
    return out


def copy_model_dir(src: Path, dst: Path) -> None:
    """Copy a model directory (without training state) to dst, atomically."""
    with atomic.replacing(dst) as tmp:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file() and is_model_file(f.name):
                shutil.copyfile(f, tmp / f.name)
        if dst.exists():
            shutil.rmtree(dst)


# an ELM branched from another with at least this share of its weights is its descendant
DESCENDANT_WEIGHT = 0.1


@dataclass
class Elm:
    name: str
    domain: str | None
    path: Path
    entry: dict[str, Any]

    @property
    def parents(self) -> list[dict[str, Any]]:
        return self.entry.get("parents", [])

    @property
    def metrics(self) -> dict[str, Any]:
        return self.entry.get("metrics", {})


class Forest:
    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest

    # ------------------------------------------------------------------ create / load

    @classmethod
    def init(cls, root: str | os.PathLike, seed_dir: str | os.PathLike, name: str | None = None,
             source: dict[str, Any] | None = None) -> Forest:
        root, seed_dir = Path(root), Path(seed_dir)
        if (root / MANIFEST).exists():
            raise ForestError(f"{root}: a forest already exists here; use `elmforest forest add`")
        config, tok = load_config(seed_dir), load_tokenizer(seed_dir)
        root.mkdir(parents=True, exist_ok=True)
        copy_model_dir(seed_dir, root / "seed")
        card = read_card(root / "seed")
        manifest = {
            "format": FORMAT,
            "name": name or root.name,
            "version": 1,
            "created": now(),
            "family": family_id(config, tok),
            "model_type": config.model_type,
            "tokenizer_sha256": tokenizer_sha256(tok),
            "seed": {"name": card.name if card.kind != "external" else "seed", "path": "seed",
                     "files": model_files(root / "seed"), "metrics": card.metrics, "training": card.training,
                     **({"source": source} if source else {})},
            "elms": [],
            "history": [{"version": 1, "action": "init", "at": now(), "by": _who()}],
        }
        f = cls(root, manifest)
        f._commit()
        return f

    @classmethod
    def load(cls, root: str | os.PathLike) -> Forest:
        root = Path(root)
        path = root / MANIFEST
        if not path.exists():
            raise ForestError(f"{root}: no {MANIFEST}; create a forest with `elmforest forest init`")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ForestError(f"{path}: not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise ForestError(f"{path}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
        return cls(root, manifest)

    # ------------------------------------------------------------------ queries

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def seed_dir(self) -> Path:
        return self.root / self.manifest["seed"]["path"]

    @property
    def elms(self) -> list[Elm]:
        return [Elm(e["name"], e.get("domain"), self.root / e["path"], e) for e in self.manifest["elms"]]

    def __len__(self) -> int:
        return len(self.manifest["elms"])

    def __iter__(self) -> Iterator[Elm]:
        return iter(self.elms)

    def names(self) -> list[str]:
        return [e["name"] for e in self.manifest["elms"]]

    def get(self, name: str) -> Elm:
        for e in self.elms:
            if e.name == name:
                return e
        if name == self.manifest["seed"]["name"] or name == "seed":
            return Elm(name, None, self.seed_dir, self.manifest["seed"])
        raise ForestError(
            f"{self.root}: no ELM named {name!r}; ELMs: {', '.join(self.names()) or '(none)'}"
        )

    # ------------------------------------------------------------------ changes

    def check_family(self, model_dir: str | os.PathLike, what: str | None = None) -> None:
        """Refuse a model whose weights cannot be mixed with the seed's (so that average, eval
        and branch never meet one in the forest)."""
        check_family(model_dir, self.seed_dir, what or str(model_dir), f"the forest's seed ({self.seed_dir})")

    def check_elms(self) -> None:
        """Every ELM against the seed: a forest written before a check was tightened may hold one
        that no longer passes, and it should be named before hours of scoring."""
        for e in self.elms:
            self.check_family(e.path, f"ELM {e.name!r} ({e.path})")

    def add(
        self,
        model_dir: str | os.PathLike,
        name: str | None = None,
        domain: str | None = None,
        metrics: dict[str, Any] | None = None,
        source: dict[str, Any] | None = None,
        routing_vector: list[float] | None = None,
    ) -> Elm:
        """Add a model directory as an ELM (a new version). `source`: where it came from (a Hub
        model: repository, revision, commit), recorded in the manifest and its card.
        `routing_vector`: the seed's mean hidden state over its domain (btm.routing)."""
        model_dir = Path(model_dir)
        card = read_card(model_dir)
        source = source or card.source or None
        name = name or (card.name if card.kind != "external" else None) or model_dir.name
        domain = domain or card.domain
        if name in self.names():
            raise ForestError(f"{self.root}: an ELM named {name!r} is already in the forest; pick another --name")
        self.check_family(model_dir)
        dst = self.root / "elms" / name
        dst.parent.mkdir(exist_ok=True)
        copy_model_dir(model_dir, dst)
        if source:  # the copy's card says where it came from (a model from the Hub has a card of its own, or none)
            from btm.family import write_card

            write_card(dst, Card(**{**asdict(card), "name": name, "domain": domain, "source": source,
                                    "kind": "elm" if card.kind == "external" else card.kind}))
        entry = {
            "name": name,
            "domain": domain,
            "path": f"elms/{name}",
            "files": model_files(dst),
            "parents": card.parents,
            "metrics": {**card.metrics, **(metrics or {})},
            "training": card.training,
            "data": card.data,
            "added": now(),
        }
        if source:
            entry["source"] = source
        if routing_vector is not None:
            entry["routing_vector"] = self._checked_vector(routing_vector, name)
        self.manifest["elms"].append(entry)
        self._bump("add", name, None)
        return self.get(name)

    def set_routing_vectors(self, vectors: dict[str, list[float]]) -> None:
        """Give ELMs their routing vectors (a new version; the ELMs themselves are unchanged)."""
        by_name = {e["name"]: e for e in self.manifest["elms"]}
        for name, v in vectors.items():
            self.get(name)  # an unknown name is a clear error
            by_name[name]["routing_vector"] = self._checked_vector(v, name)
        self._bump("vectors", ", ".join(sorted(vectors)), None)

    def _checked_vector(self, vector: list[float], name: str) -> list[float]:
        from btm.routing import check_vector

        size = load_config(self.seed_dir).get_text_config().hidden_size
        return check_vector(vector, size, f"routing vector of {name!r}")

    def descendants(self, name: str, threshold: float = DESCENDANT_WEIGHT) -> dict[str, float]:
        """ELMs that carry at least `threshold` of `name`'s weights: the share of `name` in an
        ELM's initialisation, through every generation (a parent's weight times the share in
        that parent). Forgetting `name` means forgetting these too, unless one decides otherwise."""
        by_name = {e.name: e for e in self.elms}
        memo: dict[str, float] = {name: 1.0}

        def share(n: str, seen: frozenset) -> float:
            if n not in memo:
                e = by_name.get(n)
                memo[n] = 0.0 if e is None or n in seen else sum(
                    float(p["weight"]) * share(p["name"], seen | {n}) for p in e.parents)
            return memo[n]

        return {e.name: s for e in self.elms if e.name != name and (s := share(e.name, frozenset())) >= threshold}

    def remove(self, name: str, reason: str, delete_files: bool = True, descendants: str | None = None) -> list[str]:
        """Forget an ELM: it leaves the manifest (a new version) and, by default, the disk.
        ELMs that carry >= 0.1 of its weights need a decision: descendants="remove" forgets
        them too, "keep" keeps them; the history records which. Returns the names removed."""
        self._check_removable(name, reason)
        heirs = self.descendants(name)
        if heirs and descendants not in ("remove", "keep"):
            listed = listed_weights(sorted(heirs.items(), key=lambda x: -x[1]))
            raise ForestError(f"{name} lives on in {len(heirs)} ELM(s) branched from it (share of its weights): "
                              f"{listed}; pass --with-descendants to forget them too, or --keep-descendants")
        gone = [name, *sorted(heirs)] if descendants == "remove" else [name]
        paths = [self.get(n).path for n in gone]
        self.manifest["elms"] = [e for e in self.manifest["elms"] if e["name"] not in gone]
        self._bump("remove", name, reason, **_descendants_record(heirs, descendants))
        if delete_files:
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)
        return gone

    def _check_removable(self, name: str, reason: str) -> None:
        """A removal is recorded with its reason, and never takes the seed."""
        if not reason.strip():
            raise ForestError("removing an ELM needs a reason (it is recorded in the forest history)")
        if self.get(name).path == self.seed_dir:
            raise ForestError("the seed is the forest's root and cannot be removed")

    def verify(self) -> list[str]:
        """Problems found: missing files or hashes that differ from the manifest."""
        problems = []
        for e in [self.manifest["seed"], *self.manifest["elms"], *self.manifest.get("averages", [])]:
            d = self.root / e["path"]
            for fname, sha in e.get("files", {}).items():
                f = d / fname
                if not f.exists():
                    problems.append(f"{f}: missing")
                elif sha256_file(f) != sha:
                    problems.append(f"{f}: sha256 differs from the manifest")
        return problems

    def _bump(self, action: str, elm: str, reason: str | None, **extra: Any) -> None:
        self.manifest["version"] = self.version + 1
        rec = {"version": self.version, "action": action, "elm": elm, "at": now(), "by": _who(), **extra}
        if reason:
            rec["reason"] = reason
        self.manifest["history"].append(rec)
        self._commit()

    def _commit(self) -> None:
        write_manifest(self.root, self.manifest)


def _descendants_record(heirs: dict[str, float], descendants: str | None) -> dict[str, Any]:
    """What the history records of a removed ELM's descendants: the decision and their shares."""
    if not heirs:
        return {}
    return {"descendants": {"decision": "removed" if descendants == "remove" else "kept",
                            "elms": {n: round(w, 4) for n, w in sorted(heirs.items())}}}


def listed_weights(pairs: Iterable[tuple[str, float]]) -> str:
    """Names with their weights as cards and messages list them: `a (0.60), b (0.40)`."""
    return ", ".join(f"{n} ({w:.2f})" for n, w in pairs)


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (containers)
        return "unknown"
