"""What each ELM is worth to its forest, from scores evaluation already holds: no forward pass.

Evaluation keeps every ELM's per-token log-probabilities of each domain's test blocks and its
per-sequence log-likelihoods of the domain's development blocks (btm.evaluate.Scores). The
forest restricted to any subset S of its ELMs is then arithmetic on those numbers: the domain's
cached prior recomputed over S from the development log-likelihoods, and the mixture of S with
weights that follow the prefix likelihood, exactly as `Scores.ensemble_ppl` (and evaluate)
computes the forest as users use it. On one domain:

    v(S)        = log ppl(seed) - log ppl(ensemble of S)     nats per token; v({}) = 0: a forest
                                                              without ELMs is its seed
    loo_i       = ppl(all but i) / ppl(all) - 1               how much worse the forest is without
                                                              ELM i (relative; > 0: i helps)
    shapley_i   = E over orderings of the ELMs of v(S ∪ {i}) - v(S), S the ELMs before i;
                  estimated from P random orderings, with its standard error std / sqrt(P).
                  Each ordering's marginal gains telescope to v(all) - v({}), so the estimates
                  sum to the forest's improvement over the seed, v(all), on every domain.
    merge_i     = ppl(all + candidate) / ppl(all) - 1        what merging a candidate would change
                                                              (< 0: the forest gets better)

Subsets are memoised, so P orderings of n ELMs cost at most min(P * n, 2^n) subset ensembles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from btm.posterior import EMA_ALPHA, EMA_GROUP

DEFAULT_PERMUTATIONS = 200


class SubsetScorer:
    """The forest's mean negative log-likelihood per token on one domain for any subset of its ELMs.

    test: the n ELMs' token log-probs, each (N, T); dev: (M, n) per-sequence log-likelihoods of
    the development blocks (the cached prior's input); base_nll: the seed's mean NLL per token
    (the forest without ELMs). The same arithmetic as `Scores.ensemble_ppl` (and so as
    evaluation), with the prefix likelihoods computed once and the priors of many subsets at once."""

    def __init__(self, test: Sequence[torch.Tensor], dev: np.ndarray, base_nll: float):
        self.dev = np.asarray(dev, dtype=np.float64)
        if self.dev.ndim != 2 or self.dev.shape[1] != len(test):
            raise ValueError(f"dev log-likelihoods {self.dev.shape} for {len(test)} ELMs")
        self.n = len(test)
        if self.n:
            lp = torch.stack([t.reshape(-1) for t in test]).double()  # (n, N*T), blocks one after another
            shape = test[0].shape
            self.lp = lp
            self.prefix = (torch.cumsum(lp.reshape(self.n, *shape), dim=-1).reshape(self.n, -1) - lp)
        self.base_nll = float(base_nll)
        self.memo: dict[tuple[int, ...], float] = {(): self.base_nll}

    def nll(self, subset: Sequence[int]) -> float:
        key = tuple(sorted(subset))
        if key not in self.memo:
            self.prepare([key])
        return self.memo[key]

    def prepare(self, subsets: Sequence[Sequence[int]]) -> None:
        """Compute (and keep) the NLL of every subset not yet known, their priors in one pass."""
        keys = sorted({tuple(sorted(k)) for k in subsets} - set(self.memo))
        if not keys:
            return
        priors = subset_priors(self.dev, keys)
        for key, prior in zip(keys, priors, strict=True):
            self.memo[key] = self._nll(key, prior)

    def _nll(self, key: tuple[int, ...], prior: np.ndarray) -> float:
        idx = list(key)
        p = prior / prior.sum()
        with np.errstate(divide="ignore"):
            logp = torch.from_numpy(np.log(p))
        logw = logp[:, None] + self.prefix[idx]
        logw = logw - torch.logsumexp(logw, dim=0, keepdim=True)
        mixed = torch.logsumexp(self.lp[idx] + logw, dim=0).float()  # as the ensemble returns it
        return -mixed.double().mean().item()

    def ppl(self, subset: Sequence[int]) -> float:
        return math.exp(self.nll(subset))

    def value(self, subset: Sequence[int]) -> float:
        """v(S): the improvement over the seed in log perplexity (nats per token)."""
        return self.base_nll - self.nll(subset)


def subset_priors(dev: np.ndarray, keys: Sequence[tuple[int, ...]], group: int = EMA_GROUP,
                  alpha: float = EMA_ALPHA) -> list[np.ndarray]:
    """btm.posterior.cached_prior of the columns `key` of dev, for every key at once (the EMA's
    steps run once for all subsets, each subset's ELMs masked in)."""
    n = dev.shape[1]
    mask = np.zeros((len(keys), n), dtype=bool)
    for r, k in enumerate(keys):
        mask[r, list(k)] = True
    size = mask.sum(1, keepdims=True)
    prior = np.where(mask, 1.0 / size, 0.0)  # (S, n)
    ema = None
    for i in range(0, dev.shape[0], group):
        with np.errstate(divide="ignore"):
            joint = dev[None, i: i + group, :] + np.log(prior)[:, None, :]  # (S, g, n)
        joint = np.where(mask[:, None, :], joint, -np.inf)
        m = joint.max(axis=2, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        post = np.exp(joint - (m + np.log(np.exp(joint - m).sum(axis=2, keepdims=True))))
        mean = post.mean(axis=1)
        ema = mean if ema is None else (1 - alpha) * ema + alpha * mean
        prior = ema
    out = ema / ema.sum(axis=1, keepdims=True)
    return [out[r, list(k)] for r, k in enumerate(keys)]


def leave_one_out(s: SubsetScorer) -> np.ndarray:
    """ppl(all but i) / ppl(all) - 1 for each ELM i (the seed stands in for a forest of none)."""
    every = list(range(s.n))
    s.prepare([every] + [[j for j in every if j != i] for i in every])
    full = s.nll(every)
    return np.array([math.expm1(s.nll([j for j in every if j != i]) - full) for i in every])


@dataclass
class Shapley:
    values: np.ndarray  # (n,) nats per token
    stderr: np.ndarray  # (n,) standard error of each estimate
    permutations: int
    exact: bool = False


def shapley(s: SubsetScorer, permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> Shapley:
    """Permutation-sampled Shapley values of the ELMs for v (see the module doc)."""
    n = s.n
    if n == 0:
        return Shapley(np.zeros(0), np.zeros(0), 0)
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(n) for _ in range(permutations)]
    s.prepare([o[:k] for o in orders for k in range(1, n + 1)])
    gains = np.empty((permutations, n))
    for p, order in enumerate(orders):
        prev, before = s.value(()), []
        for i in order:
            before.append(int(i))
            cur = s.value(before)
            gains[p, i] = cur - prev
            prev = cur
    se = gains.std(axis=0, ddof=1) / math.sqrt(permutations) if permutations > 1 else np.full(n, np.nan)
    return Shapley(gains.mean(axis=0), se, permutations)


def exact_shapley(s: SubsetScorer) -> np.ndarray:
    """Shapley values by enumerating every subset (2^n ensembles: for checks and tiny forests)."""
    from itertools import combinations

    n = s.n
    out = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for k in range(n):
            weight = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for sub in combinations(others, k):
                out[i] += weight * (s.value((*sub, i)) - s.value(sub))
    return out


def domain_values(names: Sequence[str], s: SubsetScorer, permutations: int = DEFAULT_PERMUTATIONS,
                  seed: int = 0) -> dict:
    """One domain's figures: the forest's and the seed's perplexity, v(all), and per ELM its
    leave-one-out change and Shapley value (with standard error)."""
    every = list(range(s.n))
    loo = leave_one_out(s) if s.n else np.zeros(0)
    sh = shapley(s, permutations, seed)
    return {
        "forest_ppl": s.ppl(every), "seed_ppl": math.exp(s.base_nll), "improvement": s.value(every),
        "permutations": sh.permutations,
        "elms": {n: {"loo": float(loo[i]), "shapley": float(sh.values[i]), "shapley_se": float(sh.stderr[i]),
                     "without_ppl": s.ppl([j for j in every if j != i])}
                 for i, n in enumerate(names)},
    }


def merge_preview(s_with: SubsetScorer) -> dict:
    """What adding the last ELM of `s_with` (the candidate) changes: the forest's perplexity
    without and with it and the relative change (< 0: better)."""
    every = list(range(s_with.n))
    before, after = s_with.ppl(every[:-1]), s_with.ppl(every)
    return {"before_ppl": before, "after_ppl": after, "change": after / before - 1}
