"""Time and peak memory of averaging n ELMs: our streamed average against mergekit's linear merge.

Makes n GPT-2-small-sized ELMs locally (124M parameters, fp32, distinct weights), then runs
each method in a fresh process on the same inputs and reports wall time and peak RSS as
the OS reports it (the process's VmHWM: mapped input pages count; not ru_maxrss, which on
Linux carries over the parent's peak through fork and exec). Goals: peak RSS <= 1.5x one ELM
at any n, time <= 0.25x mergekit's. The last line is JSON.

    python bench/averaging.py                  # n = 8 and 32 (about 16 GB of disk)
    python bench/averaging.py --n 8 --preset small
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {root!r})
    method, out, weights, *srcs = sys.argv[1:]
    weights = [float(w) for w in weights.split(",")]

    def peak_rss():  # this process's own high-water mark, in bytes
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    # libraries are imported before the clock starts: the work is what is timed
    if method == "btm":
        from btm.average import average_models
    elif method == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
    elif method == "in_memory":
        from btm.average import average_in_memory
        from btm.safetensors_io import save_state_dict
    t = time.perf_counter()
    if method == "btm":
        average_models(srcs, weights, out)
    elif method == "mergekit":
        cfg = MergeConfiguration.model_validate({{
            "merge_method": "linear", "dtype": "float32",
            "models": [{{"model": s, "parameters": {{"weight": w}}}} for s, w in zip(srcs, weights)],
        }})
        run_merge(cfg, out, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=True))
    elif method == "in_memory":
        save_state_dict(average_in_memory(srcs, weights), out)
    print(json.dumps({{"seconds": time.perf_counter() - t,
                      "peak_rss_bytes": peak_rss()}}))
    """
)


def make_elms(n: int, preset: str, work: Path) -> list[Path]:
    import torch

    from btm.family import Card, new_model, preset_config, save_elm
    from btm.safetensors_io import ShardedWriter, open_weights, read_tensor
    from btm.tokenizer import train_bpe

    base = work / "elm-0"
    if not (base / "README.md").exists():
        tok = train_bpe(["hello world " * 100], 300)
        tok_vocab = 50257 if preset == "gpt2-125m" else 8192
        cfg = preset_config(preset, tok)
        cfg.vocab_size = tok_vocab
        save_elm(new_model(cfg), tok, base, Card(name="elm-0"))
    paths = [base]
    idx = open_weights(base)
    layout = [(nm, idx.info(nm).dtype, idx.info(nm).shape) for nm in idx.names]
    g = torch.Generator().manual_seed(0)
    for i in range(1, n):
        p = work / f"elm-{i}"
        if not (p / "model.safetensors").exists():
            import shutil

            shutil.copytree(base, p, ignore=shutil.ignore_patterns("model.safetensors"), dirs_exist_ok=True)
            with ShardedWriter(p, layout) as w:
                for nm in idx.names:
                    t = read_tensor(idx.path(nm), idx.info(nm))
                    w.write(nm, t + 0.01 * torch.randn(t.shape, generator=g))
        paths.append(p)
    return paths


def run(method: str, srcs: list[Path], out: Path) -> dict:
    w = ",".join([str(1 / len(srcs))] * len(srcs))
    code = CHILD.format(root=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code, method, str(out), w, *map(str, srcs)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode != 0:
        raise SystemExit(f"{method} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="ELM counts (default: 8 and 32)")
    ap.add_argument("--preset", default="gpt2-125m")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--in-memory", action="store_true", help="also time the all-in-memory average")
    args = ap.parse_args()
    ns = args.n or [8, 32]
    work = args.work_dir or Path(tempfile.gettempdir()) / f"elmforest-avg-bench-{args.preset}"
    work.mkdir(parents=True, exist_ok=True)
    srcs = make_elms(max(ns), args.preset, work)
    one = (srcs[0] / "model.safetensors").stat().st_size
    print(f"{args.preset}: one ELM is {one / 1e6:.0f} MB of fp32 weights")
    result = {}
    for n in ns:
        for s in srcs[:n]:  # warm the page cache so both methods read from memory
            with open(s / "model.safetensors", "rb") as f:
                while f.read(1 << 24):
                    pass
        rows = {}
        methods = ["btm", "mergekit"] + (["in_memory"] if args.in_memory else [])
        for m in methods:
            out = work / f"out-{m}-{n}"
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            rows[m] = run(m, srcs[:n], out)
            print(f"n={n:<3} {m:<10} {rows[m]['seconds']:>8.2f} s   peak RSS {rows[m]['peak_rss_bytes'] / 1e6:>8.0f} MB"
                  f"  ({rows[m]['peak_rss_bytes'] / one:.2f}x one ELM)")
        b, mk = rows["btm"], rows["mergekit"]
        result[f"n{n}"] = {
            "rss_vs_mergekit": round(b["peak_rss_bytes"] / mk["peak_rss_bytes"], 3),
            "time_vs_mergekit": round(b["seconds"] / mk["seconds"], 3),
            "rss_vs_one_elm": round(b["peak_rss_bytes"] / one, 3),
            "btm_seconds": round(b["seconds"], 2), "mergekit_seconds": round(mk["seconds"], 2),
        }
        print(f"n={n:<3} ratios: time {result[f'n{n}']['time_vs_mergekit']:.3f}x mergekit, "
              f"RSS {result[f'n{n}']['rss_vs_mergekit']:.3f}x mergekit, {result[f'n{n}']['rss_vs_one_elm']:.2f}x one ELM")
    print(json.dumps(result))


if __name__ == "__main__":
    started = time.time()
    main()
