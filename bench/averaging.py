"""Time and peak memory of averaging n ELMs: our streamed average against mergekit's linear merge.

Makes n GPT-2-small-sized ELMs locally (124M parameters, fp32, distinct weights), then runs
each method in a fresh process on the same inputs and reports wall time and peak RSS as
the OS reports it (the process's VmHWM: mapped input pages count; not ru_maxrss, which on
Linux carries over the parent's peak through fork and exec). Goals: peak RSS <= 1.5x one ELM
at any n, time <= 0.25x mergekit's. The last line is JSON.

With --family llama-1b: n checkpoints of a 1.1B-parameter Llama (the TinyLlama-1.1B shape) in
bf16, about 2.2 GB each, written tensor by tensor with random weights (no model is built), and
our average against the time to read every input once (safetensors safe_open, every tensor of
every input, in a fresh process). Both start from a cold page cache when run as root (caches
dropped before each run), else warm (said in the output). Goals: time <= 1.5x read-once, peak
RSS <= 1.5x one checkpoint. The inputs live in a temporary directory, deleted afterwards
(--work-dir keeps them).

    python bench/averaging.py                  # n = 8 and 32 (about 16 GB of disk)
    python bench/averaging.py --n 8 --preset small
    python bench/averaging.py --family llama-1b --dtype bf16 --n 8   # about 20 GB of disk
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    elif method == "read_once":
        import torch
        from safetensors import safe_open
        from btm.safetensors_io import weights_files
    elif method == "read_raw":
        import os
        from btm.safetensors_io import weights_files
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
    elif method == "read_once":  # every tensor of every input, read once and touched
        check = 0.0
        for s in srcs:
            for path in weights_files(s):
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        x = f.get_tensor(name).reshape(-1)
                        check += float(x[::256].float().sum()) if x.is_floating_point() else 0.0
    elif method == "read_raw":  # every byte of every input file, in order, into one reused buffer
        view = memoryview(bytearray(16 << 20))
        for s in srcs:
            for path in weights_files(s):
                fd, off = os.open(path, os.O_RDONLY), 0
                while k := os.preadv(fd, [view], off):
                    off += k
                os.close(fd)
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


# a benchmark shape, not a preset: TinyLlama-1.1B (1.1B parameters, 2.2 GB in bf16)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False)
DTYPE_OF = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}


def family_config(family: str, preset: str, tok):
    from transformers import AutoConfig

    from btm.family import preset_config
    from btm.tokenizer import bos_id

    if family == "llama-1b":
        b = bos_id(tok)
        return AutoConfig.for_model("llama", bos_token_id=b, eos_token_id=b, pad_token_id=b, **LLAMA_1B)
    return preset_config(preset, tok)


def make_checkpoints(n: int, config, dtype: str, tok, work: Path) -> list[Path]:
    """n model directories of `config` with distinct random weights in `dtype`, written tensor by
    tensor (names and shapes from a model on the meta device: no weights are ever allocated for
    a whole model), as transformers would save them: config.json, one model.safetensors, the
    tokenizer, and a card."""
    import torch
    from transformers import AutoModelForCausalLM

    from btm.family import Card, family_id, write_card
    from btm.safetensors_io import DTYPES, ShardedWriter

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen: set[int] = set()  # tied weights are one Parameter: saved once, under its first name (as HF does)
    shapes = [(nm, tuple(t.shape)) for nm, t in model.state_dict(keep_vars=True).items()
              if not (id(t) in seen or seen.add(id(t)))]
    cfg = config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
    del model
    paths = []
    for i in range(n):
        p = work / f"elm-{i}"
        paths.append(p)
        if (p / "README.md").exists():
            continue
        p.mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        tok.save_pretrained(str(p))
        card = Card(name=f"elm-{i}", family=family_id(config, tok))
        g = torch.Generator().manual_seed(i)
        with ShardedWriter(p, [(nm, dtype, sh) for nm, sh in shapes], {"elmforest": card.to_json()}) as w:
            for nm, sh in shapes:
                w.write(nm, torch.empty(sh, dtype=DTYPES[dtype]).normal_(0.0, 0.02, generator=g))
        write_card(p, card)
    return paths


def drop_page_cache() -> bool:
    """Empty the page cache (root only), so the next run reads its inputs from disk."""
    if os.geteuid() != 0:
        return False
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def machine() -> str:
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    return f"{os.cpu_count()} CPUs, {mem / 2**20:.1f} GiB RAM"


def run(method: str, srcs: list[Path], out: Path) -> dict:
    w = ",".join([str(1 / len(srcs))] * len(srcs))
    code = CHILD.format(root=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code, method, str(out), w, *map(str, srcs)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode != 0:
        raise SystemExit(f"{method} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main_read_once(args) -> None:
    """n checkpoints of a family in a dtype: our average against reading every input once."""
    import shutil

    from btm.tokenizer import train_bpe

    dtype = DTYPE_OF[args.dtype or "bf16"]
    n = max(args.n or [8])
    name = args.family if args.family != "preset" else args.preset
    tmp = None
    if args.work_dir:
        work = args.work_dir
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix=f"elmforest-avg-bench-{name}-")
        work = Path(tmp.name)
    try:
        tok = train_bpe(["hello world " * 100], 300)
        config = family_config(args.family, args.preset, tok)
        t = time.perf_counter()
        srcs = make_checkpoints(n, config, dtype, tok, work)
        made = time.perf_counter() - t
        one = sum(f.stat().st_size for f in srcs[0].glob("*.safetensors"))
        cold = args.cache == "cold" and drop_page_cache()
        cache = "cold (page cache dropped before each run)" if cold else "warm (page cache not dropped)"
        print(f"{name} {args.dtype or 'bf16'}: one checkpoint is {one / 1e9:.2f} GB; {n} written in {made:.0f} s; "
              f"{machine()}; {cache}")
        rows: dict[str, list[dict]] = {"read_once": [], "read_raw": [], "btm": []}
        for _ in range(args.repeats):
            for m in rows:
                out = work / f"out-{m}"
                shutil.rmtree(out, ignore_errors=True)
                if cold:
                    drop_page_cache()
                r = run(m, srcs, out)
                rows[m].append(r)
                print(f"n={n:<3} {m:<10} {r['seconds']:>8.2f} s   peak RSS {r['peak_rss_bytes'] / 1e6:>8.0f} MB"
                      f"  ({r['peak_rss_bytes'] / one:.2f}x one checkpoint)   {n * one / r['seconds'] / 1e9:.2f} GB/s")
                shutil.rmtree(out, ignore_errors=True)

        def med(m, key):
            return statistics.median(r[key] for r in rows[m])

        ro, raw, bt = med("read_once", "seconds"), med("read_raw", "seconds"), med("btm", "seconds")
        rss = max(r["peak_rss_bytes"] for r in rows["btm"])
        res = {
            "machine": machine(), "cache": "cold" if cold else "warm", "one_checkpoint_bytes": one,
            "read_once_seconds": round(ro, 2), "read_raw_seconds": round(raw, 2), "btm_seconds": round(bt, 2),
            "btm_peak_rss_bytes": rss, "time_vs_read_once": round(bt / ro, 3), "time_vs_read_raw": round(bt / raw, 3),
            "rss_vs_one_checkpoint": round(rss / one, 3), "load_avg_1m": round(os.getloadavg()[0], 2),
        }
        res["goals_met"] = res["time_vs_read_once"] <= 1.5 and res["rss_vs_one_checkpoint"] <= 1.5
        print(f"n={n:<3} ratios: time {res['time_vs_read_once']:.3f}x read-once (goal <= 1.5; "
              f"{res['time_vs_read_raw']:.3f}x a raw read of the files), "
              f"peak RSS {res['rss_vs_one_checkpoint']:.3f}x one checkpoint (goal <= 1.5)")
        print(json.dumps({f"{name}-{args.dtype or 'bf16'}-n{n}": res}))
    finally:
        if tmp is not None:
            tmp.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="ELM counts (default: 8 and 32; with --family: 8)")
    ap.add_argument("--preset", default="gpt2-125m")
    ap.add_argument("--family", choices=["preset", "llama-1b"], default="preset",
                    help="llama-1b: 1.1B-parameter Llama checkpoints, timed against reading them once")
    ap.add_argument("--dtype", choices=sorted(DTYPE_OF), default=None,
                    help="weights' dtype (default fp32; bf16 with --family llama-1b); not fp32: the read-once mode")
    ap.add_argument("--cache", choices=["cold", "warm"], default="cold",
                    help="read-once mode: drop the page cache before each run (root only; else warm)")
    ap.add_argument("--repeats", type=int, default=1, help="read-once mode: runs of each method (median)")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--in-memory", action="store_true", help="also time the all-in-memory average")
    args = ap.parse_args()
    if args.family != "preset" or args.dtype not in (None, "fp32"):
        return main_read_once(args)
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
