"""Per-domain perplexity tables for ELMs, ensembles and averaged models.

Scoring is the expensive part, so each model is run once per domain and its per-token log
probabilities are kept (test blocks) along with per-sequence log-likelihoods (development
blocks, for the cached prior). Every ensemble variant (all ELMs, top-k, an ELM removed) is
then exact arithmetic on those scores: the same numbers EnsembleLM computes, without
running any expert twice.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from btm.average import average_models, method_weights
from btm.data import Corpus, eval_blocks, tokenize_file
from btm.ensemble import mix_logprobs
from btm.errors import BTMError
from btm.family import Card
from btm.forest import Elm, Forest
from btm.posterior import cached_prior, token_logprobs
from btm.weights import select_top_k


@dataclass
class DomainBlocks:
    name: str
    role: str | None
    test: torch.Tensor  # (N, T+1) evaluation blocks
    dev: torch.Tensor  # (M, T+1) development blocks for the cached prior

    @property
    def tokens(self) -> int:
        return int(self.test.shape[0] * (self.test.shape[1] - 1))

    @cached_property
    def fingerprint(self) -> str:
        """The sha256 of the tokenised blocks (the score cache's key for this domain's data)."""
        from btm.score_cache import blocks_fingerprint

        return blocks_fingerprint(self.test, self.dev)


def domain_blocks(corpus: Corpus, names: Sequence[str], tokenizer, block_size: int, max_eval_blocks: int | None,
                  prior_blocks: int = 100, cache_dir: str | os.PathLike | None = None,
                  eval_split: str = "test", dev_split: str = "valid") -> list[DomainBlocks]:
    out = []
    for n in names:
        d = corpus[n]
        test = eval_blocks(tokenize_file(d.split_path(eval_split), tokenizer, cache_dir), block_size, max_eval_blocks)
        dev = eval_blocks(tokenize_file(d.split_path(dev_split), tokenizer, cache_dir), block_size, prior_blocks)
        out.append(DomainBlocks(n, d.role, test, dev))
    return out


@dataclass
class Scores:
    """Per-token test log probs and per-sequence dev log-likelihoods, by (model, domain).

    With a `store` (btm.score_cache), a model given as a directory (or with its fingerprint)
    is scored only on the domains the store does not hold whole; `scored` counts the
    (model, domain) pairs that ran a forward pass, `reused` those read back."""

    test: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    dev: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    store: object | None = None  # a btm.score_cache.ScoreStore
    scored: int = 0
    reused: int = 0
    _shell: torch.nn.Module | None = field(default=None, repr=False)  # refilled with each model's weights

    def _load(self, path, device) -> torch.nn.Module:
        from btm.family import reuse_or_load

        self._shell = reuse_or_load(self._shell, path, device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return self._shell

    def add_model(self, name: str, model_or_dir, domains: Sequence[DomainBlocks], batch_size: int = 16,
                  device: str | None = None, dev_too: bool = True, fingerprint: str | None = None) -> None:
        own = isinstance(model_or_dir, (str, os.PathLike))
        keys = self._cache_keys(model_or_dir if own else None, fingerprint, domains)
        todo = [d for d in domains if not self._from_store(name, d, keys.get(d.name), dev_too)]
        if not todo:
            return
        model = self._load(model_or_dir, device) if own else model_or_dir
        for d in todo:
            self.test[(name, d.name)] = token_logprobs(model, d.test, batch_size)
            if dev_too:
                self.dev[(name, d.name)] = token_logprobs(model, d.dev, batch_size).double().sum(1).numpy()
            self.scored += 1
            if d.name in keys:
                from btm.score_cache import encode

                self.store.write(keys[d.name], encode(keys[d.name], self.test[(name, d.name)],
                                                      self.dev.get((name, d.name)) if dev_too else None))

    def _cache_keys(self, path, fingerprint: str | None, domains: Sequence[DomainBlocks]) -> dict[str, str]:
        if self.store is None or (path is None and fingerprint is None):
            return {}
        from btm.score_cache import dir_fingerprint, entry_key

        fp = fingerprint or dir_fingerprint(path)
        return {d.name: entry_key(fp, d.fingerprint) for d in domains}

    def _from_store(self, name: str, d: DomainBlocks, key: str | None, dev_too: bool) -> bool:
        """Fill (name, d) from the store if it holds a whole entry of the right shapes."""
        if key is None:
            return False
        from btm.score_cache import decode

        got = decode(self.store.read(key), key, (d.test.shape[0], d.test.shape[1] - 1),
                     d.dev.shape[0] if dev_too else None)
        if got is None:
            return False
        self.test[(name, d.name)] = got[0]
        if dev_too:
            self.dev[(name, d.name)] = got[1]
        self.reused += 1
        return True

    def ppl(self, name: str, domain: str) -> float:
        return math.exp(-self.test[(name, domain)].double().mean().item())

    def prior(self, names: Sequence[str], domain: str) -> np.ndarray:
        ll = np.stack([self.dev[(n, domain)] for n in names], axis=1)
        return cached_prior(ll)

    def ensemble_ppl(self, names: Sequence[str], domain: str, top_k: int | None = None,
                     prior: np.ndarray | None = None) -> float:
        prior = self.prior(names, domain) if prior is None else prior
        idx, w = select_top_k(prior, top_k)
        lp = torch.stack([self.test[(names[i], domain)] for i in idx])
        mixed = mix_logprobs(lp, torch.tensor(np.log(w)))
        return math.exp(-mixed.double().mean().item())


def evaluate_forest(
    forest: Forest,
    domains: Sequence[DomainBlocks],
    work_dir: str | os.PathLike,
    top_ks: Sequence[int] = (1, 2, 4),
    averages: Sequence[str] = ("uniform", "argmax", "posterior"),
    extra_models: dict[str, str | os.PathLike] | None = None,
    batch_size: int = 16,
    progress=None,
    store=None,
    permutations: int | None = None,
) -> dict:
    """The leaderboard of a forest: one row per (subject, domain) with its perplexity.

    With a `store` (btm.score_cache) only the models whose scores it lacks run; with
    `permutations`, the report also holds each ELM's value on each domain (btm.value:
    leave-one-out and Shapley values against the seed), from the same scores."""
    forest.check_elms()  # averages are part of the leaderboard: a stray ELM would fail them late
    elms = forest.elms
    names = [e.name for e in elms]
    scores = Scores(store=store)
    step = progress or (lambda msg: None)
    for e in elms:
        step(f"scoring ELM {e.name}")
        scores.add_model(e.name, e.path, domains, batch_size, fingerprint=elm_fingerprint(e))
    rows, priors = _elm_and_ensemble_rows(scores, names, domains, top_ks)
    if elms:
        rows += _average_rows(scores, elms, domains, priors, averages, Path(work_dir), batch_size, step)
    for name, path in (extra_models or {}).items():
        rows += _model_rows(scores, name, path, domains, batch_size, step)
    rep = {"forest_version": forest.version, "rows": rows, "priors": priors,
           "domains": [{"name": d.name, "role": d.role, "tokens": d.tokens} for d in domains],
           "summary": summarise(rows)}
    if permutations is not None:
        rep["values"] = _elm_values(scores, forest, names, domains, permutations, batch_size, step)
    rep["scoring"] = {"scored": scores.scored, "reused": scores.reused}
    return rep


def _elm_and_ensemble_rows(scores: Scores, names: Sequence[str], domains: Sequence[DomainBlocks],
                           top_ks: Sequence[int]) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Each domain's ELM rows and, where there are ELMs, its ensembles' rows; and each domain's
    cached prior over the ELMs, which weights both the ensembles and the averages."""
    rows: list[dict] = []
    priors: dict[str, dict[str, float]] = {}
    for d in domains:
        rows += [_row(n, "elm", "elm", d, scores.ppl(n, d.name)) for n in names]
        if not names:
            continue
        prior = scores.prior(names, d.name)
        priors[d.name] = {n: float(p) for n, p in zip(names, prior, strict=True)}
        rows += _ensemble_rows(scores, names, d, prior, top_ks)
    return rows, priors


def _average_rows(scores: Scores, elms: Sequence[Elm], domains: Sequence[DomainBlocks],
                  priors: dict[str, dict[str, float]], averages: Sequence[str], work: Path, batch_size: int,
                  step) -> list[dict]:
    """The parameter averages: the uniform one on every domain, then each domain's prior-weighted ones."""
    rows = _uniform_average_rows(scores, elms, domains, work, batch_size, step) if "uniform" in averages else []
    for d in domains:
        rows += _prior_average_rows(scores, elms, d, priors[d.name], averages, work, batch_size, step)
    return rows


def _elm_values(scores: Scores, forest: Forest, names: Sequence[str], domains: Sequence[DomainBlocks],
                permutations: int, batch_size: int, step) -> dict:
    """Each ELM's value on each domain, from the same scores and the seed's (the forest of no ELMs)."""
    step("scoring the seed for the ELMs' values")
    scores.add_model(SEED, forest.seed_dir, domains, batch_size, dev_too=False,
                     fingerprint=_files_fingerprint(forest.manifest.get("seed", {})))
    return forest_values(scores, names, domains, permutations)


SEED = "(seed)"  # the seed's key in Scores when it is scored as the forest of no ELMs


def _files_fingerprint(entry: dict) -> str | None:
    from btm.score_cache import files_fingerprint

    return files_fingerprint(entry["files"]) if entry.get("files") else None


def elm_fingerprint(e: Elm) -> str | None:
    """The score cache's name for an ELM: the sha256 of its manifest's config and weights hashes."""
    return _files_fingerprint(e.entry)


def subset_scorer(scores: Scores, names: Sequence[str], domain: str, base: str = SEED):
    """btm.value's view of a domain's scores: the ELMs `names` over the model `base`."""
    from btm.value import SubsetScorer

    dev = np.stack([scores.dev[(n, domain)] for n in names], axis=1) if names else np.zeros((1, 0))
    return SubsetScorer([scores.test[(n, domain)] for n in names], dev,
                        -scores.test[(base, domain)].double().mean().item())


def forest_values(scores: Scores, names: Sequence[str], domains: Sequence[DomainBlocks],
                  permutations: int, base: str = SEED) -> dict[str, dict]:
    """Every ELM's leave-one-out and Shapley value on every domain (btm.value.domain_values)."""
    from btm.value import domain_values

    return {d.name: {"role": d.role, **domain_values(names, subset_scorer(scores, names, d.name, base), permutations)}
            for d in domains}


def _row(subject: str, kind: str, method: str, d: DomainBlocks, ppl: float) -> dict:
    return {"subject": subject, "kind": kind, "method": method, "domain": d.name, "role": d.role,
            "ppl": ppl, "tokens": d.tokens}


def _ensemble_rows(scores: Scores, names: Sequence[str], d: DomainBlocks, prior: np.ndarray,
                   top_ks: Sequence[int]) -> list[dict]:
    """The ensemble of every ELM, then each top-k ensemble smaller than the forest (a top-k
    of the whole forest is the full ensemble again)."""
    rows = [_row("ensemble", "ensemble", "ensemble", d, scores.ensemble_ppl(names, d.name, None, prior))]
    for k in top_ks:
        if k < len(names):
            ppl = scores.ensemble_ppl(names, d.name, k, prior)
            rows.append(_row(f"ensemble/top{k}", "ensemble", f"top{k}", d, ppl))
    return rows


def _uniform_average_rows(scores: Scores, elms: Sequence[Elm], domains: Sequence[DomainBlocks], work: Path,
                          batch_size: int, step) -> list[dict]:
    """The uniform average of every ELM: one model, built once and scored on every domain."""
    step("building the uniform average")
    names = [e.name for e in elms]
    out = average_models([e.path for e in elms], method_weights("uniform", None, len(elms)),
                         work / "average-uniform", Card(name="average-uniform", kind="average"), names=names)
    scores.add_model("average/uniform", out, domains, batch_size, dev_too=False)
    return [_row("average/uniform", "average", "uniform", d, scores.ppl("average/uniform", d.name))
            for d in domains]


def _prior_average_rows(scores: Scores, elms: Sequence[Elm], d: DomainBlocks, prior: dict[str, float],
                        averages: Sequence[str], work: Path, batch_size: int, step) -> list[dict]:
    """The averages weighted by one domain's cached prior: argmax (all weight on the top ELM,
    so it is that ELM and needs no new model) and posterior (built for, and scored on, that
    domain only)."""
    names = [e.name for e in elms]
    p = [prior[n] for n in names]
    rows = []
    if "argmax" in averages:
        best = names[int(np.argmax(p))]
        rows.append(_row("average/argmax", "average", "argmax", d, scores.ppl(best, d.name)))
    if "posterior" in averages:
        step(f"building the posterior average for {d.name}")
        out = average_models([e.path for e in elms], p, work / f"average-posterior-{d.name}",
                             Card(name=f"average-posterior-{d.name}", kind="average", domain=d.name), names=names)
        key = f"average/posterior/{d.name}"
        scores.add_model(key, out, [d], batch_size, dev_too=False)
        rows.append(_row("average/posterior", "average", "posterior", d, scores.ppl(key, d.name)))
    return rows


def _model_rows(scores: Scores, name: str, path: str | os.PathLike, domains: Sequence[DomainBlocks],
                batch_size: int, step) -> list[dict]:
    """A model from outside the forest (e.g. the seed or a dense baseline), on every domain."""
    step(f"scoring {name}")
    scores.add_model(name, path, domains, batch_size, dev_too=False)
    return [_row(name, "model", "model", d, scores.ppl(name, d.name)) for d in domains]


def evaluate_text(forest: Forest, blocks: torch.Tensor, top_ks: Sequence[int] = (1, 2), batch_size: int = 16) -> dict:
    """Perplexity of an unlabelled text (blocks (N, T+1)) under each ELM, the whole ensemble and
    the top-k ensembles routed by the text: at each position the k experts chosen from the text
    before it, by the prompt router and (where the forest has routing vectors) the centroid router."""
    from btm.family import load_model
    from btm.routing import Centroids, forest_vectors, prefix_vectors, routed_mix, uniform_log_prior

    names = forest.names()
    if not names:
        raise BTMError(f"{forest.root}: the forest has no ELMs")
    scores = Scores()
    text = DomainBlocks("text", None, blocks, blocks[:0])
    for e in forest.elms:
        scores.add_model(e.name, e.path, [text], batch_size, dev_too=False)
    lp = torch.stack([scores.test[(n, "text")] for n in names])
    log_prior = uniform_log_prior(len(names))
    rows = [_text_row(n, "elm", scores.test[(n, "text")]) for n in names]
    rows.append(_text_row("ensemble", "ensemble", routed_mix(lp, log_prior)))
    vectors = forest_vectors(forest.manifest)
    centroid = None
    if vectors is not None:
        seed = load_model(forest.seed_dir)
        h = torch.cat([prefix_vectors(seed, blocks[i: i + batch_size, :-1]) for i in range(0, len(blocks), batch_size)])
        centroid = Centroids(vectors).scores(h, log_prior).movedim(-1, 0)  # (n, N, T)
    for k in (k for k in top_ks if k < len(names)):
        rows.append(_text_row(f"prompt/top{k}", "routed", routed_mix(lp, log_prior, k)))
        if centroid is not None:
            rows.append(_text_row(f"centroid/top{k}", "routed", routed_mix(lp, log_prior, k, centroid)))
    return {"forest_version": forest.version, "tokens": int(lp.shape[1] * lp.shape[2]), "rows": rows,
            "routing_vectors": vectors is not None}


def _text_row(subject: str, kind: str, lp: torch.Tensor) -> dict:
    return {"subject": subject, "kind": kind, "ppl": math.exp(-lp.double().mean().item())}


def summarise(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean perplexity per subject over train domains and over eval domains."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        role = r.get("role") or "all"
        out.setdefault(r["subject"], {}).setdefault(role, []).append(r["ppl"])
    return {s: {role: float(np.mean(v)) for role, v in by.items()} for s, by in out.items()}


def table(report: dict, subjects: Sequence[str] | None = None) -> str:
    """A plain-text perplexity table: subjects as rows, domains as columns."""
    doms = [d["name"] for d in report["domains"]]
    by: dict[str, dict[str, float]] = {}
    for r in report["rows"]:
        by.setdefault(r["subject"], {})[r["domain"]] = r["ppl"]
    subjects = subjects or list(by)
    w = max(12, *(len(s) for s in subjects)) if subjects else 12
    cols = [d[:10] for d in doms]
    lines = [f"{'':<{w}} " + " ".join(f"{c:>10}" for c in cols)]
    for s in subjects:
        lines.append(f"{s:<{w}} " + " ".join(f"{by[s].get(d, float('nan')):>10.2f}" for d in doms))
    return "\n".join(lines)
