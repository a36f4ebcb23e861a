"""Time and peak memory of a branch init for n = 8 and 32 ELMs: the domain posterior of a
sample over the forest (ELMs streamed one at a time) and the streamed posterior-weighted
average, against the sum of n single-model passes over the same sample plus one streamed
average, each measured in a fresh process.

    python bench/branch_init.py
    python bench/branch_init.py --n 8 --preset small --blocks 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {root!r})

    def peak_rss():  # VmHWM: this process's own peak (ru_maxrss would carry the parent's)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    import torch
    from btm.forest import Forest
    from btm.branch import branch, sample_blocks
    mode, forest_dir, sample, out, blocks = sys.argv[1:6]
    torch.manual_seed(0)
    f = Forest.load(forest_dir)
    t = time.perf_counter()
    if mode == "branch":
        branch(f, out, sample, "posterior", "new", 256, int(blocks))
        extra = {{}}
    elif mode == "passes":  # n single-model passes, models already loaded, timed forward only
        from btm.family import load_model
        from btm.posterior import token_logprobs
        b = sample_blocks(f, sample, 256, int(blocks))
        total = 0.0
        for e in f.elms:
            m = load_model(e.path)
            t0 = time.perf_counter()
            token_logprobs(m, b)
            total += time.perf_counter() - t0
        extra = {{"passes_seconds": total}}
    elif mode == "average":
        from btm.average import average_models
        average_models([e.path for e in f.elms], [1 / len(f)] * len(f), out)
        extra = {{}}
    print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss_bytes": peak_rss(), **extra}}))
    """
)


def make_forest(n: int, preset: str, work: Path) -> Path:
    import torch

    from btm.data import read_documents
    from btm.family import Card, new_model, preset_config, save_elm
    from btm.forest import Forest
    from btm.tokenizer import train_bpe

    root = work / f"forest-{n}"
    if (root / "forest.json").exists():
        return root
    docs = list(read_documents(ROOT / "btm" / "demo_corpus" / "python" / "train.jsonl"))
    tok = train_bpe(docs, 8192)
    seed = save_elm(new_model(preset_config(preset, tok)), tok, work / "seed", Card(name="seed", kind="seed"))
    f = Forest.init(root, seed)
    for i in range(n):
        m = new_model(preset_config(preset, tok), seed=i + 1)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1 + 0.01 * i)
        f.add(save_elm(m, tok, work / f"elm{i}", Card(name=f"elm{i}", domain=f"d{i}")))
    return root


def child(mode: str, forest: Path, out: Path, blocks: int) -> dict:
    sample = ROOT / "btm" / "demo_corpus" / "python" / "valid.jsonl"
    r = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), mode, str(forest), str(sample), str(out),
                        str(blocks)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--blocks", type=int, default=100, help="sample blocks of 256 tokens (paper: 100)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="branch-bench-"))
    out = {}
    for n in args.n or [8, 32]:
        forest = make_forest(n, args.preset, work)
        one = (forest / "seed" / "model.safetensors").stat().st_size
        b = child("branch", forest, work / f"init-{n}", args.blocks)
        p = child("passes", forest, work / "unused", args.blocks)
        a = child("average", forest, work / f"avg-{n}", args.blocks)
        floor = p["passes_seconds"] + a["seconds"]
        out[f"n{n}"] = {"branch_seconds": round(b["seconds"], 2), "passes_plus_average_seconds": round(floor, 2),
                        "ratio": round(b["seconds"] / floor, 3), "peak_rss_mb": round(b["peak_rss_bytes"] / 1e6),
                        "peak_rss_vs_one_elm": round(b["peak_rss_bytes"] / one, 2)}
        r = out[f"n{n}"]
        print(f"n={n:<3} branch init {r['branch_seconds']:>7.2f} s   n passes + 1 average {r['passes_plus_average_seconds']:>7.2f} s"
              f"   ratio {r['ratio']:.2f}   peak RSS {r['peak_rss_mb']} MB ({r['peak_rss_vs_one_elm']}x one ELM of {one / 1e6:.0f} MB)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
