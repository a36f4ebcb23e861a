"""Reproduce the BTM paper's core comparison at small scale (tables 3, 4 and 6).

Compute-matched the paper's way, in updates:
  DENSE   N updates at batch B on the balanced mixture of the train domains;
  SEED    DENSE's first share*N updates (same schedule, with its optimizer state);
  BTM     each of the k ELMs trains the remaining (1-share)*N updates of that schedule at
          batch B/k on its own domain (the dense run's GPUs divided among the ELMs);
  RANDOM  the same budget as BTM on k random shards of the same documents.
Every system sees the same number of tokens. Then: the ensemble (cached prior, all and
top-k), the three parameter averages, and forgetting (each train domain scored without its
own ELM). Prints the tables and ends with one JSON line of every figure.

    python bench/repro.py                            # --preset ci: about 10 minutes on 2 CPU cores
    python bench/repro.py --extra-eval runs/extra-domains   # and unseen domains (bench/extra_domains.py)
    python bench/repro.py --preset gpu               # ~125M parameters per ELM, for a GPU
    python bench/repro.py --corpus DIR --extra-eval DIR2 --seed-share 0.6
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Preset:
    n_layer: int
    n_head: int
    n_embd: int
    vocab: int
    block: int
    updates: int  # N
    batch: int  # B
    lr: float
    eval_blocks: int  # test blocks per domain
    prior_blocks: int  # dev blocks for the cached prior (paper: 100)


PRESETS = {
    "smoke": Preset(2, 2, 64, 1024, 64, 40, 16, 3e-3, 8, 8),
    "ci": Preset(4, 4, 128, 4096, 128, 640, 32, 2e-3, 64, 100),
    "gpu": Preset(12, 12, 768, 32768, 1024, 8000, 64, 5e-4, 200, 100),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def config_for(p: Preset, tok):
    from transformers import GPT2Config

    from btm.tokenizer import bos_id

    return GPT2Config(vocab_size=len(tok), n_positions=p.block, n_layer=p.n_layer, n_head=p.n_head,
                      n_embd=p.n_embd, bos_token_id=bos_id(tok), eos_token_id=bos_id(tok),
                      embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)


def train_phase(job: dict) -> str:
    """One training phase in a worker process (so several small ELMs train side by side)."""
    import torch

    from btm.data import BlockSampler, load_token_file
    from btm.family import Card, load_model, new_model
    from btm.tokenizer import load_tokenizer
    from btm.train import TrainConfig, checkpoint_optimizer, train

    torch.set_num_threads(job["threads"])
    tok = load_tokenizer(job["tokenizer"])
    streams = [load_token_file(s, verify=False) for s in job["streams"]]
    if job.get("init"):
        model = load_model(job["init"])
        opt = checkpoint_optimizer(job["init"]) if job.get("carry_optimizer") else None
    else:
        from transformers import GPT2Config

        model = new_model(GPT2Config.from_dict(job["config"]), seed=job["seed"])
        opt = None
    cfg = TrainConfig(**job["train"])
    card = Card(name=Path(job["out"]).name, kind=job["kind"], domain=job.get("domain"),
                parents=[{"name": "seed", "weight": 1.0}] if job.get("init") else [])
    train(model, tok, BlockSampler(streams, cfg.block_size, job["seed"]), cfg, job["out"], card, init_optimizer=opt)
    return job["out"]


def score_model(job: dict) -> dict:
    """Per-token test log probs and per-block dev log-likelihoods of one model on every domain."""
    import torch

    from btm.family import load_model
    from btm.posterior import token_logprobs

    torch.set_num_threads(job["threads"])
    blocks = torch.load(job["blocks"], weights_only=True)  # written by this run, plain tensors
    model = load_model(job["model"])
    out = {"test": {}, "dev": {}}
    for name, (test, dev) in blocks.items():
        if job["domains"] is not None and name not in job["domains"]:
            continue
        out["test"][name] = token_logprobs(model, test, 32)
        if job["dev"]:
            out["dev"][name] = token_logprobs(model, dev, 32).double().sum(1).numpy()
    return {"name": job["name"], **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="ci")
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    ap.add_argument("--train-domains", default=None, help="comma-separated (default: the corpus's train domains)")
    ap.add_argument("--eval-domains", default=None, help="comma-separated (default: the corpus's eval domains)")
    ap.add_argument("--extra-eval", type=Path, action="append", default=[],
                    help="more evaluation-only corpora (DIR/<domain>/{valid,test}.jsonl), each domain on its own "
                    "row; bench/extra_domains.py makes four from this machine's Debian packages")
    ap.add_argument("--seed-share", type=float, default=0.9, help="share of the N updates spent on the seed "
                    "(0.9: see docs/results.md for 0.5-0.9)")
    ap.add_argument("--updates", type=int, default=None, help="override N")
    ap.add_argument("--vocab-size", type=int, default=None, help="override the BPE vocabulary size")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=None, help="ELMs trained side by side (default: CPU cores, 1 on GPU)")
    ap.add_argument("--no-random", action="store_true", help="skip the random-split ensemble")
    args = ap.parse_args()

    import numpy as np
    import torch

    from btm.average import average_models, method_weights
    from btm.data import Corpus, tokenize_file
    from btm.evaluate import Scores, domain_blocks
    from btm.family import Card
    from btm.tokenizer import iter_balanced_texts, load_tokenizer, train_bpe

    t0 = time.time()
    p = PRESETS[args.preset]
    if args.updates:
        p.updates = args.updates
    if args.vocab_size:
        p.vocab = args.vocab_size
    corpus = Corpus(args.corpus)
    train_doms = args.train_domains.split(",") if args.train_domains else corpus.names("train")
    eval_doms = args.eval_domains.split(",") if args.eval_domains else corpus.names("eval")
    if not train_doms:
        sys.exit(f"{args.corpus}: no train domains known; pass --train-domains")
    k = len(train_doms)
    if p.batch % k:
        sys.exit(f"batch {p.batch} is not divisible by the {k} train domains")
    n_seed = round(args.seed_share * p.updates)
    n_branch = p.updates - n_seed
    work = args.work_dir or ROOT / "runs" / f"repro-{args.preset}-s{int(args.seed_share * 100)}-v{p.vocab}-n{p.updates}"
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "tokens"
    cuda = torch.cuda.is_available()
    jobs = args.jobs or (1 if cuda else max(1, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    log(f"preset {args.preset}: N={p.updates} updates at batch {p.batch}x{p.block}; seed {n_seed}, "
        f"{k} ELMs x {n_branch} updates at batch {p.batch // k}; work dir {work}")

    # ---- tokenizer (trained on the train domains only)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        texts = iter_balanced_texts({d: corpus[d].documents("train") for d in train_doms}, 2_000_000)
        train_bpe(texts, p.vocab).save_pretrained(str(tok_dir))
    tok = load_tokenizer(tok_dir)
    streams = {d: tokenize_file(corpus[d].split_path("train"), tok, cache) for d in train_doms}

    def token_path(d):
        return str(Path(streams[d].filename))

    # ---- random shards: the same documents dealt at random into k shards
    shard_paths = []
    if not args.no_random:
        shard_dir = work / "random-shards"
        if not (shard_dir / "done").exists():
            docs = [t for d in train_doms for t in corpus[d].documents("train")]
            random.Random(0).shuffle(docs)
            shard_dir.mkdir(exist_ok=True)
            for i in range(k):
                with open(shard_dir / f"shard{i}.jsonl", "w") as f:
                    for t in docs[i::k]:
                        f.write(json.dumps({"text": t}) + "\n")
            (shard_dir / "done").write_text("")
        shard_paths = [str(Path(tokenize_file(shard_dir / f"shard{i}.jsonl", tok, cache).filename)) for i in range(k)]

    common = dict(block_size=p.block, lr=p.lr, warmup=0.08, schedule_steps=p.updates, progress=False, log_every=20)
    base = {"tokenizer": str(tok_dir), "config": config_for(p, tok).to_dict(), "seed": 0}

    # ---- seed = the first share of the dense run; dense = the seed continued on the mixture
    log("training the seed (the dense run's first share)")
    train_phase({**base, "out": str(work / "seed"), "kind": "seed", "threads": os.cpu_count() or 1,
                 "streams": [token_path(d) for d in train_doms],
                 "train": {**common, "steps": n_seed, "batch_size": p.batch}})
    log("continuing the dense baseline")
    train_phase({**base, "out": str(work / "dense"), "kind": "dense", "threads": os.cpu_count() or 1,
                 "init": str(work / "seed"), "carry_optimizer": True, "streams": [token_path(d) for d in train_doms],
                 "train": {**common, "steps": n_branch, "batch_size": p.batch, "schedule_start": n_seed}})

    # ---- k ELMs (and k random-split ELMs), the remaining updates at batch B/k each
    branch_jobs = []
    for d in train_doms:
        branch_jobs.append({**base, "out": str(work / "elms" / d), "kind": "elm", "domain": d, "threads": threads,
                            "init": str(work / "seed"), "carry_optimizer": True, "streams": [token_path(d)],
                            "train": {**common, "steps": n_branch, "batch_size": p.batch // k, "schedule_start": n_seed}})
    for i, sp in enumerate(shard_paths):
        branch_jobs.append({**base, "out": str(work / "random" / f"shard{i}"), "kind": "elm", "domain": f"shard{i}",
                            "threads": threads, "init": str(work / "seed"), "carry_optimizer": True, "streams": [sp],
                            "train": {**common, "steps": n_branch, "batch_size": p.batch // k, "schedule_start": n_seed}})
    log(f"training {len(branch_jobs)} branches, {jobs} at a time")
    t_br = time.time()
    if jobs == 1:
        for j in branch_jobs:
            train_phase(j)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            list(ex.map(train_phase, branch_jobs))
    log(f"branches done in {time.time() - t_br:.0f}s")

    # ---- evaluation
    extra = []
    for d in args.extra_eval:
        c2 = Corpus(d)
        extra += [(n, c2) for n in c2.names()]
    all_doms = domain_blocks(corpus, train_doms + eval_doms, tok, p.block, p.eval_blocks, p.prior_blocks, cache)
    for n, c2 in extra:
        db = domain_blocks(c2, [n], tok, p.block, p.eval_blocks, p.prior_blocks, cache)[0]
        db.name, db.role = f"extra:{n}", "extra"
        all_doms.append(db)
    s = Scores()
    elm_names = list(train_doms)
    rnd_names = [f"shard{i}" for i in range(len(shard_paths))]
    blocks_file = work / "eval-blocks.pt"
    torch.save({d.name: (d.test, d.dev) for d in all_doms}, blocks_file)

    import multiprocessing as mp

    pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) if jobs > 1 else None

    def score(models: list[tuple[str, Path, bool, list[str] | None]]) -> None:
        jobs_ = [{"name": n, "model": str(m), "dev": dev, "blocks": str(blocks_file), "threads": threads,
                  "domains": doms} for n, m, dev, doms in models]
        for r in (pool.map(score_model, jobs_) if pool else map(score_model, jobs_)):
            for dn, lp in r["test"].items():
                s.test[(r["name"], dn)] = lp
            for dn, ll in r["dev"].items():
                s.dev[(r["name"], dn)] = ll

    log("scoring the ELMs, the random-split ELMs, the dense model and the seed")
    t_sc = time.time()
    score([(d, work / "elms" / d, True, None) for d in train_doms]
          + [(r, work / "random" / r, True, None) for r in rnd_names]
          + [("dense", work / "dense", False, None), ("seed", work / "seed", False, None)])
    log(f"scored in {time.time() - t_sc:.0f}s")
    log("building and scoring the averages")
    elm_paths = [work / "elms" / d for d in train_doms]
    uni = average_models(elm_paths, method_weights("uniform", None, k), work / "avg" / "uniform",
                         Card(name="uniform", kind="average"), names=elm_names)
    priors = {d.name: s.prior(elm_names, d.name) for d in all_doms}
    post_jobs = []
    for d in all_doms:
        avg = average_models(elm_paths, priors[d.name].tolist(), work / "avg" / f"posterior-{d.name.replace(':', '_')}",
                             Card(name=f"posterior-{d.name}", kind="average", domain=d.name), names=elm_names)
        post_jobs.append((d.name, avg))
    # each posterior average is scored on its own target only
    score([("uniform_avg", uni, False, None)] + [(f"post:{dn}", avg, False, [dn]) for dn, avg in post_jobs])
    if pool:
        pool.shutdown()

    per: dict[str, dict[str, float]] = {}  # system -> domain -> ppl
    for d in all_doms:
        prior = priors[d.name]
        row = per.setdefault(d.name, {})
        row["dense"] = s.ppl("dense", d.name)
        row["seed"] = s.ppl("seed", d.name)
        row["ensemble"] = s.ensemble_ppl(elm_names, d.name, None, prior)
        for kk in (1, 2, 4):
            row[f"top{kk}"] = s.ensemble_ppl(elm_names, d.name, kk, prior)
        row["uniform_avg"] = s.ppl("uniform_avg", d.name)
        row["argmax"] = s.ppl(elm_names[int(np.argmax(prior))], d.name)
        row["posterior_avg"] = s.ppl(f"post:{d.name}", d.name)
        if rnd_names:
            row["random_ensemble"] = s.ensemble_ppl(rnd_names, d.name)
        if d.name in train_doms:
            others = [n for n in elm_names if n != d.name]
            row["removed_own_elm"] = s.ensemble_ppl(others, d.name)
            row["own_elm"] = s.ppl(d.name, d.name)

    def mean(system, names):
        vals = [per[n][system] for n in names if system in per[n]]
        return float(np.mean(vals)) if vals else float("nan")

    systems = ["dense", "seed", "ensemble", "top1", "top2", "top4", "uniform_avg", "argmax", "posterior_avg",
               "random_ensemble", "removed_own_elm", "own_elm"]
    extra_names = [d.name for d in all_doms if d.role == "extra"]
    print()
    print(f"BTM reproduction, preset {args.preset}: N={p.updates} updates of {p.batch}x{p.block} tokens, "
          f"seed share {args.seed_share:.0%}, {k} ELMs of "
          f"{sum(t.numel() for t in __import__('btm.family', fromlist=['x']).load_model(work / 'seed').parameters()) / 1e6:.2f}M parameters, "
          f"vocab {len(tok)}; perplexity per token (lower is better)")
    head = f"{'domain':<20}" + "".join(f"{x[:10]:>11}" for x in systems)
    print(head)
    for d in all_doms:
        print(f"{d.name[:20]:<20}" + "".join(f"{per[d.name].get(x, float('nan')):>11.2f}" for x in systems))
    print("-" * len(head))
    for label, names in (("mean train", train_doms), ("mean eval", eval_doms), ("mean extra", extra_names)):
        if names:
            print(f"{label:<20}" + "".join(f"{mean(x, names):>11.2f}" for x in systems))
    print()
    print("posterior (cached prior) of each domain over the ELMs:")
    print(f"{'':<20}" + "".join(f"{n[:9]:>10}" for n in elm_names))
    for d in all_doms:
        print(f"{d.name[:20]:<20}" + "".join(f"{w:>10.2f}" for w in priors[d.name]))

    fig = {
        "dense_train": mean("dense", train_doms), "dense_eval": mean("dense", eval_doms),
        "seed_train": mean("seed", train_doms), "seed_eval": mean("seed", eval_doms),
        "ensemble_train": mean("ensemble", train_doms), "ensemble_eval": mean("ensemble", eval_doms),
        "top1_train": mean("top1", train_doms), "top2_train": mean("top2", train_doms),
        "top4_train": mean("top4", train_doms),
        "top1_eval": mean("top1", eval_doms), "top2_eval": mean("top2", eval_doms),
        "uniform_avg_train": mean("uniform_avg", train_doms), "uniform_avg_eval": mean("uniform_avg", eval_doms),
        "argmax_train": mean("argmax", train_doms), "argmax_eval": mean("argmax", eval_doms),
        "posterior_avg_train": mean("posterior_avg", train_doms),
        "posterior_avg_eval": mean("posterior_avg", eval_doms),
        "random_ensemble_train": mean("random_ensemble", train_doms),
        "random_ensemble_eval": mean("random_ensemble", eval_doms),
        "removed_own_elm_train": mean("removed_own_elm", train_doms),
        "own_elm_train": mean("own_elm", train_doms),
    }
    for n in extra_names:
        short = n.split(":", 1)[1]
        for x in ("dense", "ensemble", "posterior_avg"):
            fig[f"extra_eval_{short}_{x}"] = per[n][x]
    fig.update({"preset": args.preset, "seed_share": args.seed_share, "updates": p.updates, "batch": p.batch,
                "block": p.block, "vocab": len(tok), "seconds": round(time.time() - t0, 1)})
    checks = {
        "ensemble<dense (train)": fig["ensemble_train"] < fig["dense_train"],
        "posterior_avg<dense (train)": fig["posterior_avg_train"] < fig["dense_train"],
        "posterior_avg<uniform_avg (train)": fig["posterior_avg_train"] < fig["uniform_avg_train"],
        "domain<random ensemble (train)": fig["ensemble_train"] < fig["random_ensemble_train"],
        "removing own ELM hurts (train)": fig["removed_own_elm_train"] > fig["ensemble_train"],
        "top2 within 1% of all (train)": fig["top2_train"] <= 1.01 * fig["ensemble_train"],
        "ensemble<dense (eval)": fig["ensemble_eval"] < fig["dense_eval"],
        "posterior_avg<dense (eval)": fig["posterior_avg_eval"] < fig["dense_eval"],
    }
    if extra_names:
        checks["ensemble<dense (extra)"] = mean("ensemble", extra_names) < mean("dense", extra_names)
        checks["posterior_avg<dense (extra)"] = mean("posterior_avg", extra_names) < mean("dense", extra_names)
    print()
    for c, ok in checks.items():
        print(f"  {'yes' if ok else 'NO ':<4} {c}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in fig.items()}))


if __name__ == "__main__":
    main()
