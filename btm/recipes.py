"""Recipes: the steps that several callers share (the CLI, the contributor client, the
coordinator's jobs), each written once over the library's parts.

    routing(forest, ...)              which router, prior and vectors a use of the forest runs with
    routing_vector(seed, sample)      an ELM's routing vector from a sample of its domain
    vector_sample(card)               where an ELM's own domain sample is, from its card
    add_elm(forest, model_dir, ...)   add an ELM with its routing vector
    compute_vectors(forest, samples)  routing vectors for the ELMs of a forest made without them
    train_elm(init, out, sources, cfg) an ELM trained from its branch init (or the dense baseline)
    train_seed(model, tok, out, sources, cfg) the seed LM on a balanced mixture of domains
    average_weights(forest, method, ...)  the weights of a parameter average: uniform, a target's
                                      posterior or argmax, or given per ELM
    average_forest(forest, out, ...)  the forest collapsed into one model by such an average
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from btm.errors import BTMError, DataError
from btm.forest import Elm, Forest
from btm.routing import VECTOR_BLOCKS, check_router, forest_vectors, missing_vectors_note

if TYPE_CHECKING:
    from btm.family import Card

VECTOR_BLOCK_SIZE = 256  # tokens per block behind a routing vector (the model's context if shorter)


@dataclass
class Routing:
    """What a use of the forest runs: its ELMs, the forest's prior over them, the router, and
    for the centroid router the routing vectors and the seed."""

    router: str
    paths: list[Path]
    names: list[str]
    prior: list[float] | None
    vectors: list[list[float]] | None
    seed: Path | None
    note: str | None = None


def routing(forest: Forest, router: str | None = None, prior: Sequence[float] | None = None,
            target: str | os.PathLike | None = None, block_size: int = 256, max_blocks: int = 100) -> Routing:
    """The prior: given, or the cached prior of `target` (text of a target domain), or uniform.
    The router: as asked, else `prior` where a prior or target is given, `centroid` where every
    ELM has a routing vector, `prompt` otherwise. Asked for `centroid` on a forest without
    vectors, it says how to compute them and uses the prompt router (never the first k)."""
    elms = forest.elms
    if not elms:
        raise BTMError(f"{forest.root}: the forest has no ELMs")
    if prior is None and target is not None:
        prior = domain_prior_of(forest, target, block_size, max_blocks)
    if prior is not None:
        prior = per_elm_weights(prior, len(elms), "prior")
    vectors = forest_vectors(forest.manifest)
    router, note = _router_for(forest, router, prior is not None, vectors)
    centroid = router == "centroid"
    return Routing(router, [e.path for e in elms], [e.name for e in elms], prior,
                   vectors if centroid else None, forest.seed_dir if centroid else None, note)


def _router_for(forest: Forest, router: str | None, prior_given: bool,
                vectors: list[list[float]] | None) -> tuple[str, str | None]:
    """The router routing() runs and the note it warns with when the centroid router has no vectors."""
    if router is None:
        router = "prior" if prior_given else ("centroid" if vectors else "prompt")
    if check_router(router) == "centroid" and vectors is None:
        note = missing_vectors_note(forest.root)
        warnings.warn(note, stacklevel=3)  # at routing()'s caller
        return "prompt", note
    return router, None


def per_elm_weights(weights: Sequence[float], n: int, what: str) -> list[float]:
    """Weights a caller gives over the n ELMs (a prior, a backbone's), refused unless one per ELM."""
    if len(weights) != n:
        raise DataError(f"{n} ELMs but {len(weights)} {what} weights")
    return [float(w) for w in weights]


def domain_prior_of(forest: Forest, target: str | os.PathLike, block_size: int = 256,
                    max_blocks: int = 100) -> list[float]:
    """The cached prior of a target domain's text over the forest's ELMs."""
    from btm.branch import sample_blocks
    from btm.posterior import domain_prior

    return domain_prior([e.path for e in forest.elms], sample_blocks(forest, target, block_size, max_blocks)).tolist()


def routing_vector(seed_dir: str | os.PathLike, sample: str | os.PathLike, max_blocks: int = VECTOR_BLOCKS) -> list[float]:
    """An ELM's routing vector: the seed's mean last hidden state over blocks of a sample of the
    ELM's domain (a .jsonl/.txt file, or a domain directory: its valid split, else train)."""
    from btm.data import encode_texts, eval_blocks, read_documents, split_source
    from btm.family import load_config, load_model
    from btm.model_files import max_positions
    from btm.routing import domain_vector
    from btm.tokenizer import load_tokenizer

    tok = load_tokenizer(seed_dir)
    tokens = encode_texts(tok, read_documents(split_source(sample, ("valid", "train"))))
    if len(tokens) < 2:
        raise DataError(f"{sample}: the sample holds no text to compute a routing vector from")
    size = min(VECTOR_BLOCK_SIZE, max_positions(load_config(seed_dir)) or VECTOR_BLOCK_SIZE, len(tokens)) - 1
    blocks = eval_blocks(tokens, size, max_blocks)  # (N, size + 1): at most the model's context
    return [float(x) for x in domain_vector(load_model(seed_dir), blocks)]


def vector_sample(card) -> Path | None:
    """The ELM's own domain text named by its card (what `elmforest train` records), if it is on
    this machine."""
    data = card.data or {}
    if data.get("corpus") and data.get("domain"):
        p = Path(data["corpus"]) / data["domain"]
    elif data.get("source"):
        p = Path(data["source"])
    else:
        return None
    return p if p.exists() else None


def add_elm(forest: Forest, model_dir: str | os.PathLike, name: str | None = None, domain: str | None = None,
            sample: str | os.PathLike | None = None, source: dict | None = None) -> tuple[Elm, str | None]:
    """Add an ELM with its routing vector: from `sample`, else the one its branch init carried,
    else from the domain text its card names. Returns the ELM and a note when it has none."""
    from btm.family import read_card

    card = read_card(model_dir)
    vector, note = None, None
    if sample is not None:
        vector = routing_vector(forest.seed_dir, sample)
    elif (card.origin or {}).get("routing_vector") is not None:
        vector = card.origin["routing_vector"]
    elif (found := vector_sample(card)) is not None:
        vector = routing_vector(forest.seed_dir, found)
    else:
        note = (f"{model_dir}: no sample of its domain is known, so it has no routing vector and the forest routes by "
                "the prompt; pass --sample FILE to give one")
    return forest.add(model_dir, name=name, domain=domain, source=source, routing_vector=vector), note


def compute_vectors(forest: Forest, samples: dict[str, str | os.PathLike]) -> list[str]:
    """Routing vectors for the ELMs named in `samples` ({ELM: its domain's text}); one new
    version. Returns the ELMs of the forest still without one."""
    unknown = sorted(set(samples) - set(forest.names()))
    if unknown:
        raise BTMError(f"{forest.root}: no ELM named {', '.join(unknown)}; ELMs: {', '.join(forest.names())}")
    if samples:
        forest.set_routing_vectors({n: routing_vector(forest.seed_dir, s) for n, s in samples.items()})
    return [e.name for e in forest.elms if e.entry.get("routing_vector") is None]


def train_elm(init: str | os.PathLike, out: str | os.PathLike, sources: Sequence[str | os.PathLike], cfg,
              *, domain: str | None = None, name: str | None = None, kind: str = "elm", data: dict | None = None,
              cache_dir: str | os.PathLike | None = None, carry_optimizer: bool = True,
              continue_schedule: bool = False, recipe: str = "", dist_info=None) -> Path:
    """Train a model from `init` (a branch init, or any model directory) on `sources` (text
    files or domain directories' train splits, mixed evenly) and save it at `out` with a card
    naming its parents (the init's, for a branch init), domain, data and recipe. The
    optimizer state the init carries is continued unless `carry_optimizer` is off; with
    `continue_schedule` the learning-rate schedule goes on from where the init's run stopped
    (compute-matched BTM). `kind="dense"` is the dense baseline: no domain, no parent weights.
    The card's data is `data` with the number of tokens the sources hold (`tokens`).
    Callers on several threads of one process are safe: the model loads under
    btm.family.load_model's lock."""
    from btm.checkpoint import checkpoint_optimizer
    from btm.data import BlockSampler, tokenize_file
    from btm.family import Card, load_model, read_card
    from btm.tokenizer import load_tokenizer
    from btm.train import train

    init, out = Path(init), Path(out)
    tok = load_tokenizer(init)
    streams = [tokenize_file(s, tok, cache_dir) for s in sources]
    if continue_schedule:
        cfg = continued_schedule(init, cfg)
    init_card = read_card(init)
    parents = init_card.parents if init_card.kind == "branch-init" else [{"name": init_card.name, "weight": 1.0}]
    card = Card(name=name or out.name, kind=kind, domain=None if kind == "dense" else (domain or init_card.domain),
                parents=parents, origin=init_card.origin, recipe=recipe,
                data={**(data or {}), "tokens": sum(int(s.size) for s in streams)})
    train(load_model(init), tok, BlockSampler(streams, cfg.block_size, cfg.seed), cfg, out, card,
          init_optimizer=checkpoint_optimizer(init) if carry_optimizer else None, dist_info=dist_info)
    return out


def continued_schedule(init: Path, cfg):
    """`cfg` as the steps after those the init's run took, in the learning-rate schedule that
    run was in (its own length, else this phase's end)."""
    from dataclasses import replace

    from btm.checkpoint import read_checkpoint_state

    st = read_checkpoint_state(init)
    if st is None:
        raise BTMError(f"{init}: no checkpoint/state.json to continue a schedule from")
    start = int(st["global_step"])
    return replace(cfg, schedule_start=start,
                   schedule_steps=cfg.schedule_steps or st["config"].get("schedule_steps") or start + cfg.steps)


def train_seed(model, tokenizer, out: str | os.PathLike, sources: Sequence[str | os.PathLike], cfg, *,
               kind: str = "seed", data: dict | None = None, source: dict | None = None, recipe: str = "",
               cache_dir: str | os.PathLike | None = None, dist_info=None) -> Path:
    """Train `model` (new, or a pretrained start) on a balanced mixture of `sources` (one
    stream per domain, sampled evenly) and save it at `out` as the seed (or, with
    kind="dense", the dense baseline)."""
    from btm.data import BlockSampler, tokenize_file
    from btm.family import Card
    from btm.model_files import max_positions
    from btm.train import train

    out = Path(out)
    limit = max_positions(model.config)
    if limit and cfg.block_size > limit:
        raise BTMError(f"--block-size {cfg.block_size} exceeds the model's {limit} positions")
    streams = [tokenize_file(s, tokenizer, cache_dir) for s in sources]
    card = Card(name=out.name, kind=kind, data=data or {}, source=source or {}, recipe=recipe)
    train(model, tokenizer, BlockSampler(streams, cfg.block_size, cfg.seed), cfg, out, card, dist_info=dist_info)
    return out


def average_weights(forest: Forest, method: str = "posterior", target: str | os.PathLike | None = None,
                    explicit: dict[str, float] | None = None, block_size: int = 256,
                    max_blocks: int = 100, prior: list[float] | None = None) -> tuple[str, list[float]]:
    """(method, weights over the forest's ELMs): `explicit` {ELM: weight} (method "explicit"),
    uniform, or the posterior / argmax of the target domain's prior: `prior` when it is already
    known (one weight per ELM, in the forest's order), else the cached prior of `target`'s text."""
    from btm.average import method_weights

    names = forest.names()
    if not names:
        raise BTMError(f"{forest.root}: the forest has no ELMs to average")
    if explicit:
        unknown = set(explicit) - set(names)
        if unknown:
            raise BTMError(f"--weights names unknown ELMs {sorted(unknown)}; ELMs: {', '.join(names)}")
        return "explicit", [float(explicit.get(n, 0.0)) for n in names]
    if method == "uniform":
        return method, method_weights("uniform", None, len(names))
    if prior is None:
        if target is None:
            raise DataError(f"--method {method} needs --target (development text of the target domain)")
        prior = domain_prior_of(forest, target, block_size, max_blocks)
    return method, method_weights(method, prior, len(names))


def average_forest(forest: Forest, out: str | os.PathLike, method: str = "posterior",
                   target: str | os.PathLike | None = None, explicit: dict[str, float] | None = None,
                   out_dtype: str | None = None, max_shard_bytes: int | None = None, block_size: int = 256,
                   max_blocks: int = 100, prior: list[float] | None = None,
                   card: Card | None = None) -> tuple[Path, str, list[float]]:
    """The forest as one model, its parameters averaged with average_weights' weights (streamed
    tensor by tensor); returns (the model directory, the method, the weights). `card` (else
    one naming this recipe's command) describes the result."""
    from btm.average import average_models
    from btm.family import Card

    method, w = average_weights(forest, method, target, explicit, block_size, max_blocks, prior)
    card = card or Card(name=Path(out).name, kind="average", data={"method": method, "forest_version": forest.version,
                "target": str(target) if target else None},
                recipe=f"elmforest average --forest {forest.root} --out {out} --method {method}"
                + (f" --target {target}" if target else ""))
    path = average_models([e.path for e in forest.elms], w, out, card, names=forest.names(), out_dtype=out_dtype,
                          max_shard_bytes=max_shard_bytes)
    return Path(path), method, w
