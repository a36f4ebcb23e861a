"""Evaluation cost of top-k ensembles (k = 1, 2, 4, 8 of 8 ELMs) against one model.

Times EnsembleLM.perplexity on the same blocks for each k and divides by the time of one
model's pass: the cost must grow with k, not with n (goal <= 1.15 x k). The last line is
JSON with cost_k1, cost_k2, cost_k4, cost_k8 (time per token relative to one model).

    python bench/ensemble_cost.py
    python bench/ensemble_cost.py --preset gpt2-125m --blocks 64 --block 1024   # GPU
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from btm.ensemble import EnsembleLM
    from btm.family import new_model, preset_config
    from btm.posterior import token_logprobs
    from btm.tokenizer import train_bpe

    torch.manual_seed(0)
    tok = train_bpe(["the quick brown fox jumps over the lazy dog " * 200], 2048)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = [new_model(preset_config(args.preset, tok), seed=i).to(device).eval() for i in range(args.n)]
    blocks = torch.randint(0, len(tok), (args.blocks, args.block + 1))
    prior = [1.0 / args.n] * args.n

    def timed(fn):
        fn()  # warm-up
        best = math.inf
        for _ in range(args.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best

    one = timed(lambda: token_logprobs(models[0], blocks, 16, device))
    out = {}
    tokens = args.blocks * args.block
    print(f"{args.n} ELMs of the {args.preset} preset, {tokens} tokens on {device}; one model: {tokens / one:,.0f} tokens/s")
    for k in (1, 2, 4, 8):
        if k > args.n:
            continue
        ens = EnsembleLM(models, prior, top_k=k, device=device)
        t = timed(lambda ens=ens: ens.perplexity(blocks, 16))
        out[f"cost_k{k}"] = round(t / one, 3)
        print(f"top-{k}: {t / one:5.2f} single-model passes ({t / one / k:.2f} per expert; goal <= 1.15)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
