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
    model: str  # a model preset of btm.family (its architecture and shape)
    vocab: int
    block: int
    updates: int  # N
    batch: int  # B
    lr: float
    eval_blocks: int  # test blocks per domain
    prior_blocks: int  # dev blocks for the cached prior (paper: 100)


PRESETS = {
    "smoke": Preset("tiny", 1024, 64, 40, 16, 3e-3, 8, 8),
    "ci": Preset("mini", 4096, 128, 640, 32, 2e-3, 64, 100),
    "gpu": Preset("125m", 32768, 1024, 8000, 64, 5e-4, 200, 100),
}


PRESETS_MODEL = {name: p.model for name, p in PRESETS.items()}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def config_for(p: Preset, tok):
    from btm.family import preset_config

    return preset_config(p.model, tok)


def train_phase(job: dict) -> str:
    """One training phase in a worker process (so several small ELMs train side by side)."""
    import torch

    from btm.checkpoint import checkpoint_optimizer
    from btm.data import BlockSampler, load_token_file
    from btm.family import Card, load_model, new_model
    from btm.tokenizer import load_tokenizer
    from btm.train import TrainConfig, train

    torch.set_num_threads(job["threads"])
    tok = load_tokenizer(job["tokenizer"])
    streams = [load_token_file(s, verify=False) for s in job["streams"]]
    if job.get("init"):
        model = load_model(job["init"])
        opt = checkpoint_optimizer(job["init"]) if job.get("carry_optimizer") else None
    else:
        from transformers import AutoConfig

        config = dict(job["config"])
        model = new_model(AutoConfig.for_model(config.pop("model_type"), **config), seed=job["seed"])
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


@dataclass
class Run:
    """What every phase of one reproduction run shares."""

    args: argparse.Namespace
    p: Preset
    corpus: object  # btm.data.Corpus
    train_doms: list[str]
    eval_doms: list[str]
    k: int
    n_seed: int
    n_branch: int
    work: Path
    cache: Path
    jobs: int
    threads: int
    t0: float


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="ci")
    ap.add_argument("--model", default=None, help="the model preset of btm.family instead of the preset's "
                    "(its architecture and shape), e.g. gpt2-mini for the GPT-2 form of `ci`")
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
    return ap.parse_args()


def setup_run(args: argparse.Namespace) -> Run:
    """The preset with its overrides, the domains, the update split, the work dir and the parallelism."""
    import torch

    from btm.data import Corpus

    t0 = time.time()
    p = PRESETS[args.preset]
    if args.model:
        p.model = args.model
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
    arch = "" if p.model == PRESETS_MODEL[args.preset] else f"-{p.model}"
    work = args.work_dir or ROOT / "runs" / f"repro-{args.preset}{arch}-s{int(args.seed_share * 100)}-v{p.vocab}-n{p.updates}"
    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    jobs = args.jobs or (1 if cuda else max(1, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    log(f"preset {args.preset} (model {p.model}): N={p.updates} updates at batch {p.batch}x{p.block}; seed {n_seed}, "
        f"{k} ELMs x {n_branch} updates at batch {p.batch // k}; work dir {work}")
    return Run(args, p, corpus, train_doms, eval_doms, k, n_seed, n_branch, work, work / "tokens", jobs, threads, t0)


def build_tokenizer(run: Run):
    """The BPE tokenizer, trained on the train domains only (reused if the work dir has one)."""
    from btm.tokenizer import iter_balanced_texts, load_tokenizer, train_bpe

    tok_dir = run.work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        texts = iter_balanced_texts({d: run.corpus[d].documents("train") for d in run.train_doms}, 2_000_000)
        train_bpe(texts, run.p.vocab).save_pretrained(str(tok_dir))
    return tok_dir, load_tokenizer(tok_dir)


def tokenize_train_domains(run: Run, tok) -> dict[str, str]:
    """Train domain -> path of its token file."""
    from btm.data import tokenize_file

    streams = {d: tokenize_file(run.corpus[d].split_path("train"), tok, run.cache) for d in run.train_doms}
    return {d: str(Path(s.filename)) for d, s in streams.items()}


def make_random_shards(run: Run, tok) -> list[str]:
    """The same documents dealt at random into k shards; the paths of their token files."""
    from btm.data import tokenize_file

    shard_dir = run.work / "random-shards"
    if not (shard_dir / "done").exists():
        docs = [t for d in run.train_doms for t in run.corpus[d].documents("train")]
        random.Random(0).shuffle(docs)
        shard_dir.mkdir(exist_ok=True)
        for i in range(run.k):
            with open(shard_dir / f"shard{i}.jsonl", "w") as f:
                for t in docs[i::run.k]:
                    f.write(json.dumps({"text": t}) + "\n")
        (shard_dir / "done").write_text("")
    return [str(Path(tokenize_file(shard_dir / f"shard{i}.jsonl", tok, run.cache).filename)) for i in range(run.k)]


def train_seed_and_dense(run: Run, base: dict, common: dict, train_paths: dict[str, str]) -> None:
    """Seed = the first share of the dense run; dense = the seed continued on the mixture."""
    p, work, mixture = run.p, run.work, [train_paths[d] for d in run.train_doms]
    log("training the seed (the dense run's first share)")
    train_phase({**base, "out": str(work / "seed"), "kind": "seed", "threads": os.cpu_count() or 1,
                 "streams": mixture,
                 "train": {**common, "steps": run.n_seed, "batch_size": p.batch}})
    log("continuing the dense baseline")
    train_phase({**base, "out": str(work / "dense"), "kind": "dense", "threads": os.cpu_count() or 1,
                 "init": str(work / "seed"), "carry_optimizer": True, "streams": mixture,
                 "train": {**common, "steps": run.n_branch, "batch_size": p.batch, "schedule_start": run.n_seed}})


def branch_jobs(run: Run, base: dict, common: dict, train_paths: dict[str, str], shard_paths: list[str]) -> list[dict]:
    """k ELMs (and k random-split ELMs), the remaining updates at batch B/k each."""
    branches = [(run.work / "elms" / d, d, train_paths[d]) for d in run.train_doms]
    branches += [(run.work / "random" / f"shard{i}", f"shard{i}", sp) for i, sp in enumerate(shard_paths)]
    return [{**base, "out": str(out), "kind": "elm", "domain": domain, "threads": run.threads,
             "init": str(run.work / "seed"), "carry_optimizer": True, "streams": [stream],
             "train": {**common, "steps": run.n_branch, "batch_size": run.p.batch // run.k,
                       "schedule_start": run.n_seed}}
            for out, domain, stream in branches]


def train_branches(run: Run, jobs: list[dict]) -> None:
    log(f"training {len(jobs)} branches, {run.jobs} at a time")
    t_br = time.time()
    if run.jobs == 1:
        for j in jobs:
            train_phase(j)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(run.jobs, mp_context=mp.get_context("spawn")) as ex:
            list(ex.map(train_phase, jobs))
    log(f"branches done in {time.time() - t_br:.0f}s")


def eval_domains(run: Run, tok) -> list:
    """Test and dev blocks of the train and eval domains, then of every --extra-eval domain."""
    from btm.data import Corpus
    from btm.evaluate import domain_blocks

    extra = []
    for d in run.args.extra_eval:
        c2 = Corpus(d)
        extra += [(n, c2) for n in c2.names()]
    p = run.p
    all_doms = domain_blocks(run.corpus, run.train_doms + run.eval_doms, tok, p.block, p.eval_blocks,
                             p.prior_blocks, run.cache)
    for n, c2 in extra:
        db = domain_blocks(c2, [n], tok, p.block, p.eval_blocks, p.prior_blocks, run.cache)[0]
        db.name, db.role = f"extra:{n}", "extra"
        all_doms.append(db)
    return all_doms


def score_into(s, models: list[tuple[str, Path, bool, list[str] | None]], blocks_file: Path, threads: int,
               pool: ProcessPoolExecutor | None) -> None:
    """Score (name, model dir, with dev blocks, only these domains) models into s."""
    jobs_ = [{"name": n, "model": str(m), "dev": dev, "blocks": str(blocks_file), "threads": threads,
              "domains": doms} for n, m, dev, doms in models]
    for r in (pool.map(score_model, jobs_) if pool else map(score_model, jobs_)):
        for dn, lp in r["test"].items():
            s.test[(r["name"], dn)] = lp
        for dn, ll in r["dev"].items():
            s.dev[(r["name"], dn)] = ll


def build_averages(run: Run, s, all_doms: list, elm_names: list[str]):
    """The uniform average, the cached prior of each domain and its posterior average."""
    from btm.average import average_models, method_weights
    from btm.family import Card

    elm_paths = [run.work / "elms" / d for d in run.train_doms]
    uni = average_models(elm_paths, method_weights("uniform", None, run.k), run.work / "avg" / "uniform",
                         Card(name="uniform", kind="average"), names=elm_names)
    priors = {d.name: s.prior(elm_names, d.name) for d in all_doms}
    post_jobs = []
    for d in all_doms:
        avg = average_models(elm_paths, priors[d.name].tolist(), run.work / "avg" / f"posterior-{d.name.replace(':', '_')}",
                             Card(name=f"posterior-{d.name}", kind="average", domain=d.name), names=elm_names)
        post_jobs.append((d.name, avg))
    return uni, priors, post_jobs


def evaluate(run: Run, all_doms: list, elm_names: list[str], rnd_names: list[str]):
    """Score every model on every domain; returns the Scores and each domain's prior over the ELMs."""
    import multiprocessing as mp

    import torch

    from btm.evaluate import Scores

    s = Scores()
    blocks_file = run.work / "eval-blocks.pt"
    torch.save({d.name: (d.test, d.dev) for d in all_doms}, blocks_file)
    pool = ProcessPoolExecutor(run.jobs, mp_context=mp.get_context("spawn")) if run.jobs > 1 else None
    work = run.work
    log("scoring the ELMs, the random-split ELMs, the dense model and the seed")
    t_sc = time.time()
    score_into(s, [(d, work / "elms" / d, True, None) for d in run.train_doms]
               + [(r, work / "random" / r, True, None) for r in rnd_names]
               + [("dense", work / "dense", False, None), ("seed", work / "seed", False, None)],
               blocks_file, run.threads, pool)
    log(f"scored in {time.time() - t_sc:.0f}s")
    log("building and scoring the averages")
    uni, priors, post_jobs = build_averages(run, s, all_doms, elm_names)
    # each posterior average is scored on its own target only
    score_into(s, [("uniform_avg", uni, False, None)] + [(f"post:{dn}", avg, False, [dn]) for dn, avg in post_jobs],
               blocks_file, run.threads, pool)
    if pool:
        pool.shutdown()
    return s, priors


def domain_row(s, name: str, prior, elm_names: list[str], rnd_names: list[str], train_doms: list[str]) -> dict:
    """Every system's perplexity on one domain."""
    import numpy as np

    row = {}
    row["dense"] = s.ppl("dense", name)
    row["seed"] = s.ppl("seed", name)
    row["ensemble"] = s.ensemble_ppl(elm_names, name, None, prior)
    for kk in (1, 2, 4):
        row[f"top{kk}"] = s.ensemble_ppl(elm_names, name, kk, prior)
    row["uniform_avg"] = s.ppl("uniform_avg", name)
    row["argmax"] = s.ppl(elm_names[int(np.argmax(prior))], name)
    row["posterior_avg"] = s.ppl(f"post:{name}", name)
    if rnd_names:
        row["random_ensemble"] = s.ensemble_ppl(rnd_names, name)
    if name in train_doms:
        others = [n for n in elm_names if n != name]
        row["removed_own_elm"] = s.ensemble_ppl(others, name)
        row["own_elm"] = s.ppl(name, name)
    return row


def per_domain(run: Run, s, all_doms: list, priors: dict, elm_names: list[str],
               rnd_names: list[str]) -> dict[str, dict[str, float]]:
    per: dict[str, dict[str, float]] = {}  # domain -> system -> ppl
    for d in all_doms:
        per.setdefault(d.name, {}).update(domain_row(s, d.name, priors[d.name], elm_names, rnd_names, run.train_doms))
    return per


def mean(per: dict[str, dict[str, float]], system: str, names: list[str]) -> float:
    import numpy as np

    vals = [per[n][system] for n in names if system in per[n]]
    return float(np.mean(vals)) if vals else float("nan")


SYSTEMS = ["dense", "seed", "ensemble", "top1", "top2", "top4", "uniform_avg", "argmax", "posterior_avg",
           "random_ensemble", "removed_own_elm", "own_elm"]


def n_params_m(model_dir: Path) -> float:
    from btm.family import load_model

    return sum(t.numel() for t in load_model(model_dir).parameters()) / 1e6


def print_table(run: Run, tok, all_doms: list, per: dict, extra_names: list[str]) -> None:
    args, p = run.args, run.p
    print()
    print(f"BTM reproduction, preset {args.preset} (model {p.model}): N={p.updates} updates of {p.batch}x{p.block} tokens, "
          f"seed share {args.seed_share:.0%}, {run.k} ELMs of "
          f"{n_params_m(run.work / 'seed'):.2f}M parameters, "
          f"vocab {len(tok)}; perplexity per token (lower is better)")
    head = f"{'domain':<20}" + "".join(f"{x[:10]:>11}" for x in SYSTEMS)
    print(head)
    for d in all_doms:
        print(f"{d.name[:20]:<20}" + "".join(f"{per[d.name].get(x, float('nan')):>11.2f}" for x in SYSTEMS))
    print("-" * len(head))
    for label, names in (("mean train", run.train_doms), ("mean eval", run.eval_doms), ("mean extra", extra_names)):
        if names:
            print(f"{label:<20}" + "".join(f"{mean(per, x, names):>11.2f}" for x in SYSTEMS))


def print_posteriors(all_doms: list, priors: dict, elm_names: list[str]) -> None:
    print()
    print("posterior (cached prior) of each domain over the ELMs:")
    print(f"{'':<20}" + "".join(f"{n[:9]:>10}" for n in elm_names))
    for d in all_doms:
        print(f"{d.name[:20]:<20}" + "".join(f"{w:>10.2f}" for w in priors[d.name]))


def figures(run: Run, tok, per: dict, extra_names: list[str]) -> dict:
    tr, ev = run.train_doms, run.eval_doms

    def m(system, names):
        return mean(per, system, names)

    fig = {
        "dense_train": m("dense", tr), "dense_eval": m("dense", ev),
        "seed_train": m("seed", tr), "seed_eval": m("seed", ev),
        "ensemble_train": m("ensemble", tr), "ensemble_eval": m("ensemble", ev),
        "top1_train": m("top1", tr), "top2_train": m("top2", tr),
        "top4_train": m("top4", tr),
        "top1_eval": m("top1", ev), "top2_eval": m("top2", ev),
        "uniform_avg_train": m("uniform_avg", tr), "uniform_avg_eval": m("uniform_avg", ev),
        "argmax_train": m("argmax", tr), "argmax_eval": m("argmax", ev),
        "posterior_avg_train": m("posterior_avg", tr),
        "posterior_avg_eval": m("posterior_avg", ev),
        "random_ensemble_train": m("random_ensemble", tr),
        "random_ensemble_eval": m("random_ensemble", ev),
        "removed_own_elm_train": m("removed_own_elm", tr),
        "own_elm_train": m("own_elm", tr),
    }
    for n in extra_names:
        short = n.split(":", 1)[1]
        for x in ("dense", "ensemble", "posterior_avg"):
            fig[f"extra_eval_{short}_{x}"] = per[n][x]
    p = run.p
    fig.update({"preset": run.args.preset, "model": p.model, "seed_share": run.args.seed_share, "updates": p.updates, "batch": p.batch,
                "block": p.block, "vocab": len(tok), "seconds": round(time.time() - run.t0, 1)})
    return fig


def sanity_checks(fig: dict, per: dict, extra_names: list[str]) -> dict[str, bool]:
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
        checks["ensemble<dense (extra)"] = mean(per, "ensemble", extra_names) < mean(per, "dense", extra_names)
        checks["posterior_avg<dense (extra)"] = mean(per, "posterior_avg", extra_names) < mean(per, "dense", extra_names)
    return checks


def print_checks_and_json(checks: dict[str, bool], fig: dict) -> None:
    print()
    for c, ok in checks.items():
        print(f"  {'yes' if ok else 'NO ':<4} {c}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in fig.items()}))


def main() -> None:
    args = parse_args()
    run = setup_run(args)

    tok_dir, tok = build_tokenizer(run)
    train_paths = tokenize_train_domains(run, tok)
    shard_paths = [] if args.no_random else make_random_shards(run, tok)

    p = run.p
    common = dict(block_size=p.block, lr=p.lr, warmup=0.08, schedule_steps=p.updates, progress=False, log_every=20)
    base = {"tokenizer": str(tok_dir), "config": config_for(p, tok).to_dict(), "seed": 0}
    train_seed_and_dense(run, base, common, train_paths)
    train_branches(run, branch_jobs(run, base, common, train_paths, shard_paths))

    all_doms = eval_domains(run, tok)
    elm_names = list(run.train_doms)
    rnd_names = [f"shard{i}" for i in range(len(shard_paths))]
    s, priors = evaluate(run, all_doms, elm_names, rnd_names)
    per = per_domain(run, s, all_doms, priors, elm_names, rnd_names)

    extra_names = [d.name for d in all_doms if d.role == "extra"]
    print_table(run, tok, all_doms, per, extra_names)
    print_posteriors(all_doms, priors, elm_names)
    fig = figures(run, tok, per, extra_names)
    print_checks_and_json(sanity_checks(fig, per, extra_names), fig)


if __name__ == "__main__":
    main()
