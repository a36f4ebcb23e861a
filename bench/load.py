"""A community's load on a coordinator: many clients reading (the forest list, a leaderboard, a
version's manifest, an ELM's metadata and its web page, polls of their own job, /healthz,
whoami), half of them logged in, while 20 others upload 10 MiB each at once. Each client waits
--think seconds (0.25-0.75 by default) between requests and revalidates what it fetched before
(If-None-Match, as a browser does; --never-cache: clients that keep nothing). Every client has
its own loopback address (127.0.x.y), as people behind their own machines do, so per-address
limits count them apart. The clients are spread over several processes (--client-processes).

Reported (the last line is one JSON object): offered and served requests a second (offered:
what the clients' schedules asked for, whether or not the server kept up; served: answers
that were not errors), p50/p95/p99 per route, errors by status (429, 503, other 4xx, 5xx),
timeouts and broken connections, uploads completed, the CPU of the server's processes, of the
load generator and of the backing services, and the generator's own event-loop lag (a starved
client would otherwise pass for a slow server).

    python bench/load.py                                   # 200 clients, embedded default (SQLite, files)
    python bench/load.py --mode sweep                      # 50, 200 and 500 clients, one after another
    python bench/load.py --mode saturation                 # the most cacheable reads a second it serves
    python bench/load.py --backend production --replicas 2 --clients 500
                                                           # PostgreSQL + Redis + S3 (moto), 2 `elmforest serve`
    python bench/load.py --url URL --token TOKEN --forest NAME   # a running coordinator (a maintainer's token)

Goals (issue 27): embedded, 200 clients and 20 uploads: 0 errors, 0 timeouts, 20/20 uploads,
served within 5% of offered, read p99 <= 200 ms; production, 2 replicas, 500 clients: read p99
<= 300 ms, nothing lost; saturation >= 1,000 req/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlencode, urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TIMEOUT = 10.0  # a request with no answer after this long is a timeout
BUSY_RETRIES = 6  # an uploader sends a step again after a 429/503 this many times (as the client does)
# what a client asks for, and how often (kinds marked * only for clients that are logged in)
MIX = [("forests", 10), ("leaderboard", 15), ("version", 10), ("elm", 10), ("page-elm", 15), ("job*", 15),
       ("whoami*", 10), ("healthz", 5)]
# saturation: reads any cache may keep (published data, pages as a visitor sees them)
CACHEABLE = [("forests", 1), ("forest", 1), ("leaderboard", 1), ("version", 1), ("page-forest", 1), ("page-elm", 1)]
UPLOAD_KINDS = ("upload-start", "upload-part", "upload-complete")


# ----------------------------------------------------------------------------- a lean HTTP/1.1 client


class Http:
    """One keep-alive HTTP/1.1 connection from one local address (a browser tab, a CLI). Lean
    on purpose: hundreds of them share a core with the server, and a load generator that spends
    more time in its HTTP library than the server spends answering measures itself."""

    def __init__(self, host: str, port: int, local: str | None = None):
        self.host, self.port, self.local = host, port, local
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = False

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, limit=1 << 20, local_addr=(self.local, 0) if self.local else None)
        self.used = False

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        if body or method in ("POST", "PUT"):
            head += f"Content-Length: {len(body)}\r\n"
        raw = head.encode() + b"\r\n" + body
        for attempt in (0, 1):
            if self.writer is None:
                await self._connect()
            reused = self.used
            try:
                self.writer.write(raw)
                answer = await self._read(method)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                self.close()
                if reused and attempt == 0:  # the server closed an idle connection as we reused it
                    continue
                raise
            self.used = True
            if answer[1].get("connection", "").lower() == "close":
                self.close()
            return answer
        raise ConnectionError("unreachable")

    async def _read(self, method: str) -> tuple[int, dict[str, str], bytes]:
        r = self.reader
        lines = (await r.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if status in (204, 304) or method == "HEAD" or 100 <= status < 200:
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, await r.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await r.readuntil(b"\r\n")
                    break
                chunks.append(await r.readexactly(size))
                await r.readexactly(2)
            return status, headers, b"".join(chunks)
        body = await r.read()
        self.close()
        return status, headers, body


def address(i: int) -> str:
    """Client i's own loopback address (never 127.0.0.1, which the server and proxies use)."""
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


# ----------------------------------------------------------------------------- what clients record


class Stats:
    """What one process's clients saw."""

    def __init__(self):
        self.lat: dict[str, list[float]] = defaultdict(list)  # seconds, answers that were not errors
        self.server: dict[str, list[float]] = defaultdict(list)  # the server's own wait + work (Server-Timing)
        self.status: dict[str, Counter] = defaultdict(Counter)  # kind -> status -> answers
        self.failed: dict[str, Counter] = defaultdict(Counter)  # kind -> "timeout"/"connection" -> count
        self.samples: list[str] = []
        self.offered = self.sent = self.served = self.not_modified = 0
        self.late: list[float] = []  # how long after its due time each request went out
        self.t0 = time.time()  # the run's start (set when it starts)
        self.slow: list[tuple[int, str]] = []  # (second of the run it was asked in, kind) of answers over 200 ms
        self.unanswered: list[int] = []  # the second of the run each request without an answer was asked in

    def answer(self, kind: str, seconds: float, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status[kind][status] += 1
        if seconds > 0.2:
            self.slow.append((int(time.time() - seconds - self.t0), kind))
        if status >= 400:
            if len(self.samples) < 10:
                self.samples.append(f"{kind} {status} {body[:160].decode(errors='replace')}")
            return
        self.served += 1
        self.not_modified += status == 304
        self.lat[kind].append(seconds)
        timing = headers.get("server-timing")
        if timing:
            with contextlib.suppress(ValueError, IndexError):
                self.server[kind].append(sum(float(x.split("dur=")[1]) for x in timing.split(",")) / 1000)

    def no_answer(self, kind: str, seconds: float, why: str, e: BaseException) -> None:
        self.failed[kind][why] += 1
        self.unanswered.append(int(time.time() - seconds - self.t0))
        if len(self.samples) < 10:
            self.samples.append(f"{kind} {why} after {seconds:.2f} s: {type(e).__name__} {e}"[:200])

    def dump(self) -> dict:
        return {"lat": dict(self.lat), "server": dict(self.server),
                "status": {k: dict(v) for k, v in self.status.items()},
                "failed": {k: dict(v) for k, v in self.failed.items()}, "samples": self.samples,
                "offered": self.offered, "sent": self.sent, "served": self.served,
                "not_modified": self.not_modified, "late": self.late, "slow": self.slow,
                "unanswered": self.unanswered}


def merge(parts: list[dict]) -> dict:
    out = {"lat": defaultdict(list), "server": defaultdict(list), "status": defaultdict(Counter),
           "failed": defaultdict(Counter), "samples": [], "offered": 0, "sent": 0, "served": 0, "not_modified": 0,
           "late": [], "loop_lag": [], "cpu_seconds": 0.0, "slow": [], "unanswered": []}
    for p in parts:
        for key in ("lat", "server"):
            for k, v in p.get(key, {}).items():
                out[key][k] += v
        for key in ("status", "failed"):
            for k, v in p.get(key, {}).items():
                out[key][k].update({int(s) if str(s).isdigit() else s: n for s, n in v.items()})
        for key in ("offered", "sent", "served", "not_modified", "cpu_seconds"):
            out[key] += p.get(key, 0)
        out["samples"] += p.get("samples", [])[: max(0, 12 - len(out["samples"]))]
        out["late"] += p.get("late", [])
        out["slow"] += p.get("slow", [])
        out["unanswered"] += p.get("unanswered", [])
        out["loop_lag"] += p.get("loop_lag", [])
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1)


# ----------------------------------------------------------------------------- the clients


def read_request(kind: str, ctx: dict, who: dict, rng: random.Random) -> str:
    """The path (and query) of one request of `kind`."""
    f = ctx["forest"]
    paths = {
        "forests": lambda: "/api/v1/forests",
        "forest": lambda: f"/api/v1/forests/{f}",
        "leaderboard": lambda: f"/api/v1/forests/{f}/leaderboard?" + urlencode({"sort": rng.choice(ctx["sorts"])}),
        "version": lambda: f"/api/v1/forests/{f}/versions/{rng.choice(ctx['versions'])}",
        # an ELM's metadata: its contribution (state, evaluation, history)
        "elm": lambda: (f"/api/v1/contributions/{rng.choice(ctx['contributions'])}" if ctx["contributions"]
                        else f"/api/v1/domains/{rng.choice(ctx['domains'])}"),
        "page-elm": lambda: f"/forests/{f}/elms/{rng.choice(ctx['elms'])}",
        "page-forest": lambda: f"/forests/{f}",
        "job": lambda: f"/api/v1/jobs/{who['job']}" if who.get("job") else "/api/v1/jobs?limit=5",
        "whoami": lambda: "/api/v1/me",
        "healthz": lambda: "/healthz",
    }
    return paths[kind]()


async def fetch(http: Http, stats: Stats, kind: str, path: str, headers: dict, tags: dict | None) -> None:
    """One request, recorded; with `tags` (a revalidating client), If-None-Match from the last answer."""
    if tags is not None and path in tags:
        headers["If-None-Match"] = tags[path]
    stats.sent += 1
    t = time.perf_counter()
    try:
        async with asyncio.timeout(TIMEOUT):
            status, h, body = await http.request("GET", path, headers)
    except TimeoutError as e:
        http.close()
        stats.no_answer(kind, time.perf_counter() - t, "timeout", e)
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        http.close()
        stats.no_answer(kind, time.perf_counter() - t, "connection", e)
    else:
        stats.answer(kind, time.perf_counter() - t, status, h, body)
        if tags is not None and status == 200 and "etag" in h:
            tags[path] = h["etag"]


async def client(i: int, who: dict, ctx: dict, stats: Stats, start: float, until: float,
                 think: tuple[float, float] | None, cache: bool, local: bool) -> None:
    """One person (or script): a request when one is due, `think` seconds apart (None: the next
    as soon as the last is answered). A request due while the last is still out goes the
    moment it is answered (and counts as offered at its due time: a slow server cannot lower
    the load it is offered)."""
    rng = random.Random(i)
    mix = CACHEABLE if think is None else [(k.rstrip("*"), w) for k, w in MIX if who.get("token") or "*" not in k]
    kinds, weights = zip(*mix, strict=True)
    u = urlsplit(who["base"])
    http = Http(u.hostname, u.port or 80, address(i) if local else None)
    auth = {"Authorization": f"Bearer {who['token']}"} if who.get("token") else {}
    # saturation reads pages as a visitor sees them (a signed-in user's page is theirs alone)
    cookie = {"Cookie": who["cookie"]} if who.get("cookie") and think is not None else {}
    tags: dict[str, str] | None = {} if cache else None
    loop = asyncio.get_running_loop()
    due = start + rng.random() * (think[1] if think else 1.0)  # clients arrive over a think time (a second)
    try:
        while True:
            now = loop.time()
            if due >= until:
                break
            if due > now:
                await asyncio.sleep(due - now)
            now = loop.time()
            if now >= until:
                break
            stats.offered += 1
            stats.late.append(now - due)
            kind = rng.choices(kinds, weights)[0]
            path = read_request(kind, ctx, who, rng)
            # a browser sends its session cookie with pages, a script its token with API calls
            headers = {} if kind == "healthz" else dict(cookie if path.startswith("/forests") else auth)
            await fetch(http, stats, kind, path, headers, tags)
            due = loop.time() if think is None else due + think[0] + (think[1] - think[0]) * rng.random()
        if think is not None:  # requests that fell due before the end and never went out
            while due < until:
                stats.offered += 1
                due += think[0] + (think[1] - think[0]) * rng.random()
    finally:
        http.close()


async def watch_loop(lags: list[float], until: float, every: float = 0.05) -> None:
    """How late this process's event loop wakes up: its own lag, not the server's."""
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        t = loop.time()
        await asyncio.sleep(every)
        lags.append(max(0.0, loop.time() - t - every))


def client_process(spec: dict, out) -> None:
    """A process of clients (its share of them), started at the same wall-clock moment as the others."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    async def go() -> dict:
        loop = asyncio.get_running_loop()
        start = loop.time() + (spec["start_at"] - time.time())
        until = start + spec["seconds"]
        stats, lags = Stats(), []
        stats.t0 = spec["start_at"]
        cpu0 = time.process_time()
        await asyncio.sleep(max(0.0, start - loop.time() - 0.5))
        think = tuple(spec["think"]) if spec["think"] else None
        await asyncio.gather(watch_loop(lags, until + 1),
                             *[client(i, who, spec["ctx"], stats, start, until, think, spec["cache"], spec["local"])
                               for i, who in spec["clients"]])
        return {**stats.dump(), "loop_lag": lags, "cpu_seconds": time.process_time() - cpu0}

    out.put(asyncio.run(go()))


# ----------------------------------------------------------------------------- uploads


async def send_step(http, stats: Stats, kind: str, method: str, url: str, **kw):
    """One step of an upload, sent again while the coordinator is busy (429/503) as its
    Retry-After asks, as the elmforest client does (each busy answer still counts)."""
    import httpx

    for attempt in range(BUSY_RETRIES + 1):
        t = time.perf_counter()
        try:
            r = await http.request(method, url, **kw)
        except (httpx.TimeoutException, httpx.TransportError) as e:
            stats.no_answer(kind, time.perf_counter() - t, "timeout" if isinstance(e, httpx.TimeoutException)
                            else "connection", e)
            return None
        stats.answer(kind, time.perf_counter() - t, r.status_code, dict(r.headers), r.content)
        if r.status_code not in (429, 503) or attempt == BUSY_RETRIES:
            return r
        await asyncio.sleep(float(r.headers.get("retry-after") or 1) * (1 + 0.25 * attempt))
    return None


def upload_process(uploads: list[dict], upload_mb: int, start_at: float, out) -> None:
    """The uploading clients, in a process of their own (their 200 MiB do not stall the
    readers' event loops): each starts an upload, PUTs its parts, completes it."""
    import httpx

    async def one(i: int, who: dict, data: bytes, stats: Stats, done: list) -> None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        sha = hashlib.sha256(data).hexdigest()
        t0 = time.perf_counter()
        transport = httpx.AsyncHTTPTransport(local_address=who.get("local"))
        async with httpx.AsyncClient(base_url=who["base"], timeout=60.0, transport=transport) as http:
            headers = {"authorization": f"Bearer {who['token']}"}
            r = await send_step(http, stats, "upload-start", "POST", "/api/v1/uploads", headers=headers,
                                json={"purpose": "sample", "filename": f"u{i}.jsonl", "sha256": sha, "size": len(data)})
            if r is None or r.status_code != 201:
                return
            up = r.json()
            for p in up["parts"]:
                off = (p["part_number"] - 1) * up["part_size"]
                r = await send_step(http, stats, "upload-part", "PUT", p["url"], content=data[off:off + p["length"]])
                if r is None or r.status_code >= 400:
                    return
            r = await send_step(http, stats, "upload-complete", "POST",
                                f"/api/v1/uploads/{up['upload_id']}/complete", headers=headers, json={})
            if r is not None and r.status_code == 200 and r.json()["status"] == "complete":
                done.append(time.perf_counter() - t0)

    async def go():
        stats, done = Stats(), []
        stats.t0 = start_at - 5.0
        blobs = []
        for i in range(len(uploads)):  # distinct 10 MiB JSONL samples
            line = json.dumps({"text": f"{i} {uuid.uuid4().hex} " + "lorem ipsum dolor sit amet " * 40}) + "\n"
            blobs.append((line * (upload_mb * 1024 * 1024 // len(line))).encode())
        cpu0 = time.process_time()
        await asyncio.gather(*[one(i, who, blobs[i], stats, done) for i, who in enumerate(uploads)])
        out.put({**stats.dump(), "done": done, "cpu_seconds": time.process_time() - cpu0})

    asyncio.run(go())


# ----------------------------------------------------------------------------- CPU


class Cpu:
    """CPU seconds of process trees (the server's, the backing services') and of the machine."""

    SERVICES = ("postgres", "redis-server", "minio", "nginx", "caddy")

    def __init__(self, server_pids: list[int], service_pids: list[int] = ()):
        self.server_pids, self.service_pids = server_pids, list(service_pids)

    @staticmethod
    def _tree(pids: list[int]) -> float:
        import psutil

        total, seen = 0.0, set()
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                for x in [p, *p.children(recursive=True)]:
                    if x.pid in seen:
                        continue
                    seen.add(x.pid)
                    with contextlib.suppress(psutil.Error):
                        t = x.cpu_times()
                        total += t.user + t.system + t.children_user + t.children_system
        return total

    def _services(self) -> float:
        import psutil

        pids = list(self.service_pids)
        for p in psutil.process_iter(["name"]):
            if (p.info["name"] or "").startswith(self.SERVICES):
                pids.append(p.pid)
        return self._tree(pids)

    def sample(self) -> dict:
        import psutil

        t = psutil.cpu_times()
        every = {}
        for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
            c = p.info["cpu_times"]
            if c is not None:
                every[p.pid] = (" ".join(p.info["cmdline"] or [p.info["name"] or "?"])[:80], c.user + c.system)
        return {"at": time.monotonic(), "server": self._tree(self.server_pids), "services": self._services(),
                "machine_busy": sum(t) - t.idle - getattr(t, "iowait", 0.0), "every": every}

    @staticmethod
    def busiest_others(a: dict, b: dict, mine: set[int], n: int = 3) -> list[tuple[str, float]]:
        """The processes besides the run's own that used the most CPU over it (percent of one core)."""
        wall = max(1e-9, b["at"] - a["at"])
        used = [(name, 100 * (t - a["every"][pid][1]) / wall) for pid, (name, t) in b["every"].items()
                if pid in a["every"] and pid not in mine]
        return [(name, round(x, 1)) for name, x in sorted(used, key=lambda u: -u[1])[:n] if x >= 1]

    @staticmethod
    def percent(a: dict, b: dict, key: str) -> float:
        """Percent of one core over the interval (200 = both cores of this machine)."""
        return round(100 * (b[key] - a[key]) / max(1e-9, b["at"] - a["at"]), 1)


# ----------------------------------------------------------------------------- one run


def run_load(setup: dict, clients: int, seconds: float, think: tuple[float, float] | None, uploads: int,
             upload_mb: int, cache: bool, processes: int) -> dict:
    """One load: `clients` readers over `processes` processes (plus the uploaders' own) for `seconds`."""
    import multiprocessing as mp

    spawn = mp.get_context("spawn")
    out = spawn.Queue()
    start_at = time.time() + 4.0  # every process is up and waiting by then
    procs = readers(spawn, out, setup, clients, processes, {"seconds": seconds, "think": think, "cache": cache,
                                                             "start_at": start_at})
    procs += uploaders(spawn, out, setup, uploads, upload_mb, start_at + 5.0)
    for p in procs:
        p.start()
    cpu = Cpu(setup["server_pids"], setup.get("service_pids", []))
    time.sleep(max(0.0, start_at - time.time()))
    spy = profile(setup, seconds, clients) if setup.get("profile") else None
    mine = _family([os.getpid(), *(p.pid for p in procs), *setup["server_pids"], *setup.get("service_pids", [])])
    a = cpu.sample()
    time.sleep(seconds)
    b = cpu.sample()
    if spy is not None:
        spy.wait()
    parts = [out.get(timeout=seconds + 600) for _ in procs]
    for p in procs:
        p.join()
    m = merge(parts)
    return {"clients": clients, "seconds": seconds, "think_seconds": list(think) if think else None,
            "revalidating": cache, "client_processes": len(procs) - bool(uploads),
            **throughput(m, parts, seconds, uploads), **latencies(m),
            "cpu_percent_of_one_core": cpu_split(a, b, 100 * m["cpu_seconds"] / seconds),
            "busiest_other_processes": Cpu.busiest_others(a, b, mine),
            "generator_loop_lag_ms_p99_max": [pct(m["loop_lag"], 0.99), pct(m["loop_lag"], 1.0)],
            "error_samples": m["samples"]}


def readers(spawn, out, setup: dict, clients: int, processes: int, spec: dict) -> list:
    """The reading clients' processes, each with its share of the people."""
    people = setup["people"][:clients]
    shares = [[(i, who) for i, who in enumerate(people) if i % processes == k] for k in range(processes)]
    return [spawn.Process(target=client_process, args=({"clients": share, "ctx": setup["ctx"], "local": setup["local"],
                                                        **spec}, out)) for share in shares if share]


def uploaders(spawn, out, setup: dict, uploads: int, upload_mb: int, start_at: float) -> list:
    """The uploading clients' one process (none without uploads): logged-in people, each from an
    address of its own."""
    if not uploads:
        return []
    senders = [p for p in setup["people"] if p.get("token")][:uploads]
    senders = [{**p, "local": address(10_000 + j) if setup["local"] else None} for j, p in enumerate(senders)]
    return [spawn.Process(target=upload_process, args=(senders, upload_mb, start_at, out))]


def throughput(m: dict, parts: list[dict], seconds: float, uploads: int) -> dict:
    """Offered and served a second, errors by status, requests with no answer, uploads done."""
    upload_part = next((x for x in parts if "done" in x), {"done": []})
    codes: Counter = Counter()
    for v in m["status"].values():
        codes.update(v)
    errors = {"429": codes[429], "503": codes[503], "5xx": sum(n for s, n in codes.items() if s >= 500 and s != 503),
              "4xx": sum(n for s, n in codes.items() if 400 <= s < 500 and s != 429)}
    done = sorted(upload_part["done"])
    served = m["served"] - sum(len(upload_part.get("lat", {}).get(k, [])) for k in UPLOAD_KINDS)
    return {"offered_per_s": round(m["offered"] / seconds, 1), "served_per_s": round(served / seconds, 1),
            "served_of_offered": round(served / max(1, m["offered"]), 4),
            "not_modified_share": round(m["not_modified"] / max(1, served), 3),
            "errors": sum(errors.values()), "errors_by_status": errors,
            "timeouts": sum(v.get("timeout", 0) for v in m["failed"].values()),
            "broken_connections": sum(v.get("connection", 0) for v in m["failed"].values()),
            "uploads_completed": f"{len(done)}/{uploads}",
            "upload_seconds_p50_max": [round(done[len(done) // 2], 2), round(done[-1], 2)] if done else None}


def latencies(m: dict) -> dict:
    """Read latencies (the client's and the server's own), per route, and when the slow ones came."""
    reads = [x for k, v in m["lat"].items() if k not in UPLOAD_KINDS for x in v]
    in_server = [x for k, v in m["server"].items() if k not in UPLOAD_KINDS for x in v]
    return {"read_ms_p50_p95_p99": [pct(reads, q) for q in (0.5, 0.95, 0.99)],
            "read_ms_p99_in_server": pct(in_server, 0.99),
            "sent_late_ms_p50_p99": [pct(m["late"], q) for q in (0.5, 0.99)],
            "by_route": {k: route_stats(m, k) for k in sorted(set(m["status"]) | set(m["failed"]))},
            # answers over 200 ms by the second of the run they were asked in (uploads start at second 5)
            "slow_answers_by_second": dict(sorted(Counter(sec for sec, _ in m["slow"]).items())),
            "unanswered_by_second": dict(sorted(Counter(m["unanswered"]).items()))}


def route_stats(m: dict, kind: str) -> dict:
    lat = m["lat"].get(kind, [])
    return {"answers": sum(m["status"][kind].values()), "ms_p50_p95_p99": [pct(lat, q) for q in (0.5, 0.95, 0.99)],
            "status": {str(s): n for s, n in sorted(m["status"][kind].items())},
            **({"no_answer": dict(m["failed"][kind])} if kind in m["failed"] else {})}


def warm_up(setup: dict) -> None:
    """Every kind of request once, to every replica, as a visitor and as a signed-in user: the
    server's one-time costs (templates compiled, statements prepared) are not what is measured."""
    import httpx

    rng = random.Random(0)
    logged = next(p for p in setup["people"] if p.get("token"))
    for base in sorted({p["base"] for p in setup["people"]}):
        for who in ({"base": base}, {**logged, "base": base}):
            with httpx.Client(base_url=base, timeout=60) as h:
                for kind, _ in MIX + CACHEABLE:
                    kind = kind.rstrip("*")
                    if kind in ("job", "whoami") and not who.get("token"):
                        continue
                    path = read_request(kind, setup["ctx"], who, rng)
                    headers = {"authorization": f"Bearer {who['token']}"} if who.get("token") else {}
                    if who.get("cookie") and path.startswith("/forests"):
                        headers = {"cookie": who["cookie"]}
                    h.get(path, headers=headers)


def _family(pids: list[int]) -> set[int]:
    """These processes and all their descendants."""
    import psutil

    out = set(pids)
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
    return out


def cpu_split(a: dict, b: dict, generator: float) -> dict:
    """The machine's CPU over the run (percent of one core): the server's processes, the load
    generator's, the backing services', and the rest: other work on the machine, which a
    measurement should show as near 0."""
    out = {"server": Cpu.percent(a, b, "server"), "generator": round(generator, 1),
           "services": Cpu.percent(a, b, "services"), "machine_busy": Cpu.percent(a, b, "machine_busy")}
    out["other"] = round(max(0.0, out["machine_busy"] - out["server"] - out["generator"] - out["services"]), 1)
    return out


def profile(setup: dict, seconds: float, clients: int):
    """py-spy (pip install py-spy) sampling the first API process for the run: collapsed stacks
    (flamegraph.pl, speedscope) in the --profile directory."""
    import subprocess

    import psutil

    pid = setup["api_pids"][0]
    # uvicorn's workers are spawned (spawn_main), next to multiprocessing's resource tracker
    kids = [p for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())]
    pid = kids[0].pid if kids else pid  # with --processes N, uvicorn's first worker
    out = setup["profile"] / f"server-{clients}-clients.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                             "--format", "raw", "--gil", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ----------------------------------------------------------------------------- a coordinator to load


def fill(c, work: Path) -> str:
    """A forest with two merged ELMs, an eval domain and an evaluated version, like the tests'."""
    import torch
    from helpers import CORPUS, TRAIN_DOMAINS, streams, tiny_train_config
    from live import populate

    from btm.data import BlockSampler, Corpus
    from btm.family import Card, new_model, preset_config
    from btm.tokenizer import iter_balanced_texts, load_tokenizer, train_bpe
    from btm.train import train

    torch.set_num_threads(1)
    tok_dir = work / "tokenizer"
    corpus = Corpus(CORPUS)
    train_bpe(iter_balanced_texts({n: corpus[n].documents("train") for n in TRAIN_DOMAINS}, 100_000), 512) \
        .save_pretrained(str(tok_dir))
    tok = load_tokenizer(tok_dir)
    seed = work / "seed"
    train(new_model(preset_config("tiny", tok)), tok, BlockSampler(streams(tok, work / "cache", TRAIN_DOMAINS), 64),
          tiny_train_config(30), seed, Card(name="seed", kind="seed"))
    populate(c, seed, tok, work / "cache", work, forest="load")
    return "load"


def context(base: str, token: str, forest: str) -> dict:
    import httpx

    api = httpx.Client(base_url=base + "/api/v1", headers={"authorization": f"Bearer {token}"}, timeout=60)
    f = api.get(f"/forests/{forest}").json()
    m = api.get(f"/forests/{forest}/versions/{f['current_version']}").json()
    lb = api.get(f"/forests/{forest}/leaderboard").json()
    doms = [x["name"] for x in lb["domains"]]
    return {"forest": forest, "versions": list(range(1, f["current_version"] + 1)),
            "elms": [e["name"] for e in m["elms"]], "domains": doms,
            "contributions": [e["contribution_id"] for e in m["elms"] if e.get("contribution_id")],
            "sorts": ["mean", "mean_eval", *doms[:2]]}


def people(c, base: str, n: int, local: bool, login: bool = True) -> list[dict]:
    """n clients: the even ones logged in (an API token, a web session, a job of their own), the
    odd ones visitors."""
    from sqlalchemy import select

    from coordinator.models import Job, JobStatus, User, utcnow

    out = []
    for i in range(n):
        if i % 2:
            out.append({"base": base})
            continue
        who = {"base": base, "token": c.user(f"user{i}").token}
        if login:
            who["cookie"] = web_login(base, f"user{i}", "password123", address(i) if local else None)
        out.append(who)
    with c.db() as db:  # a finished job of each one's own to poll
        for i, who in enumerate(out):
            if "token" in who:
                u = db.scalar(select(User).where(User.username == f"user{i}"))
                key = f"load:{u.id}"
                j = db.scalar(select(Job).where(Job.kind == "load", Job.key == key))
                if j is None:
                    j = Job(kind="load", key=key, status=JobStatus.succeeded, owner_id=u.id, result={"ok": True},
                            finished_at=utcnow())
                    db.add(j)
                    db.flush()
                who["job"] = j.id
    return out


def web_login(base: str, username: str, password: str, local: str | None) -> str:
    """Log in through the web form (as a browser does); the session cookie."""
    import httpx

    with httpx.Client(base_url=base, timeout=60, transport=httpx.HTTPTransport(local_address=local)) as h:
        page = h.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        r = h.post("/login", data={"username": username, "password": password, "csrf": csrf, "next": "/"})
        assert r.status_code == 303, (r.status_code, r.text[:300])
        return "; ".join(f"{k}={v}" for k, v in h.cookies.items())


def start_backend(args, stack: contextlib.ExitStack, work: Path) -> dict:
    """Coordinator(s) here, filled; the URLs to load and the processes to watch."""
    from live import Coordinator, MotoS3, fresh_pg_database

    env = {"ELMFOREST_EVAL_SCORED_BLOCKS": "8",
           # the limits under test are the defaults, not the tests' (which lift the rate limit); in
           # saturation each client asks far more than 600 a minute: every request is still counted,
           # none refused for it (what is measured is what the server can answer)
           "ELMFOREST_REQUESTS_PER_MINUTE": os.environ.get("ELMFOREST_REQUESTS_PER_MINUTE",
                                                           "1000000" if args.mode == "saturation" else "600")}
    services = []
    if args.backend == "production":
        pg = stack.enter_context(fresh_pg_database())
        moto = MotoS3()
        stack.callback(moto.stop)
        services.append(moto.proc.pid)
        env.update({"ELMFOREST_DATABASE_URL": pg, "ELMFOREST_BROKER_URL": "redis://127.0.0.1:6379/0",
                    "ELMFOREST_QUEUE": f"elmforest-load-{uuid.uuid4().hex[:6]}",
                    # every replica signs and checks sessions and URLs with one key
                    "ELMFOREST_SECRET_KEY": uuid.uuid4().hex * 2, **moto.env("load")})
    replicas = args.replicas if args.backend == "production" else 1
    serve = ("--workers", str(args.processes))
    first = Coordinator(work / "coord", env, worker=args.backend == "embedded", serve_args=serve)
    stack.callback(first.stop)
    coords = [first]
    if args.backend == "production":
        first.spawn(["worker", "--loglevel", "WARNING", "--concurrency", "1"])
    for r in range(1, replicas):
        c = Coordinator(work / f"coord{r}", env, worker=False, serve_args=(*serve, "--no-migrate"))
        stack.callback(c.stop)
        coords.append(c)
    marker = work / "filled"
    if marker.exists():  # --data: a coordinator filled by an earlier run
        forest = marker.read_text()
    else:
        print(f"filling a {args.backend} coordinator ({replicas} replica(s)) ...", file=sys.stderr)
        forest = fill(first, work)
        if args.backend == "embedded":
            marker.write_text(forest)
    return {"coords": coords, "forest": forest, "service_pids": services,
            "server_pids": [p.pid for c in coords for p in c.procs], "api_pids": [c.server.pid for c in coords]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["run", "sweep", "saturation"], default="run")
    ap.add_argument("--url", help="a running coordinator (else one is started here)")
    ap.add_argument("--token", help="with --url: a maintainer's API token (it mints one token per client)")
    ap.add_argument("--forest", default="load", help="with --url: the forest to read")
    ap.add_argument("--backend", choices=["embedded", "production"], default="embedded")
    ap.add_argument("--replicas", type=int, default=1, help="production: `elmforest serve` processes on one "
                    "PostgreSQL, Redis and S3; clients spread over them")
    ap.add_argument("--processes", type=int, default=1, help="API processes of each coordinator (--workers)")
    ap.add_argument("--clients", type=int, default=None, help="run: 200; saturation: 256")
    ap.add_argument("--sweep", default="50,200,500", help="sweep: the numbers of clients, one run each")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--think", default="0.25,0.75", help="seconds a client waits between requests: MIN,MAX")
    ap.add_argument("--uploads", type=int, default=20, help="concurrent uploads during a run (saturation: none)")
    ap.add_argument("--upload-mb", type=int, default=10)
    ap.add_argument("--never-cache", action="store_true", help="clients keep nothing: no If-None-Match")
    ap.add_argument("--client-processes", type=int, default=2, help="processes the reading clients are spread over")
    ap.add_argument("--one-address", action="store_true", help="every client from one address (not 127.0.x.y)")
    ap.add_argument("--profile", type=Path, help="py-spy the server during each run; its stacks go here")
    ap.add_argument("--data", type=Path, help="embedded: keep the filled coordinator here, and reuse it next time")
    args = ap.parse_args()
    counts = ([int(x) for x in args.sweep.split(",")] if args.mode == "sweep"
              else [args.clients or (256 if args.mode == "saturation" else 200)])
    work = args.data if args.data and args.backend == "embedded" else Path(tempfile.mkdtemp(prefix="elmforest-load-"))
    work.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.url:
            import httpx

            base, forest = args.url.rstrip("/"), args.forest
            local = not args.one_address and urlsplit(base).hostname in ("127.0.0.1", "localhost")
            api = httpx.Client(base_url=base + "/api/v1", headers={"authorization": f"Bearer {args.token}"})
            crowd = [{"base": base} if i % 2 else
                     {"base": base, "token": api.post("/tokens", json={"name": f"load-{i}", "expires_days": 1}
                                                      ).json()["token"]} for i in range(max(counts))]
            setup = {"people": crowd, "server_pids": [], "local": local, "ctx": context(base, args.token, forest)}
        else:
            b = start_backend(args, stack, work)
            coords, local = b["coords"], not args.one_address
            print(f"making {max(counts)} clients (half logged in) ...", file=sys.stderr)
            crowd = people(coords[0], coords[0].url, max(counts), local)
            for i, who in enumerate(crowd):  # client i uses replica i mod replicas
                who["base"] = coords[i % len(coords)].url
            admin = coords[0].user("admin", "admin")
            setup = {"people": crowd, "server_pids": b["server_pids"], "service_pids": b["service_pids"],
                     "api_pids": b["api_pids"], "profile": args.profile, "local": local,
                     "ctx": context(coords[0].url, admin.token, b["forest"])}
        warm_up(setup)
        import gc

        gc.collect()
        gc.freeze()  # this process loaded torch to fill the forest: keep its collector quiet
        think = None if args.mode == "saturation" else tuple(float(x) for x in args.think.split(","))
        uploads = 0 if args.mode == "saturation" else args.uploads
        runs = []
        for n in counts:
            print(f"{n} clients for {args.seconds:.0f} s ({args.mode}) ...", file=sys.stderr)
            r = run_load(setup, n, args.seconds, think, min(uploads, n // 2), args.upload_mb, not args.never_cache,
                         args.client_processes)
            r |= {"mode": args.mode, "backend": args.url or args.backend,
                  "replicas": args.replicas if args.backend == "production" and not args.url else 1,
                  "api_processes_per_replica": args.processes}
            print(json.dumps(r), file=sys.stderr)
            runs.append(r)
            if n != counts[-1]:
                time.sleep(5)
        summary = runs[0] if len(runs) == 1 else {"mode": args.mode, "runs": runs}
        print(json.dumps(summary))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
