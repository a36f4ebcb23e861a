"""A 1 GiB upload through the coordinator, on the local backend and through presigned S3
multipart (moto's server on loopback): the API process's peak RSS must grow by less than
100 MiB (the weights are streamed, never held in memory; on S3 they never reach the API).

    python bench/upload_memory.py              # 1 GiB
    python bench/upload_memory.py --mib 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def run(label: str, env: dict, big: Path, work: Path) -> dict:
    from live import Coordinator

    from contributor_client.http import sha256_file

    c = Coordinator(work / label, env, worker=False)
    try:
        client = c.user("bench", "contributor")
        client.me()  # warm the request path before taking the baseline
        pid = c.server.pid
        # the serve process is uvicorn itself (no reloader, one worker)
        base_hwm, base_rss = status_kb(pid, "VmHWM"), status_kb(pid, "VmRSS")
        sha = sha256_file(big)
        t = time.perf_counter()
        art = client.upload(big, "weights", sha256=sha)
        secs = time.perf_counter() - t
        assert art["sha256"] == sha and art["size"] == big.stat().st_size
        peak = status_kb(pid, "VmHWM")
        return {"backend": label, "seconds": round(secs, 2), "mib_per_s": round(big.stat().st_size / 2**20 / secs, 1),
                "api_rss_before_mib": round(base_rss / 1024, 1), "api_peak_growth_mib": round((peak - max(base_hwm, base_rss)) / 1024, 1)}
    finally:
        c.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    args = ap.parse_args()
    from live import MotoS3

    work = Path(tempfile.mkdtemp(prefix="upload-bench-"))
    big = work / "weights.bin"
    with open(big, "wb") as f:
        for _ in range(args.mib // 16):
            f.write(os.urandom(16 << 20))
    limit = {"ELMFOREST_MAX_UPLOAD_BYTES": str(4 << 30)}
    rows = [run("local", limit, big, work)]
    moto = MotoS3()
    try:
        rows.append(run("s3", {**limit, **moto.env("bench")}, big, work))
    finally:
        moto.stop()
    print(f"{args.mib} MiB upload; API process peak RSS growth (goal < 100 MiB)")
    for r in rows:
        print(f"  {r['backend']:<6} {r['seconds']:>7.1f} s  {r['mib_per_s']:>7.1f} MiB/s  "
              f"RSS before {r['api_rss_before_mib']:>6.0f} MiB  peak growth {r['api_peak_growth_mib']:>6.1f} MiB")
    print(json.dumps({r["backend"]: r for r in rows}))


if __name__ == "__main__":
    main()
