"""A forest as one mixture-of-experts model: what the MoE export is worth, before and after
router tuning, against the other ways of using the forest.

On the models of `bench/repro.py --preset ci` (Llama architecture: 8 ELMs, the dense baseline,
the seed; trained here first if missing) this builds a forest, exports it as a Mixtral
checkpoint (`elmforest forest export --moe`: experts = the ELMs' MLPs, everything else the
uniform average, router rows from each domain's mean MLP input), tunes its router on a
balanced mix of the domains' train splits with at most 2% of the forest's training tokens
(`elmforest tune-router`, and with `--all` the whole model as BTX does, on the same budget),
and reports on the test splits of all 12 domains:

  perplexity      MoE untuned, router-tuned, all-tuned; the ensemble top-2 routed by the
                  text (each position's experts from the text before it, prompt router) and
                  all n; the uniform and the posterior average (each domain its own, from its
                  valid split); the dense model and the seed
  routing         per layer: top-1 accuracy (train-domain tokens sent first to their own
                  domain's expert) and expert load (share of the top-k slots per expert)
  speed           generate() tokens/s, one 32-token prompt per domain at a time, greedy: the
                  MoE against the ensemble top-2 (centroid router, the default) and all n
  size            parameters in total and active per token

    python bench/moe_export.py
    python bench/moe_export.py --work-dir runs/repro-ci-s90-v4096-n640 --blocks 32 --no-timing
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_WORK = ROOT / "runs" / "repro-ci-s90-v4096-n640"
TUNE_SHARE = 0.02  # the router's budget: this share of the forest's training tokens


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="a bench/repro.py work dir (trained if missing)")
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    ap.add_argument("--blocks", type=int, default=32, help="test blocks per domain")
    ap.add_argument("--experts-per-token", type=int, default=2)
    ap.add_argument("--tune-batch", type=int, default=8)
    ap.add_argument("--tune-lr", type=float, default=1e-2, help="router tuning's learning rate")
    ap.add_argument("--tune-all-lr", type=float, default=1e-3, help="whole-model tuning's learning rate")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-timing", action="store_true", help="skip timing generate()")
    return ap.parse_args()


def ensure_models(work: Path) -> None:
    if not (work / "seed").exists() or not (work / "elms").exists():
        log(f"{work}: no repro models yet; training them (bench/repro.py --no-random)")
        subprocess.run([sys.executable, str(ROOT / "bench" / "repro.py"), "--no-random", "--work-dir", str(work)],
                       check=True)


def forest_tokens(work: Path) -> int:
    """Every token the forest's models trained on: the seed's and every ELM's (their cards)."""
    from btm.family import read_card

    total = 0
    for d in [work / "seed", *sorted((work / "elms").iterdir())]:
        total += int(read_card(d).training.get("tokens") or 0)
    return total


def build_forest(work: Path, corpus, out: Path):
    """The repro ELMs as a forest, each with its routing vector from its domain's valid split."""
    from btm.forest import Forest
    from btm.recipes import add_elm

    if (out / "forest.json").exists():
        return Forest.load(out)
    f = Forest.init(out, work / "seed", name="repro")
    for d in corpus.names("train"):
        add_elm(f, work / "elms" / d, name=d, domain=d, sample=corpus[d].split_path("valid"))
    return Forest.load(out)


def test_blocks(corpus, domains, tok, cache: Path, block: int, count: int) -> dict:
    from btm.data import eval_blocks, tokenize_file

    return {d: eval_blocks(tokenize_file(corpus[d].split_path("test"), tok, cache), block, count) for d in domains}


def ppl(lp) -> float:
    return math.exp(-float(lp.double().mean()))


def build_models(args, run_dir: Path, forest, corpus, tok_dir: Path) -> dict[str, Path]:
    """The MoE (untuned, router-tuned, all-tuned) and the uniform average; cached in run_dir."""
    from btm.average import average_models
    from btm.family import Card
    from btm.moe import export_moe, tune_router
    from btm.train_config import TrainConfig

    work = args.work_dir
    paths = {"moe": run_dir / "moe", "moe_router": run_dir / "moe-router", "moe_all": run_dir / "moe-all",
             "uniform_avg": run_dir / "uniform"}
    if not paths["uniform_avg"].exists():
        average_models([e.path for e in forest.elms], [1 / len(forest)] * len(forest), paths["uniform_avg"],
                       Card(name="uniform", kind="average"), names=forest.names())
    if not paths["moe"].exists():
        t = time.perf_counter()
        export_moe(forest, paths["moe"], experts_per_token=args.experts_per_token, corpus=args.corpus)
        log(f"MoE export written in {time.perf_counter() - t:.1f}s")
    budget = int(TUNE_SHARE * forest_tokens(work))
    block = 128
    steps = max(1, budget // (args.tune_batch * block))
    args.tune_tokens, args.tune_steps, args.budget = steps * args.tune_batch * block, steps, budget
    samples = {d: corpus[d].split_path("train") for d in forest.names()}
    for key, whole, lr in (("moe_router", False, args.tune_lr), ("moe_all", True, args.tune_all_lr)):
        if not (paths[key] / "config.json").exists():
            t = time.perf_counter()
            cfg = TrainConfig(steps=steps, batch_size=args.tune_batch, block_size=block, lr=lr, warmup=0.1,
                              progress=False, log_every=max(1, steps // 4))
            tune_router(paths["moe"], paths[key], cfg, samples=samples, whole=whole, cache_dir=work / "tokens")
            log(f"{key}: {steps} steps x {args.tune_batch} x {block} tokens in {time.perf_counter() - t:.0f}s")
    return paths


def posterior_averages(forest, corpus, domains, run_dir: Path) -> dict[str, Path]:
    from btm.average import average_models
    from btm.family import Card
    from btm.recipes import domain_prior_of

    out = {}
    for d in domains:
        p = run_dir / "posterior" / d
        if not (p / "config.json").exists():
            w = domain_prior_of(forest, corpus[d].split_path("valid"), block_size=128)
            average_models([e.path for e in forest.elms], list(w), p, Card(name=f"posterior-{d}", kind="average"),
                           names=forest.names())
        out[d] = p
    return out


def score_all(args, forest, blocks: dict, paths: dict[str, Path], post: dict[str, Path]) -> dict:
    """Per-domain perplexity of every system."""
    import torch

    from btm.family import load_model
    from btm.posterior import token_logprobs
    from btm.routing import routed_mix, uniform_log_prior

    work, doms = args.work_dir, list(blocks)
    per = {d: {} for d in doms}
    n = len(forest)
    elm_lp = {d: torch.stack([token_logprobs(load_model(e.path), blocks[d], 32) for e in forest.elms]) for d in doms}
    for d in doms:
        per[d]["ensemble_top2"] = ppl(routed_mix(elm_lp[d], uniform_log_prior(n), k=2))
        per[d]["ensemble_all"] = ppl(routed_mix(elm_lp[d], uniform_log_prior(n)))
    singles = {"dense": work / "dense", "seed": work / "seed", **paths}
    for name, p in singles.items():
        model = load_model(p)
        for d in doms:
            per[d][name] = ppl(token_logprobs(model, blocks[d], 32))
    for d in doms:
        per[d]["posterior_avg"] = ppl(token_logprobs(load_model(post[d]), blocks[d], 32))
    return per


def routing_stats(moe_dir: Path, forest, blocks: dict, k: int) -> dict:
    """Per layer: top-1 accuracy on the train domains and each expert's share of the top-k slots."""
    import torch

    from btm.family import load_model

    model = load_model(moe_dir)
    names = forest.names()
    hits, total, load = None, 0, None
    with torch.no_grad():
        for d in names:
            for b in range(0, len(blocks[d]), 16):
                out = model(input_ids=blocks[d][b:b + 16], output_router_logits=True, use_cache=False)
                logits = torch.stack([r.reshape(-1, len(names)) for r in out.router_logits])  # (L, tokens, n)
                top = logits.topk(k, dim=-1).indices
                hit = (top[..., 0] == names.index(d)).sum(-1)
                cnt = torch.stack([(top == j).sum((1, 2)) for j in range(len(names))], -1)  # (L, n)
                hits = hit if hits is None else hits + hit
                load = cnt if load is None else load + cnt
                total += logits.shape[1]
    share = load.double() / load.sum(-1, keepdim=True)
    return {"top1_accuracy": [round(float(h) / total, 4) for h in hits],
            "load": [[round(float(x), 4) for x in row] for row in share],
            "load_max": [round(float(row.max()), 4) for row in share],
            "load_min": [round(float(row.min()), 4) for row in share]}


def param_counts(forest, moe_dir: Path, k: int) -> dict:
    from btm.family import load_model
    from btm.moe import MLP_TENSOR

    elm = load_model(forest.elms[0].path)
    n_elm = sum(p.numel() for p in elm.parameters())
    mlp = sum(p.numel() for name, p in elm.named_parameters() if MLP_TENSOR.match(name))
    moe = sum(p.numel() for p in load_model(moe_dir).parameters())
    n = len(forest)
    return {"elm": n_elm, "moe_total": moe, "moe_active": moe - (n - k) * mlp,
            "ensemble_top2_active": 2 * n_elm, "ensemble_all_active": n * n_elm}


def timed_generate(args, forest, corpus, tok, moe_dir: Path, repeats: int = 3) -> dict:
    """tokens/s of generate(), one prompt per domain at a time, greedy, exactly new_tokens each."""
    import numpy as np
    import torch

    from btm.data import eval_blocks, tokenize_file
    from btm.family import load_model
    from btm.forest_model import ForestForCausalLM
    from btm.routing import forest_vectors

    doms = corpus.names("train") + corpus.names("eval")
    prompts = []
    for d in doms:
        w = eval_blocks(tokenize_file(corpus[d].split_path("test"), tok, args.work_dir / "tokens"), 31, None)
        prompts.append(w[np.linspace(0, len(w) - 1, 1).astype(int)][0][None])
    paths = [e.path for e in forest.elms]
    systems = {
        "moe": load_model(moe_dir),
        "ensemble_top2": ForestForCausalLM.from_experts(paths, top_k=2, router="centroid",
                                                        routing_vectors=forest_vectors(forest.manifest),
                                                        seed=forest.seed_dir),
        "ensemble_all": ForestForCausalLM.from_experts(paths, router="prior"),
        "one_elm": load_model(paths[0]),
    }
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    times = {s: [] for s in systems}
    with torch.no_grad():
        for _ in range(repeats):  # interleaved: drift on a shared machine hits every system alike
            for s, m in systems.items():
                t = time.perf_counter()
                for p in prompts:
                    m.generate(p, attention_mask=torch.ones_like(p), **kw)
                times[s].append(time.perf_counter() - t)
    tokens = len(prompts) * args.new_tokens
    return {s: round(tokens / min(v), 1) for s, v in times.items()}


def mean(per: dict, system: str, domains: list[str]) -> float:
    return sum(per[d][system] for d in domains) / len(domains)


SYSTEMS = ["moe", "moe_router", "moe_all", "ensemble_top2", "ensemble_all", "posterior_avg", "uniform_avg",
           "dense", "seed"]


def main() -> None:
    args = parse_args()
    import torch

    from btm.data import Corpus
    from btm.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    t0 = time.time()
    ensure_models(args.work_dir)
    corpus = Corpus(args.corpus)
    train, evals = corpus.names("train"), corpus.names("eval")
    run_dir = args.work_dir / "moe-bench"
    run_dir.mkdir(exist_ok=True)
    tok = load_tokenizer(args.work_dir / "tokenizer")
    forest = build_forest(args.work_dir, corpus, run_dir / "forest")
    paths = build_models(args, run_dir, forest, corpus, args.work_dir / "tokenizer")
    post = posterior_averages(forest, corpus, train + evals, run_dir)
    blocks = test_blocks(corpus, train + evals, tok, args.work_dir / "tokens", 127, args.blocks)
    log("scoring every system on the test splits")
    per = score_all(args, forest, blocks, {k: v for k, v in paths.items()}, post)
    routing = {key: routing_stats(paths[key], forest, blocks, args.experts_per_token)
               for key in ("moe", "moe_router", "moe_all")}
    params = param_counts(forest, paths["moe"], args.experts_per_token)
    speed = None if args.no_timing else timed_generate(args, forest, corpus, tok, paths["moe"])

    print(f"\nMoE export of the repro forest ({len(forest)} ELMs of {params['elm'] / 1e6:.2f}M parameters, "
          f"{args.experts_per_token} experts per token; MoE {params['moe_total'] / 1e6:.2f}M in total, "
          f"{params['moe_active'] / 1e6:.2f}M active); router tuned {args.tune_steps} steps, "
          f"{args.tune_tokens:,} tokens ({args.tune_tokens / (args.budget / TUNE_SHARE):.2%} of the forest's); "
          "test perplexity (lower is better)")
    print(f"{'domain':<16}" + "".join(f"{s[:13]:>14}" for s in SYSTEMS))
    for d in train + evals:
        print(f"{d[:16]:<16}" + "".join(f"{per[d][s]:>14.2f}" for s in SYSTEMS))
    for label, doms in (("mean train", train), ("mean eval", evals)):
        print(f"{label:<16}" + "".join(f"{mean(per, s, doms):>14.2f}" for s in SYSTEMS))
    for key, r in routing.items():
        print(f"{key}: top-1 accuracy per layer {r['top1_accuracy']}; largest/smallest expert share per layer "
              f"{list(zip(r['load_max'], r['load_min'], strict=True))} (even: {1 / len(forest):.3f})")
    if speed:
        print("generate tokens/s: " + ", ".join(f"{s} {v}" for s, v in speed.items()))

    figs = {f"{s}_{label}": round(mean(per, s, doms), 3) for s in SYSTEMS
            for label, doms in (("train", train), ("eval", evals))}
    tuned = min(("moe_router", "moe_all"), key=lambda s: figs[f"{s}_train"])
    checks = {
        "untuned MoE <= uniform average (mean train)": figs["moe_train"] <= figs["uniform_avg_train"],
        f"tuned MoE ({tuned}) within 8% of ensemble top-2 (mean train)":
            figs[f"{tuned}_train"] <= 1.08 * figs["ensemble_top2_train"],
        f"tuned MoE ({tuned}) never worse than the seed on any domain":
            all(per[d][tuned] <= per[d]["seed"] for d in train + evals),
        "tune budget <= 2% of the forest's tokens": args.tune_tokens <= args.budget,
    }
    if speed:
        checks["MoE generate >= 1.3x ensemble top-2 tokens/s"] = speed["moe"] >= 1.3 * speed["ensemble_top2"]
    print("\ntargets:")
    for c, ok in checks.items():
        print(f"  {'yes' if ok else 'NO '}  {c}")
    result = {**figs, "per_domain": {d: {s: round(v, 3) for s, v in row.items()} for d, row in per.items()}, "routing": routing, "params": params, "tokens_per_s": speed,
              "tune_steps": args.tune_steps, "tune_tokens": args.tune_tokens,
              "forest_tokens": round(args.budget / TUNE_SHARE), "targets": checks,
              "seconds": round(time.time() - t0, 1)}
    if speed:
        result["moe_over_top2_speed"] = round(speed["moe"] / speed["ensemble_top2"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
