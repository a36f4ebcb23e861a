"""The seed-training job of the central cluster (deploy/seed_job.sh): torchrun with 2 CPU
processes (gloo), killed mid-training and started again, resumes from its checkpoint and
registers the seed with the coordinator exactly once."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import CORPUS, ROOT
from live import free_port

JOB = ROOT / "deploy" / "seed_job.sh"


def job(coord, token, out: Path, tokenizer_dir, cache_dir, tmp: Path, **env) -> subprocess.Popen:
    e = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
         "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()), "CHECKPOINT_EVERY": "5",
         "ELMFOREST_URL": coord.url, "ELMFOREST_TOKEN": token, "XDG_CONFIG_HOME": str(tmp / "config"), **env}
    args = ["bash", str(JOB), "cluster", str(CORPUS), str(out), "--preset", "tiny", "--steps", "120", "--batch-size", "4",
            "--block-size", "32", "--lr", "3e-3", "--tokenizer", str(tokenizer_dir), "--cache-dir", str(cache_dir)]
    return subprocess.Popen(args, env=e, stdout=open(tmp / "job.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def descendants(pid: int) -> list[int]:
    """All processes below pid (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def test_killed_seed_job_resumes_and_registers_once(coordinator, tokenizer_dir, cache_dir, tmp_path):
    admin = coordinator.user("root", "admin")
    out = tmp_path / "seed"
    p = job(coordinator, admin.token, out, tokenizer_dir, cache_dir, tmp_path)
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 10:
            break
        time.sleep(0.05)
    assert p.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
    for pid in [p.pid, *descendants(p.pid)]:  # preempted: every process of the job dies at once
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    p.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert killed_at < 120
    assert admin.http.get("/forests/cluster").status_code == 404  # nothing registered yet

    p = job(coordinator, admin.token, out, tokenizer_dir, cache_dir, tmp_path)
    assert p.wait(600) == 0, (tmp_path / "job.log").read_text()[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the second run logs its first update (killed_at + 1) first: it started right after the
    # checkpoint, not from scratch, and went on to the end
    restart = len(steps) - 1 - steps[::-1].index(killed_at + 1)
    first, second = steps[:restart], steps[restart:]
    assert first[0] == 1 and steps.count(1) == 1
    assert all(s <= killed_at + 5 for s in first)  # it died by its next checkpoint (every 5)
    assert second == sorted(set(second)) and second[-1] == 120
    f = admin.forest("cluster")
    assert f["current_version"] == 1

    p = job(coordinator, admin.token, out, tokenizer_dir, cache_dir, tmp_path)  # the whole job once more
    assert p.wait(600) == 0
    assert "already has this seed" in (tmp_path / "job.log").read_text()
    assert [x["name"] for x in admin.forests()].count("cluster") == 1
    assert len(admin.get("/forests/cluster/versions")) == 1
