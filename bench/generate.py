"""Decoding speed of a forest's top-k ensemble (transformers' generate()) against one expert's own.

Builds a forest of n ELMs locally (random weights of one preset, saved and added as `forest add`
does), loads its top-k ensemble as `elmforest generate` does (ForestForCausalLM, one KV cache per
expert) and decodes greedily, N new tokens per prompt (min_new_tokens = N: no early end), at
batch 1 and 8. The baseline is the first expert's own generate() on the same prompts. Each
model is timed on the whole call and on the prompt with one new token (the prefill): decoding
speed is the difference per new token. Warm-up first, then the median of several timed calls,
interleaved (single, top-1, top-2, ... in every round), at a fixed number of threads (default 1).

    ratio = time per new token of the top-k ensemble / (k x time per new token of one expert)

Goal: ratio <= 1.15 for every k, per new token and for the whole call (the ensemble costs k
forward passes and little else). The prefill's ratio is printed too: the ensemble needs every
expert's log-likelihood of the prompt (its weights), so each expert computes its head at every
prompt position where one model alone needs only the last one (--prompt-len 192 shows that
cost); the normaliser and the mixture run one expert at a time, the mixture at the last
position only. The last line is JSON.

    python bench/generate.py                                   # small preset, vocab 8192, n = 8, k = 1 2 4
    python bench/generate.py --preset gpt2-125m --vocab 50257 --batch 1 --batch 8
    python bench/generate.py --preset tiny --vocab 32000 --new-tokens 128 --threads 2
    python bench/generate.py --prompt-len 192 --vocab 50257    # a longer prompt: the prefill's cost
    python bench/generate.py --forest path/to/forest --k 2      # an existing forest (uniform prior)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL = 1.15


def make_forest(root: Path, preset: str, vocab: int | None, n: int) -> Path:
    """A forest of n ELMs with distinct random weights (and a seed), as the CLI would hold it."""
    from btm.family import Card, new_model, preset_config, save_elm
    from btm.forest import Forest
    from btm.tokenizer import train_bpe

    tok = train_bpe(["the quick brown fox jumps over the lazy dog " * 200], 512)
    cfg = preset_config(preset, tok)
    if vocab:
        cfg.vocab_size = vocab  # a realistic head (the toy tokenizer's ids are all below it)
    save_elm(new_model(cfg, seed=0), tok, root / "seed", Card(name="seed", kind="seed"))
    forest = Forest.init(root / "forest", root / "seed", "bench-forest")
    for i in range(n):
        d = save_elm(new_model(cfg, seed=i + 1), tok, root / f"elm-{i}", Card(name=f"elm-{i}"))
        forest.add(d)
    return root / "forest"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary (head) size; 0: the toy tokenizer's")
    ap.add_argument("--n", type=int, default=8, help="ELMs in the forest")
    ap.add_argument("--k", type=int, action="append", help="experts run (default: 1, 2 and 4)")
    ap.add_argument("--batch", type=int, action="append", help="prompts per batch (default: 1 and 8)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: timings that hold on a shared machine; 2 threads on 2 busy cores wait on each other)")
    ap.add_argument("--device", default=None, help="default: cuda if there is one, else cpu")
    ap.add_argument("--forest", type=Path, default=None, help="time this forest instead of building one")
    ap.add_argument("--profile", type=Path, default=None,
                    help="write a cProfile of one top-max(k) call at the largest batch here")
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decoding is timed as whole call minus prefill)")
    return args


def open_forest(args: argparse.Namespace, ks: list[int]):
    """The forest to time (--forest, or one built in a temporary directory) and that directory (or None)."""
    from btm.forest import Forest

    tmp = None
    if args.forest is None:
        tmp = tempfile.TemporaryDirectory(prefix="elmforest-gen-bench-")
        forest_dir = make_forest(Path(tmp.name), args.preset, args.vocab, max(args.n, max(ks)))
    else:
        forest_dir = args.forest
    forest = Forest.load(forest_dir)
    if len(forest) < max(ks):
        raise SystemExit(f"{forest_dir}: {len(forest)} ELMs, fewer than k = {max(ks)}")
    return forest, forest_dir, tmp


@dataclass
class Timer:
    """Greedy decoding of N new tokens and its timing, on one device."""

    device: str
    pad: int
    new_tokens: int
    repeats: int

    def decode(self, model, ids, new=None):
        import torch

        new = self.new_tokens if new is None else new
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=self.pad,
                                  max_new_tokens=new, min_new_tokens=new)

    def sync(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def clock(self, fn):
        self.sync()
        t, c = time.perf_counter(), time.process_time()
        fn()
        self.sync()
        return time.perf_counter() - t, time.process_time() - c

    def timed(self, named, ids):
        """Each model's medians, in seconds, of a whole call (prompt + N new tokens) and of the
        prompt with one new token (the prefill), wall clock and this process's CPU time (which
        waiting for a core does not inflate), timed in interleaved rounds (so load from elsewhere
        on the machine falls on every model alike); and each model's output."""
        outs = {name: self.decode(m, ids) for name, m in named.items()}  # warm-up
        for m in named.values():
            self.decode(m, ids, 1)
        runs: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in named}
        for _ in range(self.repeats):
            for name, m in named.items():
                runs[name].append(self.clock(lambda m=m: self.decode(m, ids)) + self.clock(lambda m=m: self.decode(m, ids, 1)))
        med = {name: [statistics.median(r[i] for r in rs) for i in range(4)] for name, rs in runs.items()}
        return {name: {"whole": w, "prefill": p, "decode": (w - p) / (self.new_tokens - 1),
                       "decode_cpu": (wc - pc) / (self.new_tokens - 1)}
                for name, (w, wc, p, pc) in med.items()}, outs


def print_header(forest_dir: Path, forest, single, args: argparse.Namespace) -> None:
    import torch

    cfg = single.config
    vocab = cfg.get_text_config().vocab_size
    n_params = sum(p.numel() for p in single.parameters())
    print(f"{forest_dir.name}: {len(forest)} ELMs of {cfg.model_type} ({n_params / 1e6:.1f}M parameters, vocab {vocab}), "
          f"{torch.get_num_threads()} threads, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
          f"median of {args.repeats}")


def print_table_head() -> None:
    print("decoding: ms per step and tokens/s after the prompt; ratio = top-k / (k x single), its goal <= "
          f"{GOAL} (and the whole call's); cpu: the same in CPU time; prefill: the prompt and the first token; whole: the call")
    print(f"{'batch':>5} {'model':>9} {'ms/step':>9} {'tokens/s':>10} {'ratio':>7} {'cpu':>7} "
          f"{'prefill ms':>11} {'ratio':>7} {'whole':>7}")


def k_row(b: int, k: int, e: dict, one: dict) -> tuple[dict, bool]:
    """Print the top-k ensemble's row at batch b; its JSON figures and whether it met the goal."""
    r = {x: e[x] / (k * one[x]) for x in ("decode", "decode_cpu", "prefill", "whole")}
    print(f"{b:>5} {f'top-{k}':>9} {e['decode'] * 1e3:>9.2f} {b / e['decode']:>10.1f} {r['decode']:>7.3f} "
          f"{r['decode_cpu']:>7.3f} {e['prefill'] * 1e3:>11.1f} {r['prefill']:>7.3f} {r['whole']:>7.3f}  "
          f"{'ok' if max(r['decode'], r['whole']) <= GOAL else 'MISSED'}")
    fig = {"tokens_per_s": round(b / e["decode"], 1), "ratio": round(r["decode"], 3),
           "cpu_ratio": round(r["decode_cpu"], 3), "prefill_ratio": round(r["prefill"], 3),
           "whole_ratio": round(r["whole"], 3)}
    return fig, r["decode"] <= GOAL and r["whole"] <= GOAL


def bench_batch(timer: Timer, b: int, single, models: dict, ks: list[int], vocab: int,
                prompt_len: int) -> tuple[dict, bool]:
    """Time the single expert and every top-k ensemble at batch b, printing a row each."""
    import torch

    g = torch.Generator().manual_seed(b)
    ids = torch.randint(1, min(vocab, 512), (b, prompt_len), generator=g).to(timer.device)
    t, outs = timer.timed({"single": single, **{f"top-{k}": models[k] for k in ks}}, ids)
    one = t["single"]
    row = {"single_tokens_per_s": round(b / one["decode"], 1), "single_prefill_s": round(one["prefill"], 4)}
    print(f"{b:>5} {'single':>9} {one['decode'] * 1e3:>9.2f} {b / one['decode']:>10.1f} {'':>7} {'':>7} "
          f"{one['prefill'] * 1e3:>11.1f}")
    ok = True
    for k in ks:
        row[f"k{k}"], met = k_row(b, k, t[f"top-{k}"], one)
        ok &= met
        if k == 1:
            row["k1"]["same_tokens_as_single"] = bool(torch.equal(outs["top-1"], outs["single"]))
    return row, ok


def note_load(result: dict, load0: float, device: str) -> None:
    """Record the load average and warn when other work shared the cores."""
    import torch

    load = max(load0, os.getloadavg()[0])
    result["load_avg_1m"] = round(load, 2)
    if device == "cpu" and load > torch.get_num_threads() + 0.5:
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs: other work shared the cores; "
              "the timings are noisy")


def profile_call(timer: Timer, model, vocab: int, batch: int, prompt_len: int, path: Path) -> None:
    import cProfile
    import pstats

    import torch

    ids = torch.randint(1, min(vocab, 512), (batch, prompt_len)).to(timer.device)
    prof = cProfile.Profile()
    prof.runcall(timer.decode, model, ids)
    prof.dump_stats(str(path))
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def main() -> None:
    args = parse_args()
    ks, batches = sorted(args.k or [1, 2, 4]), sorted(args.batch or [1, 8])

    import torch

    from btm.forest_model import ForestForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    forest, forest_dir, tmp = open_forest(args, ks)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # the cost of decoding with k experts: the prior router (uniform prior: the first k ELMs); what
    # routing by the text adds to it is measured by bench/routing.py
    models = {k: ForestForCausalLM.from_forest(forest, top_k=k, device=device, router="prior") for k in ks}
    single = models[ks[-1]].experts[0]  # the expert itself (its weights are every ensemble's first)
    vocab = single.config.get_text_config().vocab_size
    timer = Timer(device, single.generation_config.pad_token_id or 0, args.new_tokens, args.repeats)
    print_header(forest_dir, forest, single, args)

    result: dict = {"preset": args.preset if args.forest is None else str(forest_dir), "vocab": vocab,
                    "n": len(forest), "prompt": args.prompt_len, "new_tokens": args.new_tokens,
                    "threads": torch.get_num_threads(), "device": device}
    ok = True
    load0 = os.getloadavg()[0]
    print_table_head()
    for b in batches:
        result[f"b{b}"], met = bench_batch(timer, b, single, models, ks, vocab, args.prompt_len)
        ok &= met
    note_load(result, load0, device)
    result["goal_met"] = ok

    if args.profile:
        profile_call(timer, models[ks[-1]], vocab, batches[-1], args.prompt_len, args.profile)
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
