"""What each ELM is worth, and evaluation that costs only what changed (btm.value, btm.score_cache).

On the ci reproduction's models (bench/repro.py --preset ci: a seed and 8 ELMs, 12 domains of
64 scored and 100 prior blocks of 128 tokens), this measures:

  full       one evaluation of the 8-ELM forest from scratch (every ELM and the seed scored on
             every domain, the ensembles), the leaderboard's part that grows with the forest;
             with --averages, also the uniform, argmax and posterior averages
  values     all leave-one-out and Shapley values (--permutations orderings) for 8 ELMs x 12
             domains from the scores `full` made: arithmetic only
  loo check  the forest without each ELM, evaluated from its models (forward passes), against
             the leave-one-out values (relative error of the perplexity)
  v+1        a version adding one ELM to 7 whose scores the store holds, against the same
             version evaluated from scratch (both with their values)

The last line is JSON with loo_max_rel_error, values_seconds_over_full_eval,
incremental_over_full_eval and shapley_efficiency_max_error, and the timings behind them.

    python bench/value.py                                  # 5 full evaluations' time (minutes on 2 CPU cores)
    python bench/value.py --run runs/repro-ci-s90-v4096-n640 --permutations 200 --loo-checks 8 --averages
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_forest(run: Path, root: Path):
    """A btm forest of the run's seed and ELMs (copied once)."""
    from btm.forest import Forest

    f = Forest.init(root, run / "seed", "value-bench")
    for d in sorted(p.name for p in (run / "elms").iterdir()):
        f.add(run / "elms" / d, name=d, domain=d)
    return f


def without(f, names: set[str]):
    """The forest less some ELMs, in memory (no copy): what a removal publishes."""
    from btm.forest import Forest

    return Forest(f.root, {**f.manifest, "elms": [e for e in f.manifest["elms"] if e["name"] not in names]})


def domains(run: Path, train: list[str]):
    import torch

    from btm.evaluate import DomainBlocks

    blocks = torch.load(run / "eval-blocks.pt")
    return [DomainBlocks(n, "train" if n in train else "eval", t, d) for n, (t, d) in blocks.items()]


def timed(fn):
    """(result, seconds): CPU seconds of this process (every thread), which other work on a
    shared machine does not inflate as it does wall time; the wall time goes to WALL."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    WALL.append(time.perf_counter() - t)
    return out, time.process_time() - c


WALL: list[float] = []


def ensemble_ppl(rep: dict) -> dict[str, float]:
    return {r["domain"]: r["ppl"] for r in rep["rows"] if r["subject"] == "ensemble"}


def loo_check(f, doms, work: Path, values: dict, count: int) -> float:
    """The largest relative error of ppl(forest) * (1 + loo) against evaluating the forest without
    the ELM, for `count` of the ELMs (each check is a whole evaluation of n - 1 models)."""
    from btm.evaluate import evaluate_forest

    worst = 0.0
    for e in f.elms[:count]:
        rep, dt = timed(lambda e=e: evaluate_forest(without(f, {e.name}), doms, work, top_ks=(), averages=()))
        ens = ensemble_ppl(rep)
        for d, v in values.items():
            want = v["forest_ppl"] * (1 + v["elms"][e.name]["loo"])
            worst = max(worst, abs(ens[d] / want - 1))
        log(f"  without {e.name}: evaluated in {dt:.1f}s; worst relative error so far {worst:.2e}")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "repro-ci-s90-v4096-n640")
    ap.add_argument("--permutations", type=int, default=200)
    ap.add_argument("--loo-checks", type=int, default=3, help="ELMs whose leave-one-out is checked against an "
                    "evaluation without them (8: all; each costs about a full evaluation)")
    ap.add_argument("--averages", action="store_true", help="also time evaluations with the parameter averages")
    ap.add_argument("--work-dir", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np

    from btm.evaluate import SEED, Scores, elm_fingerprint, evaluate_forest, forest_values
    from btm.score_cache import DirStore, files_fingerprint

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="value-bench-"))
    f = build_forest(args.run, work / "forest")
    names = f.names()
    doms = domains(args.run, names)
    n, perms = len(names), args.permutations
    log(f"{n} ELMs, {len(doms)} domains, {doms[0].test.shape[0]} scored + {doms[0].dev.shape[0]} prior blocks "
        f"of {doms[0].test.shape[1] - 1} tokens")

    # one full evaluation, from scratch; its scores go to a store
    store = DirStore(work / "store-full")
    seed_fp = files_fingerprint(f.manifest["seed"]["files"])
    full, t_full = timed(lambda: evaluate_forest(f, doms, work / "w", averages=(), store=store,
                                                 extra_models={"seed": f.seed_dir}))
    w_full = WALL[-1]
    log(f"full evaluation (8 ELMs + the seed, ensembles): {t_full:.1f}s CPU, {w_full:.1f}s wall")

    # the values, from those scores
    def read():
        s = Scores(store=store)
        for e in f.elms:
            s.add_model(e.name, e.path, doms, fingerprint=elm_fingerprint(e))
        s.add_model(SEED, f.seed_dir, doms, dev_too=False, fingerprint=seed_fp)
        assert s.scored == 0
        return s

    scores, t_read = timed(read)
    values, t_values = timed(lambda: forest_values(scores, names, doms, perms))
    w_values = WALL[-1]
    log(f"values ({n} ELMs x {len(doms)} domains, {perms} orderings): {t_values:.2f}s "
        f"(+ {t_read:.2f}s reading the scores back)")
    ens = ensemble_ppl(full)
    assert all(abs(values[d]["forest_ppl"] / ens[d] - 1) < 1e-9 for d in ens)
    eff = max(abs(sum(x["shapley"] for x in v["elms"].values()) - v["improvement"]) for v in values.values())
    se = max(x["shapley_se"] for v in values.values() for x in v["elms"].values())

    log(f"leave-one-out against evaluating the forest without the ELM ({args.loo_checks} of them):")
    loo_err = loo_check(f, doms, work / "w", values, args.loo_checks)

    # version v+1 = v + one ELM: incremental against from scratch (both with values)
    inc_store = DirStore(work / "store-inc")
    prev = without(f, {names[-1]})
    _, t_prev = timed(lambda: evaluate_forest(prev, doms, work / "w", averages=(), store=inc_store, permutations=perms))
    inc, t_inc = timed(lambda: evaluate_forest(f, doms, work / "w", averages=(), store=inc_store, permutations=perms))
    w_inc = WALL[-1]
    scratch, t_scratch = timed(lambda: evaluate_forest(f, doms, work / "w", averages=(), permutations=perms))
    w_scratch = WALL[-1]
    assert inc["scoring"]["scored"] == len(doms)  # only the new ELM ran
    removal, t_removal = timed(lambda: evaluate_forest(without(f, {names[0]}), doms, work / "w", averages=(),
                                                       store=inc_store, permutations=perms))
    assert removal["scoring"]["scored"] == 0
    log(f"v ({n - 1} ELMs) {t_prev:.1f}s; v+1 incremental {t_inc:.1f}s, from scratch {t_scratch:.1f}s "
        f"({t_inc / t_scratch:.3f}; 1.2/n = {1.2 / n:.3f}); a removal {t_removal:.2f}s")
    fig = {
        "elms": n, "domains": len(doms), "permutations": perms,
        "seconds": "CPU seconds of the process (wall seconds in *_wall)",
        "full_eval_seconds": round(t_full, 2), "full_eval_seconds_wall": round(w_full, 2),
        "values_over_full_eval_wall": round(w_values / w_full, 4),
        "incremental_over_full_eval_wall": round(w_inc / w_scratch, 4), "values_seconds": round(t_values, 3),
        "read_scores_seconds": round(t_read, 3),
        "values_seconds_over_full_eval": round(t_values / t_full, 4),
        "values_with_reading_over_full_eval": round((t_values + t_read) / t_full, 4),
        "loo_max_rel_error": float(f"{loo_err:.3g}"), "loo_checked_elms": min(args.loo_checks, n),
        "shapley_efficiency_max_error": float(f"{eff:.3g}"),
        "shapley_max_stderr": round(se, 5),
        "incremental_seconds": round(t_inc, 2), "scratch_seconds": round(t_scratch, 2),
        "incremental_over_full_eval": round(t_inc / t_scratch, 4), "target_incremental": round(1.2 / n, 4),
        "removal_over_full_eval": round(t_removal / t_scratch, 4),
        "values_identical_incremental_vs_scratch": bool(all(
            math.isclose(inc["values"][d]["elms"][e]["shapley"], scratch["values"][d]["elms"][e]["shapley"],
                         rel_tol=1e-9, abs_tol=1e-12) for d in inc["values"] for e in names)),
    }
    if args.averages:
        avg_store = DirStore(work / "store-avg")
        evaluate_forest(prev, doms, work / "w", store=avg_store, permutations=perms)
        _, t_inc_a = timed(lambda: evaluate_forest(f, doms, work / "w", store=avg_store, permutations=perms))
        _, t_scr_a = timed(lambda: evaluate_forest(f, doms, work / "w", permutations=perms))
        log(f"with the averages: v+1 incremental {t_inc_a:.1f}s, from scratch {t_scr_a:.1f}s")
        fig.update(incremental_with_averages_over_full_eval=round(t_inc_a / t_scr_a, 4),
                   scratch_with_averages_seconds=round(t_scr_a, 2))
    checks = {"loo<=1e-4": fig["loo_max_rel_error"] <= 1e-4, "values<=10%": fig["values_seconds_over_full_eval"] <= 0.10,
              "incremental<=1.2/n": fig["incremental_over_full_eval"] <= 1.2 / n,
              "efficiency": fig["shapley_efficiency_max_error"] <= 1e-9}
    fig["checks"] = checks
    print(json.dumps({k: (float(v) if isinstance(v, np.floating) else v) for k, v in fig.items()}))


if __name__ == "__main__":
    main()
