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

from btm.ensemble import mix_logprobs
from btm.posterior import cached_prior
from btm.weights import select_top_k

DEFAULT_PERMUTATIONS = 200


class SubsetScorer:
    """The forest's mean negative log-likelihood per token on one domain for any subset of its ELMs.

    test: the n ELMs' token log-probs, each (N, T); dev: (M, n) per-sequence log-likelihoods of
    the development blocks (the cached prior's input); base_nll: the seed's mean NLL per token
    (the forest without ELMs)."""

    def __init__(self, test: Sequence[torch.Tensor], dev: np.ndarray, base_nll: float):
        self.test = list(test)
        self.dev = np.asarray(dev, dtype=np.float64)
        if self.dev.ndim != 2 or self.dev.shape[1] != len(self.test):
            raise ValueError(f"dev log-likelihoods {self.dev.shape} for {len(self.test)} ELMs")
        self.base_nll = float(base_nll)
        self.memo: dict[tuple[int, ...], float] = {(): self.base_nll}

    @property
    def n(self) -> int:
        return len(self.test)

    def nll(self, subset: Sequence[int]) -> float:
        key = tuple(sorted(subset))
        if key not in self.memo:
            self.memo[key] = self._nll(key)
        return self.memo[key]

    def _nll(self, key: tuple[int, ...]) -> float:
        prior = cached_prior(self.dev[:, list(key)])
        idx, w = select_top_k(prior, None)
        lp = torch.stack([self.test[key[i]] for i in idx])
        mixed = mix_logprobs(lp, torch.tensor(np.log(w)))
        return -mixed.double().mean().item()

    def ppl(self, subset: Sequence[int]) -> float:
        return math.exp(self.nll(subset))

    def value(self, subset: Sequence[int]) -> float:
        """v(S): the improvement over the seed in log perplexity (nats per token)."""
        return self.base_nll - self.nll(subset)


def leave_one_out(s: SubsetScorer) -> np.ndarray:
    """ppl(all but i) / ppl(all) - 1 for each ELM i (the seed stands in for a forest of none)."""
    every = list(range(s.n))
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
    gains = np.empty((permutations, n))
    for p in range(permutations):
        order = rng.permutation(n)
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
