"""Evaluation domains that are not in ../shared/corpus, made from files this machine's Debian
packages ship, so that `bench/repro.py --extra-eval` checks the recipe on text it was never
chosen with. Each domain gets valid.jsonl (the cached prior's blocks) and test.jsonl, one
document per file, split by file in a fixed order (sorted paths shuffled with seed 0; files alternate between
valid and test until each holds `--chars`).

    python bench/extra_domains.py --out runs/extra-domains
    python bench/repro.py --extra-eval runs/extra-domains

Domains (those whose files are missing on a machine are skipped, with a note):
  debian_changelogs  changelog.Debian of every installed package (/usr/share/doc)
  nodejs_api         the Node.js API reference in Markdown (/usr/share/doc/nodejs/api)
  postgres_sql       PostgreSQL extension install scripts (/usr/share/postgresql)
  perl_modules       Perl modules (.pm) of the system's Perl libraries
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import random
import sys
from pathlib import Path

SOURCES = {
    "debian_changelogs": ["/usr/share/doc/*/changelog.Debian.gz"],
    "nodejs_api": ["/usr/share/doc/nodejs/api/*.md"],
    "postgres_sql": ["/usr/share/postgresql/*/extension/*.sql"],
    "perl_modules": ["/usr/share/perl5/**/*.pm", "/usr/lib/x86_64-linux-gnu/perl*/**/*.pm"],
}
MAX_DOC = 20_000  # characters kept of one file (a few huge files would otherwise be the domain)


def read(path: str) -> str:
    raw = gzip.open(path).read() if path.endswith(".gz") else Path(path).read_bytes()
    return raw.decode("utf-8", errors="replace")[:MAX_DOC]


def build(out: Path, chars: int) -> dict[str, dict[str, int]]:
    made = {}
    for name, patterns in SOURCES.items():
        files = sorted({f for p in patterns for f in glob.glob(p, recursive=True)})
        random.Random(0).shuffle(files)  # many packages, not the first few alphabetically
        docs = [t for t in (read(f) for f in files) if len(t.strip()) > 200]
        if len(docs) < 4:
            print(f"skipping {name}: {len(docs)} usable files under {', '.join(patterns)}", file=sys.stderr)
            continue
        split: dict[str, list[str]] = {"valid": [], "test": []}
        size = {"valid": 0, "test": 0}
        for i, t in enumerate(docs):
            s = "valid" if i % 2 == 0 else "test"
            if size[s] < chars:
                split[s].append(t)
                size[s] += len(t)
        (out / name).mkdir(parents=True, exist_ok=True)
        for s, ds in split.items():
            with open(out / name / f"{s}.jsonl", "w") as f:
                for t in ds:
                    f.write(json.dumps({"text": t}) + "\n")
        made[name] = {f"{s}_docs": len(ds) for s, ds in split.items()} | {f"{s}_chars": size[s] for s in size}
    (out / "roles.json").write_text(json.dumps({n: "eval" for n in made}, indent=2))
    (out / "manifest.json").write_text(json.dumps(made, indent=2))
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/extra-domains"))
    ap.add_argument("--chars", type=int, default=160_000, help="characters per split (the corpus's valid/test size)")
    args = ap.parse_args()
    made = build(args.out, args.chars)
    for n, v in made.items():
        print(f"{n:<20} valid {v['valid_docs']:>4} docs {v['valid_chars']:>8,} chars   "
              f"test {v['test_docs']:>4} docs {v['test_chars']:>8,} chars")
    print(json.dumps(made))


if __name__ == "__main__":
    main()
