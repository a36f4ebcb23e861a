"""Leaderboard latency with 1,000 ELMs x 100 domains of evaluations in PostgreSQL.

Fills a fresh database (through the app's own models and migrations), starts the
coordinator against it and times the leaderboard page and its JSON: default order, sorted
by one domain, filtered to eval domains, and a later page. Goal: p95 <= 50 ms.

    python bench/leaderboard_latency.py
    python bench/leaderboard_latency.py --elms 200 --domains 20 --requests 100
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


def fill(url: str, n_elms: int, n_domains: int) -> None:
    from sqlalchemy import insert

    from coordinator import migrate
    from coordinator.db import session_scope
    from coordinator.models import Domain, DomainRole, Evaluation, Forest, ForestVersion, Posterior
    from coordinator.services import leaderboard

    migrate.upgrade(url)
    rng = random.Random(0)
    with session_scope(url) as db:
        f = Forest(name="big", family="x", config={"model_type": "gpt2"}, tokenizer_sha256="0" * 64, seed_files={})
        db.add(f)
        db.flush()
        elms = [f"elm{i:04d}" for i in range(n_elms)]
        manifest = {"name": "big", "version": 2, "elms": [{"name": e, "domain": f"d{i % n_domains:03d}", "files": {},
                                                          "parents": [], "path": f"elms/{e}"} for i, e in enumerate(elms)],
                    "seed": {"files": {}, "path": "seed"}, "history": []}
        v = ForestVersion(forest_id=f.id, number=1, manifest=manifest, manifest_sha256="0" * 64)
        db.add(v)
        doms = [Domain(name=f"d{i:03d}", role=DomainRole.eval if i % 5 == 0 else DomainRole.train)
                for i in range(n_domains)]
        db.add_all(doms)
        db.flush()
        subjects = [(e, "elm", "elm") for e in elms] + [
            ("ensemble", "ensemble", "ensemble"), ("ensemble/top1", "ensemble", "top1"),
            ("ensemble/top2", "ensemble", "top2"), ("ensemble/top4", "ensemble", "top4"),
            ("average/uniform", "average", "uniform"), ("average/argmax", "average", "argmax"),
            ("average/posterior", "average", "posterior")]
        rows = [{"version_id": v.id, "subject": s, "kind": k, "method": m, "domain_id": d.id,
                 "perplexity": rng.uniform(5, 500), "tokens": 16384} for s, k, m in subjects for d in doms]
        for i in range(0, len(rows), 20_000):
            db.execute(insert(Evaluation), rows[i : i + 20_000])
        db.add_all(Posterior(version_id=v.id, domain_id=d.id, weights={e: 1 / n_elms for e in elms[:50]}) for d in doms)
        db.flush()
        leaderboard.summarize(db, v)
    from sqlalchemy import create_engine, text

    with create_engine(url, isolation_level="AUTOCOMMIT").connect() as c:
        c.execute(text("ANALYZE"))  # planner statistics, as a database in service has them


def timed(client, path: str, n: int) -> dict:
    client.get(path)  # warm
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        r = client.get(path)
        ts.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
    ts.sort()
    return {"p50_ms": round(statistics.median(ts), 1), "p95_ms": round(ts[int(0.95 * len(ts)) - 1], 1),
            "bytes": len(r.content)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elms", type=int, default=1000)
    ap.add_argument("--domains", type=int, default=100)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    import httpx
    from live import Coordinator
    from sqlalchemy import create_engine, text

    name = f"elmforest_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(f"{PG}/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{PG}/{name}"
    coord = None
    try:
        t = time.time()
        fill(url, args.elms, args.domains)
        print(f"filled {args.elms} ELMs x {args.domains} domains ({(args.elms + 7) * args.domains:,} evaluations) "
              f"in {time.time() - t:.0f}s", file=sys.stderr)
        coord = Coordinator(Path(tempfile.mkdtemp()), {"ELMFOREST_DATABASE_URL": url}, worker=False)
        client = httpx.Client(base_url=coord.url, timeout=30)
        cases = {
            "page": "/forests/big/leaderboard",
            "page_sorted_by_domain": "/forests/big/leaderboard?sort=d042",
            "page_eval_only": "/forests/big/leaderboard?role=eval",
            "page_10": "/forests/big/leaderboard?page=10",
            "json": "/api/v1/forests/big/leaderboard",
            "json_sorted_by_domain": "/api/v1/forests/big/leaderboard?sort=d042&desc=true",
            "json_eval_only": "/api/v1/forests/big/leaderboard?role=eval&kind=elm",
            "json_100_rows": "/api/v1/forests/big/leaderboard?per_page=100",  # for reference: 10,000 numbers
        }
        out = {}
        for label, path in cases.items():
            out[label] = timed(client, path, args.requests)
            r = out[label]
            print(f"{label:<24} p50 {r['p50_ms']:>6.1f} ms   p95 {r['p95_ms']:>6.1f} ms   {r['bytes']:>9,} bytes")
        worst = max(r["p95_ms"] for k, r in out.items() if k != "json_100_rows")
        print(f"worst p95 of the default pages (25 subjects x all domains): {worst:.1f} ms (goal <= 50 ms)")
        print(json.dumps({"elms": args.elms, "domains": args.domains, **out, "worst_p95_ms": worst}))
    finally:
        if coord:
            coord.stop()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
