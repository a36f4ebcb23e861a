"""200 concurrent clients against a coordinator: a realistic mix of reads (leaderboard, forest,
manifests, web pages, job polls, small downloads, token auth) plus 20 concurrent 10 MB
uploads, with /healthz probed throughout. Loopback only, bounded: each client waits 1-3 s
between requests (--think), as a person reading pages or a client polling a job does. Prints
throughput, p50/p95/p99 (as the client saw them and inside the server), per kind, errors,
timeouts, uploads completed, the longest /healthz answer and the server's memory.

Goal: 0 errors, 0 timeouts, every upload completed, read p99 <= 200 ms, /healthz answering.

    python bench/load.py                               # an embedded coordinator (SQLite, files), filled first
    python bench/load.py --backend production          # PostgreSQL + Redis + S3 (moto) + a Celery worker
    python bench/load.py --url URL --token TOKEN --forest NAME   # a running coordinator (a maintainer's token)
    python bench/load.py --clients 50 --seconds 30 --think 0.5,1.5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TIMEOUT = 10.0
# one TLS context for all clients (each httpx client would otherwise build its own, ~30 ms of
# CPU apiece: 200 of them stall the load generator's loop for seconds before the first request)
_TLS = __import__("ssl").create_default_context()
MIX = [  # (kind, weight)
    ("leaderboard", 20), ("forest", 10), ("manifest", 5), ("page-forest", 10), ("page-elm", 10),
    ("page-leaderboard", 5), ("job", 15), ("me", 10), ("download", 10), ("domains", 5),
]


class Stats:
    def __init__(self):
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.timeouts: dict[str, int] = defaultdict(int)
        self.samples: list[str] = []
        self.slow: list[tuple[float, str, float]] = []  # (when, kind, seconds) of answers over 200 ms
        self.server: dict[str, list[float]] = defaultdict(list)  # the server's own wait + work (Server-Timing)
        self.t0 = time.monotonic()

    def record(self, kind: str, seconds: float, status: int | None, body: str = "") -> None:
        if seconds > 0.2:
            self.slow.append((round(time.monotonic() - self.t0 - seconds, 1), kind, round(seconds, 3)))
        if status is None:  # no answer: a timeout, or the connection failed
            self.timeouts[kind] += 1
            if len(self.samples) < 8:
                self.samples.append(f"{kind} no answer after {seconds:.2f} s: {body[:160]}")
        elif status >= 400:
            self.errors[kind] += 1
            if len(self.samples) < 8:
                self.samples.append(f"{kind} {status} {body[:160]}")
        else:
            self.lat[kind].append(seconds)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


async def request(http: httpx.AsyncClient, stats: Stats, kind: str, method: str, url: str, **kw) -> httpx.Response | None:
    t = time.perf_counter()
    try:
        r = await http.request(method, url, **kw)
    except (httpx.TimeoutException, httpx.TransportError) as e:
        stats.record(kind, time.perf_counter() - t, None, f"{type(e).__name__}: {e}")
        return None
    stats.record(kind, time.perf_counter() - t, r.status_code, r.text if r.status_code >= 400 else "")
    timing = r.headers.get("server-timing")
    if timing:
        stats.server[kind].append(sum(float(x.split("dur=")[1]) for x in timing.split(",")) / 1000)
    return r


def _read_request(kind: str, ctx: dict, rng: random.Random) -> tuple[str, dict | None, bool]:
    """One read of the mix: (path, query parameters, whether it carries the client's token)."""
    f, elm = ctx["forest"], rng.choice(ctx["elms"])
    if kind == "leaderboard":
        return f"/api/v1/forests/{f}/leaderboard", {"sort": rng.choice(["mean", "mean_eval", ctx["domains"][0]])}, False
    if kind == "job":  # a contributor polling the jobs working on their contributions
        return "/api/v1/jobs", {"limit": 5}, True
    if kind == "download":
        return rng.choice(ctx["small_files"]), None, False
    paths = {"forest": f"/api/v1/forests/{f}", "manifest": f"/api/v1/forests/{f}/versions/{ctx['version']}",
             "page-forest": f"/forests/{f}", "page-elm": f"/forests/{f}/elms/{elm}",
             "page-leaderboard": f"/forests/{f}/leaderboard", "me": "/api/v1/me", "domains": "/api/v1/domains"}
    return paths[kind], None, kind == "me"


async def reader(i: int, base: str, token: str, ctx: dict, stats: Stats, until: float,
                 think: tuple[float, float]) -> None:
    rng = random.Random(i)
    kinds, weights = zip(*MIX, strict=True)
    headers = {"authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
    async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT, limits=limits, verify=_TLS) as http:
        await asyncio.sleep(rng.random() * 2)  # clients arrive over two seconds
        while time.monotonic() < until:
            kind = rng.choices(kinds, weights)[0]
            path, params, auth = _read_request(kind, ctx, rng)
            await request(http, stats, kind, "GET", path, params=params, **({"headers": headers} if auth else {}))
            await asyncio.sleep(think[0] + (think[1] - think[0]) * rng.random())


async def uploader(i: int, base: str, token: str, data: bytes, stats: Stats, start_at: float, done: list) -> None:
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    headers = {"authorization": f"Bearer {token}"}
    sha = hashlib.sha256(data).hexdigest()
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=60.0, verify=_TLS) as http:
        r = await request(http, stats, "upload-start", "POST", "/api/v1/uploads", headers=headers,
                          json={"purpose": "sample", "filename": f"u{i}.jsonl", "sha256": sha, "size": len(data)})
        if r is None or r.status_code != 201:
            return
        up = r.json()
        for p in up["parts"]:
            off = (p["part_number"] - 1) * up["part_size"]
            r = await request(http, stats, "upload-part", "PUT", p["url"], content=data[off:off + p["length"]])
            if r is None or r.status_code >= 400:
                return
        r = await request(http, stats, "upload-complete", "POST", f"/api/v1/uploads/{up['upload_id']}/complete",
                          headers=headers, json={})
        if r is not None and r.status_code == 200 and r.json()["status"] == "complete":
            done.append(time.perf_counter() - t0)


async def prober(base: str, stats: Stats, until: float, worst: list) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT, verify=_TLS) as http:
        while time.monotonic() < until:
            t = time.perf_counter()
            r = await request(http, stats, "healthz", "GET", "/healthz")
            worst.append(time.perf_counter() - t if r is not None else TIMEOUT)
            await asyncio.sleep(0.5)


async def warm_up(base: str, token: str, ctx: dict) -> None:
    """One request of every kind first: the server's one-time costs (templates compiled,
    statements cached, threads started) are not what a load test measures."""
    f = ctx["forest"]
    async with httpx.AsyncClient(base_url=base, timeout=60, headers={"authorization": f"Bearer {token}"}) as http:
        for path in (f"/api/v1/forests/{f}/leaderboard", f"/api/v1/forests/{f}", f"/api/v1/forests/{f}/versions/"
                     f"{ctx['version']}", f"/forests/{f}", f"/forests/{f}/elms/{ctx['elms'][0]}",
                     f"/forests/{f}/leaderboard", "/api/v1/jobs", "/api/v1/me", "/api/v1/domains", "/healthz",
                     ctx["small_files"][0]):
            await http.get(path)


def upload_all(base: str, tokens: list[str], upload_mb: int, delay: float, out) -> None:
    """The uploading clients, in a process of their own (their 200 MB do not stall the
    readers' event loop, and they are other machines' clients anyway)."""

    async def go():
        stats, done = Stats(), []
        blobs = []
        for i, _ in enumerate(tokens):  # distinct 10 MB JSONL samples
            line = json.dumps({"text": f"{i} " + "lorem ipsum dolor sit amet " * 40}) + "\n"
            blobs.append((line * (upload_mb * 1024 * 1024 // len(line))).encode())
        start = time.monotonic() + delay
        await asyncio.gather(*[uploader(i, base, t, blobs[i], stats, start, done) for i, t in enumerate(tokens)])
        out.put({"done": done, "lat": dict(stats.lat), "errors": dict(stats.errors), "timeouts": dict(stats.timeouts),
                 "samples": stats.samples})

    asyncio.run(go())


async def run_load(base: str, tokens: list[str], ctx: dict, seconds: float, uploads: int, upload_mb: int,
                   work: Path, think: tuple[float, float]) -> dict:
    import multiprocessing as mp

    await warm_up(base, tokens[0], ctx)
    stats = Stats()
    until = time.monotonic() + seconds
    health: list[float] = []
    results: mp.Queue = mp.get_context("spawn").Queue()
    up = mp.get_context("spawn").Process(target=upload_all, args=(base, tokens[:uploads], upload_mb, 5.0, results))
    if uploads:
        up.start()
    else:
        results.put({"done": [], "lat": {}, "errors": {}, "timeouts": {}, "samples": []})
    t0 = time.perf_counter()
    tasks = [reader(i, base, tokens[i % len(tokens)], ctx, stats, until, think) for i in range(len(tokens))]
    tasks.append(prober(base, stats, until, health))
    await asyncio.gather(*tasks)
    r = await asyncio.to_thread(results.get)
    if uploads:
        up.join()
    done = r["done"]
    for k, v in r["lat"].items():
        stats.lat[k] += v
    for src, dst in ((r["errors"], stats.errors), (r["timeouts"], stats.timeouts)):
        for k, v in src.items():
            dst[k] += v
    stats.samples += r["samples"]
    wall = time.perf_counter() - t0
    reads = [x for k, v in stats.lat.items() if not k.startswith(("upload", "healthz")) for x in v]
    server_reads = [x for k, v in stats.server.items() if not k.startswith(("upload", "healthz")) for x in v]
    n = sum(len(v) for v in stats.lat.values()) + sum(stats.errors.values()) + sum(stats.timeouts.values())
    return {
        "clients": len(tokens), "seconds": round(wall, 1), "requests": n, "requests_per_s": round(n / wall, 1),
        "errors": sum(stats.errors.values()), "timeouts": sum(stats.timeouts.values()),
        "uploads_completed": f"{len(done)}/{uploads}",
        "upload_seconds_p50_max": [round(statistics.median(done), 2), round(max(done), 2)] if done else None,
        "read_ms_p50_p95_p99": [round(pct(reads, q), 1) for q in (0.5, 0.95, 0.99)],
        "read_ms_p50_p95_p99_in_server": [round(pct(server_reads, q), 1) for q in (0.5, 0.95, 0.99)],
        "healthz_worst_ms": round(max(health) * 1000, 1) if health else None,
        "by_kind_ms_p50_p99": {k: [round(pct(v, 0.5), 1), round(pct(v, 0.99), 1), len(v)] for k, v in sorted(stats.lat.items())},
        "errors_by_kind": dict(stats.errors), "timeouts_by_kind": dict(stats.timeouts), "error_samples": stats.samples,
        "slow_answers_by_second": _by_second(stats.slow),
        "slow_answers_by_kind": dict(Counter(kind for _, kind, _ in stats.slow)),
        "slowest_reads": sorted((x for x in stats.slow if not x[1].startswith("upload")), key=lambda x: -x[2])[:10],
    }


def _by_second(slow: list[tuple[float, str, float]]) -> dict[int, int]:
    """How many answers took over 200 ms, by the second of the run they were asked in."""
    return dict(sorted(Counter(int(when) for when, _, _ in slow).items()))


# ----------------------------------------------------------------------------- a coordinator to load


def fill(c, work: Path) -> dict:
    """A forest with two merged ELMs, an eval domain and an evaluated version, like the tests'."""
    import torch
    from helpers import CORPUS, TRAIN_DOMAINS, streams, tiny_train_config
    from live import populate

    from btm.data import Corpus
    from btm.tokenizer import iter_balanced_texts, load_tokenizer, train_bpe

    torch.set_num_threads(1)
    tok_dir = work / "tokenizer"
    corpus = Corpus(CORPUS)
    train_bpe(iter_balanced_texts({n: corpus[n].documents("train") for n in TRAIN_DOMAINS}, 100_000), 512) \
        .save_pretrained(str(tok_dir))
    tok = load_tokenizer(tok_dir)
    from btm.data import BlockSampler
    from btm.family import Card, new_model, preset_config
    from btm.train import train

    seed = work / "seed"
    train(new_model(preset_config("tiny", tok)), tok, BlockSampler(streams(tok, work / "cache", TRAIN_DOMAINS), 64),
          tiny_train_config(30), seed, Card(name="seed", kind="seed"))
    populate(c, seed, tok, work / "cache", work, forest="load")
    return {"forest": "load"}


def context(base: str, token: str, forest: str) -> dict:
    api = httpx.Client(base_url=base + "/api/v1", headers={"authorization": f"Bearer {token}"}, timeout=60)
    f = api.get(f"/forests/{forest}").json()
    d = api.get(f"/forests/{forest}/download").json()
    lb = api.get(f"/forests/{forest}/leaderboard").json()
    small = [u for p, u in d["files"].items() if p.endswith(("config.json", "tokenizer_config.json"))]
    return {"forest": forest, "version": f["current_version"], "elms": [e["name"] for e in d["manifest"]["elms"]],
            "domains": [x["name"] for x in lb["domains"]], "small_files": small}


def server_rss_mib(pids: list[int]) -> float:
    import psutil

    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            total += sum(x.memory_info().rss for x in [p, *p.children(recursive=True)])
    return round(total / 2**20, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running coordinator (else one is started here)")
    ap.add_argument("--token", help="with --url: a maintainer's API token (it mints one token per client)")
    ap.add_argument("--forest", default="load", help="with --url: the forest to read")
    ap.add_argument("--backend", choices=["embedded", "production"], default="embedded")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--uploads", type=int, default=20)
    ap.add_argument("--upload-mb", type=int, default=10)
    ap.add_argument("--processes", type=int, default=1, help="API processes of the coordinator started here")
    ap.add_argument("--think", default="1,3", help="seconds a client waits between requests: MIN,MAX")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="elmforest-load-"))
    with contextlib.ExitStack() as stack:
        if args.url:
            base, forest = args.url.rstrip("/"), args.forest
            api = httpx.Client(base_url=base + "/api/v1", headers={"authorization": f"Bearer {args.token}"})
            tokens = [api.post("/tokens", json={"name": f"load-{i}", "expires_days": 1}).json()["token"]
                      for i in range(args.clients)]
            pids: list[int] = []
        else:
            from live import Coordinator, MotoS3, fresh_pg_database

            env = {"ELMFOREST_EVAL_SCORED_BLOCKS": "8"}
            if args.backend == "production":
                pg = stack.enter_context(fresh_pg_database())
                moto = MotoS3()
                stack.callback(moto.stop)
                env.update({"ELMFOREST_DATABASE_URL": pg, "ELMFOREST_BROKER_URL": "redis://127.0.0.1:6379/0",
                            "ELMFOREST_QUEUE": f"elmforest-load-{uuid.uuid4().hex[:6]}", **moto.env("load")})
            c = Coordinator(work / "coord", env, worker=args.backend == "embedded",
                            serve_args=("--workers", str(args.processes)))
            stack.callback(c.stop)
            if args.backend == "production":
                c.spawn(["worker", "--loglevel", "WARNING"])
            print(f"filling a {args.backend} coordinator ...", file=sys.stderr)
            forest = fill(c, work)["forest"]
            base = c.url
            print(f"making {args.clients} users ...", file=sys.stderr)
            tokens = [c.user(f"user{i}").token for i in range(args.clients)]
            pids = [p.pid for p in c.procs]
        ctx = context(base, tokens[0], forest)
        rss0 = server_rss_mib(pids) if pids else None
        import gc

        gc.collect()
        gc.freeze()  # this process loaded torch to fill the forest: keep its collector out of the timings
        print(f"{args.clients} clients for {args.seconds:.0f} s ...", file=sys.stderr)
        think = tuple(float(x) for x in args.think.split(","))
        result = asyncio.run(run_load(base, tokens, ctx, args.seconds, min(args.uploads, len(tokens)),
                                      args.upload_mb, work, think))
        result["backend"] = args.url or args.backend
        result["think_seconds"] = think
        if pids:
            result["server_rss_mib_before_after"] = [rss0, server_rss_mib(pids)]
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
